"""Checked input: every check of an AnnData before any model work, and the engine's settings checks."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from anndata import AnnData

from scxtrimo._settings import settings
from scxtrimo.data._matrix import get_matrix
from scxtrimo.data._tokens import InputSpec, TargetDepth
from scxtrimo.data._validation import CellStats, invalid_cells, invalid_cells_message, scan_cells
from scxtrimo.data._vocabulary import GeneMapping, load_vocabulary, log_overlap, map_genes

from ._input import InputSettings

logger = logging.getLogger("scxtrimo")

Pooling = Literal["all", "max", "mean"]
InvalidCells = Literal["raise", "skip"]


@dataclass
class PreparedInput:
    """A validated AnnData, ready to be streamed through the model.

    Returned by :func:`prepare_input` (and :meth:`~scxtrimo.model.XTrimoGene.prepare_input`),
    which runs every input check once, before any model work; the tools (:func:`~scxtrimo.tl.embed`,
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

    def with_cells(self, cells: Sequence[int] | np.ndarray) -> PreparedInput:
        """The same checked input for the rows ``cells`` (in that order); nothing is re-checked."""
        return dataclasses.replace(self, cells=np.asarray(cells, dtype=np.int64))


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
    """Check the arguments of :meth:`~scxtrimo.model.XTrimoGene.setup_anndata` on ``adata``."""
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


def skipped_examples(obs_names: Any, rows: np.ndarray, k: int = 5) -> str:
    """The first ``k`` of ``obs_names[rows]``, quoted, and how many more (for warnings)."""
    shown = ", ".join(repr(str(n)) for n in np.asarray(obs_names)[rows[:k]])
    return shown + (f" and {len(rows) - k:,} more" if len(rows) > k else "")


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
    input_settings: InputSettings | None = None,
    *,
    n_genes: int,
    target_depth: float | str | TargetDepth = "fold:1",
    max_genes: int | Literal["all"] | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
    invalid: InvalidCells = "raise",
    min_overlap: float = 0.5,
) -> PreparedInput:
    """Check ``adata`` for a model on ``n_genes`` genes and work out how to stream it.

    The engine's own entry point; :meth:`~scxtrimo.model.XTrimoGene.prepare_input` calls it with
    the model's settings and defaults. Its warnings are raised at ``stacklevel=4``: the user's
    line when a tool calls the model's method, which calls this function.

    Parameters
    ----------
    adata
        Any AnnData with the model's kind of input; not modified.
    input_settings
        How to read it (:class:`InputSettings`, merged with the caller's changes); ``None``:
        the defaults.
    n_genes
        The module's vocabulary size (``module.config.n_genes``).
    target_depth
        ``T``; see :class:`~scxtrimo.data.TargetDepth`.
    max_genes
        Cap on gene tokens per cell (highest values kept); ``None`` or ``"all"``: no cap.
    indices
        Cells to use (default all).
    invalid
        Cells with fewer than 2 in-vocabulary counts: ``"raise"`` or ``"skip"`` them.
    min_overlap
        Minimum share of genes that must map to the vocabulary.

    Returns
    -------
    The checked input.
    """
    args = (input_settings or InputSettings()).to_dict()
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
        logger.warning(
            "Skipping %d cells with fewer than 2 in-vocabulary counts (their embedding rows are "
            "NaN): %s.",
            bad.size,
            skipped_examples(adata.obs_names, bad),
        )
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
        target_depth=TargetDepth.parse(target_depth),
        max_genes=resolve_max_genes(max_genes, None),
        scale=scale,
    )
    return PreparedInput(matrix, mapping, stats, spec, cells, bad, total_counts)
