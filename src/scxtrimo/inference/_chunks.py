"""Chunks of a row source to pooled embeddings, on any rank: the work unit of ``embed_to_store``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from scxtrimo.data._loading import iter_inference_batches
from scxtrimo.data._sources import ConcatSource, RowSource
from scxtrimo.data._tokens import InputSpec, TokenIndex
from scxtrimo.data._validation import CellStats, invalid_cells, invalid_cells_message, scan_cells

from ._encode import encode_pooled
from ._precision import module_for_precision
from ._prepare import skipped_examples
from ._store import leaf_sources

logger = logging.getLogger("scxtrimo")

DEFAULT_CHUNK_SIZE = 4096


# Picklable (a dataclass of arrays, the module and the source): sent to every rank under DDP.
@dataclass
class ChunkEngine:
    """Embeds chunks of a row source: the module plus everything fixed before the run.

    Picklable, so that it can be sent to every rank of a multi-process run
    (:class:`ChunkPredictor`). Chunk ``k`` holds the rows ``k * chunk_size`` up to the next
    chunk's first row; :meth:`embed_chunk` reads, checks and embeds them.

    Attributes
    ----------
    module
        The network (``model.module``).
    n_genes
        The module's vocabulary size.
    width
        Width of one embedding (4 x encoder width for ``pooling="all"``).
    spec
        How values become tokens (from a :class:`PreparedInput` of the source).
    col_to_vocab
        Vocabulary column of each gene, one array per leaf source (shard).
    pooling
        As in :func:`embed_prepared`.
    invalid
        ``"raise"`` or ``"skip"`` cells that cannot be embedded (as in :func:`prepare_input`).
    batch_size
        As in :func:`embed_prepared`.
    max_tokens
        As in :func:`embed_prepared`.
    autocast
        As in :func:`embed_prepared`.
    precision
        As in :func:`embed_prepared`.
    total_counts_key
        ``obs`` column of per-cell total counts, or ``None``.
    source
        The :class:`~scxtrimo.data.RowSource` to read.
    n_obs
        Rows of ``source``.
    chunk_size
        Rows per chunk.
    """

    module: torch.nn.Module
    n_genes: int
    width: int
    spec: InputSpec
    col_to_vocab: list[np.ndarray]  # one per leaf source
    pooling: str
    invalid: str
    total_counts_key: str | None
    batch_size: int | None
    max_tokens: int
    autocast: bool | None = None
    source: Any = None
    n_obs: int = 0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    precision: str = "fp32"

    def chunk_rows(self, k: int) -> tuple[int, int]:
        """Global rows ``start, stop`` of chunk ``k``."""
        start = k * self.chunk_size
        return start, min(self.n_obs, start + self.chunk_size)

    def pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """``(leaf source, local start, local stop)`` covering the global rows ``start:stop``."""
        if isinstance(self.source, ConcatSource):
            return self.source.pieces(start, stop)
        return [(0, start, stop)] if start < stop else []

    @torch.inference_mode()
    def embed_chunk(self, k: int, device: torch.device) -> tuple[np.ndarray, int]:
        """Embedding of chunk ``k`` (rows in order, NaN for skipped cells) and #skipped."""
        start, stop = self.chunk_rows(k)
        leaves = leaf_sources(self.source)
        parts, n_skipped = [], 0
        for i, lo, hi in self.pieces(start, stop):
            src = leaves[i]
            rows = np.arange(lo, hi, dtype=np.int64)
            block = src.read_rows(rows)
            totals = None
            if self.total_counts_key is not None:
                totals = src.obs[self.total_counts_key].to_numpy(dtype=np.float64)[lo:hi]
            emb, skipped = self.embed_block(block, self.col_to_vocab[i], src, rows, totals, device)
            parts.append(emb)
            n_skipped += skipped
        return (parts[0] if len(parts) == 1 else np.concatenate(parts)), n_skipped

    def embed_block(
        self,
        block: sp.csr_matrix,
        col_to_vocab: np.ndarray,
        src: RowSource,
        rows: np.ndarray,
        totals: np.ndarray | None,
        device: torch.device,
    ) -> tuple[np.ndarray, int]:
        """Embedding of the rows of an in-memory CSR block (one source's genes)."""
        obs_names = src.obs.index[rows]
        input_type = self.spec.input_type
        stats = scan_cells(
            block, col_to_vocab, input_type=input_type, obs_names=obs_names,
            var_names=src.var.index,
        )  # fmt: skip
        if totals is not None:
            bad = ~np.isfinite(totals) | (totals < 1)
            if bad.any():
                raise ValueError(
                    f"{src.name}: obs[{self.total_counts_key!r}] must hold total counts >= 1; "
                    f"{int(bad.sum())} cells do not (e.g. {list(obs_names[bad][:3])})."
                )
            if input_type == "log1p":
                stats = CellStats(totals, stats.n_tokens, stats.count_fraction)
        bad = invalid_cells(stats, input_type)
        if bad.size and self.invalid == "raise":
            raise ValueError(f"{src.name}: " + invalid_cells_message(bad, obs_names, stats))
        if bad.size:
            logger.warning(
                "%s: skipping %d cells with fewer than 2 in-vocabulary counts (NaN rows): %s.",
                src.name,
                bad.size,
                skipped_examples(obs_names, bad),
            )
        n = block.shape[0]
        cells = np.setdiff1d(np.arange(n), bad) if bad.size else np.arange(n)
        out = torch.full((n, self.width), float("nan"), dtype=torch.float32, device=device)
        if cells.size:
            module, dtype = module_for_precision(
                self.module.to(device).eval(), self.precision, device
            )
            use_autocast = dtype or (
                self.precision == "fp32"
                and device.type == "cuda"
                and (self.autocast is None or self.autocast)
            )
            batches = iter_inference_batches(
                block,
                col_to_vocab,
                stats.n_tokens,
                self.spec,
                TokenIndex(self.n_genes),
                cells=cells,
                total_counts=totals,
                batch_size=self.batch_size,
                max_tokens=self.max_tokens,
                chunk_size=max(n, 1),
            )
            for batch in batches:
                idx = torch.from_numpy(batch.cells).to(device, non_blocking=True)
                out[idx] = encode_pooled(module, batch.tokens, device, self.pooling, use_autocast)
        # One device-to-host copy per chunk, none per batch.
        return out.cpu().numpy(), int(bad.size)
