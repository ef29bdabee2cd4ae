"""The inference engine: checked input, token-budget batches and the encoder/decoder passes."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from tqdm.auto import tqdm

from scxtrimo._settings import settings
from scxtrimo.data._loading import iter_inference_batches
from scxtrimo.data._matrix import as_row_accessible, get_matrix, read_rows
from scxtrimo.data._tokens import InputSpec, TargetDepth, TokenIndex, inference_batch
from scxtrimo.data._validation import CellStats, invalid_cells, invalid_cells_message, scan_cells
from scxtrimo.data._vocabulary import GeneMapping, load_vocabulary, log_overlap, map_genes
from scxtrimo.module import XTrimoGeneModule

logger = logging.getLogger("scxtrimo")

Pooling = Literal["all", "max", "mean"]
InvalidCells = Literal["raise", "skip"]
DecoderOutput = Literal["embeddings", "expression"]

# How a model reads an AnnData when it was set up without saying otherwise.
SETUP_DEFAULTS = {
    "layer": None,
    "gene_symbols_key": None,
    "gene_ids_key": None,
    "input_type": "counts",
    "total_counts_key": None,
}


@dataclass
class PreparedInput:
    """A validated AnnData, ready to be streamed through the model.

    Returned by :meth:`~scxtrimo.model.XTrimoGene.prepare_input`, which runs every input check
    once, before any model work; the tools (:func:`~scxtrimo.tl.embed`,
    :func:`~scxtrimo.tl.annotate`...) then stream the cells through the network. Inspect it to
    see what a call would use (which cells, which genes, at which target depth) without running
    the model.

    Attributes
    ----------
    matrix
        The cells x genes matrix read (``X`` or the layer), in memory or backed; not a copy.
    mapping
        How the AnnData's genes map onto the model vocabulary, from
        :func:`~scxtrimo.data.map_genes`.
    stats
        Per-cell totals and token counts, from :func:`~scxtrimo.data.scan_cells` (for
        log-normalised input with ``total_counts_key``, the totals are the given ones).
    spec
        How values become tokens: input type, target depth ``T``, ``max_genes``, scale.
    cells
        Rows of the AnnData to stream, in the requested order, without the skipped ones.
    skipped
        Rows left out because the model cannot embed them (see
        :func:`~scxtrimo.data.invalid_cells`); empty unless ``invalid="skip"``.
    total_counts
        Per-cell total counts from ``obs[total_counts_key]``, or ``None``.
    """

    matrix: Any
    mapping: GeneMapping
    stats: CellStats
    spec: InputSpec
    cells: np.ndarray
    skipped: np.ndarray
    total_counts: np.ndarray | None


# ----------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------


def check_max_genes(value: int | None) -> int | None:
    """``value`` as a positive ``int`` cap on gene tokens, or ``None`` (no cap)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"max_genes must be a positive integer, None or 'all'; got {value!r}.")
    return int(value)


def resolve_max_genes(max_genes: int | Literal["all"] | None, default: int | None) -> int | None:
    """The cap a call uses: ``None`` means the model's ``default``, ``"all"`` means no cap."""
    if max_genes is None:
        return default
    if isinstance(max_genes, str):
        if max_genes != "all":
            raise ValueError(
                f"max_genes must be a positive integer, None or 'all'; got {max_genes!r}."
            )
        return None
    return check_max_genes(max_genes)


def resolve_device(module: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    """Where to compute: ``device`` if given, else where the module's weights are."""
    if device is None:
        return next(module.parameters()).device
    return settings.resolve_device(str(device))


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory error (CUDA raises it as a plain RuntimeError too)."""
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ----------------------------------------------------------------------------------------
# Input preparation
# ----------------------------------------------------------------------------------------


def check_setup_arguments(
    adata: AnnData,
    *,
    batch_key: str | None,
    labels_key: str | None,
    input_type: str,
    total_counts_key: str | None,
) -> None:
    """Check the arguments of :meth:`XTrimoGene.setup_anndata` against ``adata``'s ``obs``."""
    if input_type not in ("counts", "log1p"):
        raise ValueError(f"input_type must be 'counts' or 'log1p', not {input_type!r}.")
    for key, what in (
        (batch_key, "batch_key"),
        (labels_key, "labels_key"),
        (total_counts_key, "total_counts_key"),
    ):
        if key is not None and key not in adata.obs.columns:
            raise KeyError(
                f"{what}={key!r} is not a column of adata.obs. Available columns: "
                f"{list(adata.obs.columns) or 'none'}."
            )
    if labels_key is not None and adata.obs[labels_key].isna().any():
        n_missing = int(adata.obs[labels_key].isna().sum())
        raise ValueError(
            f"obs[{labels_key!r}] has {n_missing} missing labels. Fine-tune on the labelled "
            f"cells only (adata[adata.obs[{labels_key!r}].notna()].copy()) or give them a "
            "category of their own."
        )
    if input_type == "counts" and total_counts_key is not None:
        raise ValueError(
            "total_counts_key is only used with input_type='log1p'; with raw counts the "
            "depth is the sum of the counts on vocabulary genes."
        )


def _read_total_counts(adata: AnnData, key: str) -> np.ndarray:
    if key not in adata.obs.columns:
        raise KeyError(f"total_counts_key={key!r} is not a column of adata.obs.")
    total_counts = adata.obs[key].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(total_counts) | (total_counts < 1)
    if bad.any():
        raise ValueError(
            f"obs[{key!r}] must hold total counts >= 1; {int(bad.sum())} cells do not "
            f"(e.g. {list(adata.obs_names[bad][:3])})."
        )
    return total_counts


def prepare_input(
    adata: AnnData,
    setup_args: Mapping[str, Any],
    setup_overrides: Mapping[str, Any],
    *,
    n_genes: int,
    default_target_depth: float | str | TargetDepth,
    default_max_genes: int | None,
    indices: Sequence[int] | np.ndarray | None = None,
    target_depth: float | str | TargetDepth | None = None,
    max_genes: int | Literal["all"] | None = None,
    invalid: InvalidCells = "raise",
    min_overlap: float = 0.5,
) -> PreparedInput:
    """Check ``adata`` for a model on ``n_genes`` genes; see :meth:`XTrimoGene.prepare_input`.

    ``setup_args`` are how the model reads an AnnData, ``setup_overrides`` the caller's changes
    to them (``None`` values keep the model's).
    """
    unknown = set(setup_overrides) - set(SETUP_DEFAULTS)
    if unknown:
        raise TypeError(f"Unexpected arguments: {sorted(unknown)}.")
    args = dict(setup_args)
    args.update({k: v for k, v in setup_overrides.items() if v is not None})
    if invalid not in ("raise", "skip"):
        raise ValueError(f"invalid_cells must be 'raise' or 'skip', not {invalid!r}.")
    vocab = load_vocabulary()
    if n_genes != vocab.n_genes:
        raise ValueError(
            f"This model has {n_genes} genes but the vocabulary has "
            f"{vocab.n_genes}; only models on the scFoundation vocabulary can read AnnData."
        )
    matrix = get_matrix(adata, args["layer"])
    mapping = map_genes(
        adata.var,
        gene_symbols_key=args["gene_symbols_key"],
        gene_ids_key=args["gene_ids_key"],
        min_overlap=min_overlap,
    )
    total_counts = None
    if args["total_counts_key"] is not None:
        total_counts = _read_total_counts(adata, args["total_counts_key"])
    n_obs = adata.n_obs
    cells = np.arange(n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
    if cells.size and (cells.min() < 0 or cells.max() >= n_obs):
        raise IndexError(f"indices must be in [0, {n_obs}); got {cells.min()}..{cells.max()}.")
    stats = scan_cells(
        matrix,
        mapping.col_to_vocab,
        input_type=args["input_type"],
        obs_names=adata.obs_names,
        var_names=adata.var_names,
        rows=None if indices is None else cells,
    )
    log_overlap(mapping, stats.count_fraction, stacklevel=4)  # past XTrimoGene.prepare_input
    if total_counts is not None and args["input_type"] == "log1p":
        # S comes from the given totals, so validity is judged on them.
        stats = CellStats(total_counts, stats.n_tokens, stats.count_fraction)
    bad = np.intersect1d(invalid_cells(stats, args["input_type"]), cells)
    if bad.size and invalid == "raise":
        raise ValueError(invalid_cells_message(bad, adata.obs_names, stats))
    if bad.size:
        logger.warning("Skipping %d cells with fewer than 2 in-vocabulary counts.", bad.size)
        cells = cells[~np.isin(cells, bad)]
    if args["input_type"] == "log1p" and total_counts is None:
        warnings.warn(
            "Log-normalised input without total_counts_key: S is set to log10 of the sum of "
            "the given values, as the official scFoundation code does; that is not the "
            "cell's read depth. Pass total_counts_key=<obs column of total counts> for "
            "depth-aware embeddings.",
            UserWarning,
            stacklevel=4,  # past XTrimoGene.prepare_input and the tool: the user's line
        )
    scale = 1e4
    if args["input_type"] == "bulk":
        # Official bulk rule: every sample scaled to the median library size of the data.
        scale = float(np.median(stats.totals))
    spec = InputSpec(
        input_type=args["input_type"],
        target_depth=TargetDepth.parse(
            default_target_depth if target_depth is None else target_depth
        ),
        max_genes=resolve_max_genes(max_genes, default_max_genes),
        scale=scale,
    )
    return PreparedInput(matrix, mapping, stats, spec, cells, bad, total_counts)


# ----------------------------------------------------------------------------------------
# Encoder: cell embeddings
# ----------------------------------------------------------------------------------------


@torch.inference_mode()
def latent_from_prepared(
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
) -> np.ndarray:
    """Embeddings of ``prep.cells`` at ``rows`` (default: every row of the AnnData).

    Cells are batched under the ``max_tokens`` budget; a batch that runs out of memory is
    retried in halves. The result has one row per entry of ``rows``, NaN for rows that are not
    in ``prep.cells`` (skipped cells). Memory follows the cells embedded, not ``n_obs``.
    """
    if pooling not in ("all", "max", "mean"):
        raise ValueError(f"pooling must be 'all', 'max' or 'mean', not {pooling!r}.")
    dev = resolve_device(module, device)
    module = module.to(dev).eval()
    width = (4 if pooling == "all" else 1) * module.config.encoder_dim
    unique_cells = np.unique(prep.cells)
    by_cell = np.empty((len(unique_cells), width), dtype=np.float32)
    use_autocast = dev.type == "cuda" and (autocast is None or autocast)
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
            z = encode_pooled(module, batch.tokens, dev, pooling, use_autocast)
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
    use_autocast: bool,
) -> torch.Tensor:
    """Pooled float32 embeddings of one batch of encoder tokens, left on ``device``.

    A batch that runs out of memory is retried in halves (down to single cells); both
    :func:`latent_from_prepared` and the chunks of ``tl.embed_to_store`` embed through here.
    """
    try:
        batch = {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in tokens.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            h = module.encode(batch["gene_index"], batch["value"], batch["padding_mask"])
            z = module.pool(h, batch["padding_mask"], pooling)
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


# ----------------------------------------------------------------------------------------
# Decoder: gene embeddings and predicted expression
# ----------------------------------------------------------------------------------------


def gene_embedding_table(
    module: XTrimoGeneModule, genes: Sequence[str] | None = None
) -> pd.DataFrame:
    """The context-free gene embeddings, one row per vocabulary gene (or per ``genes``)."""
    vocab = load_vocabulary()
    weight = module.gene_embedding_table().detach().float().cpu().numpy()
    frame = pd.DataFrame(weight[: vocab.n_genes], index=vocab.symbols.copy())
    return frame if genes is None else frame.loc[list(genes)]


def vocabulary_positions(genes: Sequence[str] | None) -> np.ndarray:
    """Vocabulary positions of the gene symbols ``genes`` (default: every vocabulary gene)."""
    vocab = load_vocabulary()
    if genes is None:
        return np.arange(vocab.n_genes)
    lookup = pd.Series(np.arange(vocab.n_genes), index=vocab.symbols)
    missing = [g for g in genes if g not in lookup.index]
    if missing:
        raise KeyError(f"{len(missing)} genes are not in the vocabulary, e.g. {missing[:5]}.")
    return lookup.loc[list(genes)].to_numpy()


@torch.inference_mode()
def iter_decoder(
    module: XTrimoGeneModule,
    prep: PreparedInput,
    *,
    output: DecoderOutput,
    gene_positions: np.ndarray,
    batch_size: int,
    key_stabilizer: Literal["cell", "batch"] = "cell",
    device: str | torch.device | None = None,
    progress_bar: bool | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Run encoder + decoder over ``prep.cells`` in their order, ``batch_size`` cells at a time.

    Yields ``(cells, values)``: the decoder's ``output`` at the vocabulary ``gene_positions``
    for each cell of the chunk, ``[cells, genes, d]`` (embeddings) or ``[cells, genes]``.
    """
    dev = resolve_device(module, device)
    module = module.to(dev).eval()
    genes_t = torch.as_tensor(gene_positions, dtype=torch.int64, device=dev)
    index = TokenIndex(module.config.n_genes)
    show = settings.progress_bar if progress_bar is None else progress_bar
    matrix = as_row_accessible(prep.matrix)
    cells = prep.cells
    decode = module.gene_embeddings if output == "embeddings" else module.expression
    with tqdm(total=len(cells), desc="Decoding cells", unit="cell", disable=not show) as bar:
        for start in range(0, len(cells), batch_size):
            chunk = cells[start : start + batch_size]
            # Read the chunk's rows in file order (one contiguous read), then restore its order.
            order = np.argsort(chunk)
            rows = chunk[order]
            block = read_rows(matrix, int(rows[0]), int(rows[-1]) + 1)
            totals = None if prep.total_counts is None else prep.total_counts[chunk]
            tokens = inference_batch(
                block,
                rows - rows[0],
                prep.mapping.col_to_vocab,
                prep.spec,
                index,
                None if totals is None else totals[order],
            )
            batch = {k: torch.from_numpy(v).to(dev) for k, v in tokens.items()}
            h = module.encode(batch["gene_index"], batch["value"], batch["padding_mask"])
            out = decode(
                h,
                batch["gene_index"],
                batch["padding_mask"],
                key_stabilizer=key_stabilizer,
                genes=genes_t,
            )
            restore = np.empty_like(order)
            restore[order] = np.arange(len(order))
            yield chunk, out.float().cpu().numpy()[restore]
            bar.update(len(chunk))
