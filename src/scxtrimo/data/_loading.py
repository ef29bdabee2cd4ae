"""Batches for inference: length buckets under a token budget, streamed over row chunks.

Cells are sorted by their number of gene tokens inside each chunk of rows, so a batch holds
cells of similar length and padding stays small; the batch size follows from a token budget,
so memory stays bounded whatever the cells' depth. Batches are built in a background thread
(the numba kernels release the GIL) while the model computes on the previous one.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._matrix import iter_row_chunks
from ._tokens import InputSpec, TokenIndex, inference_batch


def plan_batches(
    n_tokens: np.ndarray,
    *,
    batch_size: int | None = None,
    max_tokens: int = 16_384,
    max_padding: float = 1.25,
) -> list[np.ndarray]:
    """Split cells into length-sorted batches.

    Parameters
    ----------
    n_tokens
        Gene tokens per cell (the T and S tokens are added here).
    batch_size
        Fixed maximum number of cells per batch; ``None`` lets the token budget decide.
    max_tokens
        Budget of padded tokens (cells x longest cell) per batch; a single cell longer than the
        budget gets a batch of its own.
    max_padding
        Cap on a batch's padded tokens relative to its real tokens (1.25: at most 25% of the
        computed tokens are padding). Many cells of dense, similar lengths never reach it; few
        cells of very different lengths start a new batch instead of padding the short ones.

    Returns
    -------
    Arrays of positions into ``n_tokens``, each sorted by length; together a permutation.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not max_padding >= 1.0:
        raise ValueError(f"max_padding must be >= 1, got {max_padding}.")
    order = np.argsort(n_tokens, kind="stable")
    lengths = np.asarray(n_tokens, dtype=np.int64)[order] + 2
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:  # one iteration per batch, vectorised within
        # Lengths grow along `order`, so a batch's padded length is that of its last cell; the
        # batch is the longest prefix within the token budget and the padding cap.
        cap = max(1, min(n - start, max_tokens // int(lengths[start])))
        if batch_size is not None:
            cap = min(cap, batch_size)
        window = lengths[start : start + cap]
        padded = window * np.arange(1, len(window) + 1)
        fits = (padded <= max_tokens) & (padded <= max_padding * np.cumsum(window))
        stop = start + max(1, int(np.argmin(fits)) if not fits.all() else len(window))
        batches.append(order[start:stop])
        start = stop
    return batches


@dataclass
class InferenceBatch:
    """Encoder tokens for some cells, and where those cells are in the AnnData."""

    cells: np.ndarray
    tokens: dict[str, np.ndarray]


def iter_inference_batches(
    matrix: Any,
    col_to_vocab: np.ndarray,
    n_tokens: np.ndarray,
    spec: InputSpec,
    index: TokenIndex,
    *,
    cells: np.ndarray | None = None,
    total_counts: np.ndarray | None = None,
    batch_size: int | None = None,
    max_tokens: int = 16_384,
    chunk_size: int = 20_000,
    prefetch: bool = True,
) -> Iterator[InferenceBatch]:
    """Stream length-bucketed encoder batches over the rows of ``matrix``.

    Parameters
    ----------
    matrix
        Cells x genes (in memory or backed).
    col_to_vocab
        Column-to-vocabulary map.
    n_tokens
        Gene tokens per row of ``matrix`` (from :func:`~scxtrimo.data.scan_cells`).
    spec
        How values become tokens.
    index
        Special token indices.
    cells
        Rows to embed (default: all), in any order.
    total_counts
        Per-row totals for ``S`` when the input is log-normalised.
    batch_size, max_tokens
        See :func:`plan_batches`.
    chunk_size
        Rows read from disk at a time for backed or dense matrices.
    prefetch
        Build the next batch in a background thread.
    """
    n_obs = matrix.shape[0]
    wanted = np.ones(n_obs, dtype=bool) if cells is None else np.zeros(n_obs, dtype=bool)
    if cells is not None:
        wanted[np.asarray(cells, dtype=np.int64)] = True

    # Batches are planned on the tokens a cell will really have (its genes, capped).
    lengths = n_tokens if spec.max_genes is None else np.minimum(n_tokens, spec.max_genes)

    def jobs() -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
        for start, block in iter_row_chunks(matrix, chunk_size, wanted):
            stop = start + block.shape[0]
            local = np.flatnonzero(wanted[start:stop])
            if local.size == 0:
                continue
            for batch in plan_batches(
                lengths[start + local], batch_size=batch_size, max_tokens=max_tokens
            ):
                yield block, local[batch], start + local[batch]

    def build(job: tuple[Any, np.ndarray, np.ndarray]) -> InferenceBatch:
        block, rows, global_rows = job
        totals = None if total_counts is None else total_counts[global_rows]
        return InferenceBatch(
            cells=global_rows,
            tokens=inference_batch(block, rows, col_to_vocab, spec, index, totals),
        )

    if not prefetch:
        for job in jobs():
            yield build(job)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="scxtrimo-batches") as pool:
        pending = None
        for job in jobs():
            future = pool.submit(build, job)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()
