"""The encoder pass: pooled cell embeddings of checked input, batched under a token budget."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from scxtrimo._settings import settings
from scxtrimo.data._loading import iter_inference_batches
from scxtrimo.data._tokens import TokenIndex

from ._precision import Precision, module_for_precision
from ._prepare import Pooling, PreparedInput, is_oom, resolve_device

if TYPE_CHECKING:
    from scxtrimo.module import XTrimoGeneModule

logger = logging.getLogger("scxtrimo")


@torch.inference_mode()
def embed_prepared(
    module: XTrimoGeneModule,
    prep: PreparedInput,
    *,
    batch_size: int | None = None,
    pooling: Pooling = "all",
    max_tokens: int = 16_384,
    device: str | torch.device | None = None,
    autocast: bool | None = None,
    progress_bar: bool | None = None,
    rows: np.ndarray | None = None,
    precision: Precision = "fp32",
) -> np.ndarray:
    """Cell embeddings of checked input: the encoder pass and pooling, never the decoder.

    Cells are sorted into length buckets and batched under the ``max_tokens`` budget; a batch
    that runs out of memory is retried in halves. Memory follows the cells embedded, not
    ``n_obs``. :meth:`~scxtrimo.model.XTrimoGene.get_latent_representation` and the tools run
    through here.

    Parameters
    ----------
    module
        The network (``model.module``); moved to ``device`` and set to eval mode.
    prep
        Checked input, from :func:`prepare_input`.
    batch_size
        Maximum cells per batch; ``None`` lets ``max_tokens`` decide.
    pooling
        ``"all"`` (``[h(S), h(T), max, mean]``, 4 x encoder width), ``"max"`` or ``"mean"``.
    max_tokens
        Token budget per batch (memory bound).
    device
        Where to compute; default: where the module's weights are.
    autocast
        bf16 autocast on CUDA with ``precision="fp32"`` (default on CUDA: True; ignored on
        CPU).
    progress_bar
        Show a progress bar (default ``scxtrimo.settings.progress_bar``).
    rows
        Rows of the AnnData to return, in that order (default: every row).
    precision
        ``"fp32"``; ``"bf16"`` (autocast, CPU and CUDA); ``"int8"`` (CPU: the encoder's linear
        layers in int8 with dynamically quantised activations, on a cached copy of the module;
        ``module`` itself is not changed). Refused with a clear error where the hardware lacks
        it; see :func:`~scxtrimo.inference.check_precision`.

    Returns
    -------
    ``float32`` array with one row per entry of ``rows``; NaN for rows not in ``prep.cells``
    (skipped cells).
    """
    if pooling not in ("all", "max", "mean"):
        raise ValueError(f"pooling must be 'all', 'max' or 'mean', not {pooling!r}.")
    dev = resolve_device(module, device)
    module = module.to(dev).eval()
    run, dtype = module_for_precision(module, precision, dev)
    width = module.embedding_width(pooling)
    unique_cells = np.unique(prep.cells)
    by_cell = np.empty((len(unique_cells), width), dtype=np.float32)
    use_autocast = dtype or (
        precision == "fp32" and dev.type == "cuda" and (autocast is None or autocast)
    )
    show = settings.progress_bar if progress_bar is None else progress_bar

    batches = iter_inference_batches(
        prep.matrix,
        prep.mapping.col_to_vocab,
        prep.stats.n_tokens,
        prep.spec,
        TokenIndex(module.config.n_genes),
        cells=unique_cells,
        total_counts=prep.total_counts,
        batch_size=batch_size,
        max_tokens=max_tokens,
    )
    with tqdm(
        total=len(unique_cells), desc="Embedding cells", unit="cell", disable=not show
    ) as bar:
        for batch in batches:
            z = encode_pooled(run, batch.tokens, dev, pooling, use_autocast)
            by_cell[np.searchsorted(unique_cells, batch.cells)] = z.cpu().numpy()
            bar.update(len(batch.cells))
    rows = np.arange(prep.matrix.shape[0]) if rows is None else np.asarray(rows, np.int64)
    if np.array_equal(rows, unique_cells):
        return by_cell  # every row embedded, in order: no second copy
    position = np.searchsorted(unique_cells, rows)
    found = position < len(unique_cells)
    found[found] = unique_cells[position[found]] == rows[found]
    out = np.full((len(rows), width), np.nan, dtype=np.float32)
    out[found] = by_cell[position[found]]
    return out


def encode_pooled(
    module: XTrimoGeneModule,
    tokens: dict[str, np.ndarray],
    device: torch.device,
    pooling: str,
    use_autocast: bool | torch.dtype,
) -> torch.Tensor:
    """Pooled float32 embeddings of one batch of encoder tokens, left on ``device``.

    A batch that runs out of memory is retried in halves (down to single cells); both
    :func:`embed_prepared` and the chunks of :func:`~scxtrimo.tl.embed_to_store` embed
    through here. ``tokens`` are the arrays of ``data._loading.iter_inference_batches``'s
    batches; ``pooling`` is as in :func:`embed_prepared`. ``use_autocast``: ``True`` (bf16),
    an autocast dtype, or ``False``.
    """
    try:
        batch = {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in tokens.items()}
        dtype = use_autocast if isinstance(use_autocast, torch.dtype) else torch.bfloat16
        with torch.autocast(device.type, dtype=dtype, enabled=bool(use_autocast)):
            h = module.encode(batch["gene_index"], batch["value"], batch["padding_mask"])
            z = module.cell_embedding(h, batch["padding_mask"], pooling)
        return z.float()
    except (RuntimeError, torch.OutOfMemoryError) as err:
        n = tokens["gene_index"].shape[0]
        if not is_oom(err) or n == 1:
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        logger.warning("Out of memory on a batch of %d cells; retrying in halves.", n)
        half = n // 2
        first = {k: v[:half] for k, v in tokens.items()}
        second = {k: v[half:] for k, v in tokens.items()}
        return torch.cat(
            [
                encode_pooled(module, first, device, pooling, use_autocast),
                encode_pooled(module, second, device, pooling, use_autocast),
            ]
        )
