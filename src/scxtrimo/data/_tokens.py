"""Turn CSR rows into model inputs: encoder tokens, read-depth tokens and pretraining masks.

Everything here works on one batch of rows at a time and delegates the per-entry work to the
numba kernels in :mod:`scxtrimo.data._kernels`; numpy is only used for per-row vectors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse as sp

from scxtrimo.data import _kernels

# Batches are small (tens of cells): the serial kernels are as fast as the parallel ones there,
# skip OpenMP's thread wake-ups, and stay safe in forked DataLoader workers (a process that has
# run an OpenMP-parallel numba kernel aborts in forked children that run one).
gather_csr_rows = _kernels.gather_csr_rows_serial
log_normalize = _kernels.log_normalize_serial
pack_tokens = _kernels.pack_tokens_serial
binomial_thin = _kernels.binomial_thin_serial
mask_positions = _kernels.mask_positions_serial
lookup_values = _kernels.lookup_values_serial
row_sums = _kernels.row_sums
ragged_to_padded = _kernels.ragged_to_padded

InputType = Literal["counts", "log1p", "bulk"]
NORMALIZE_SCALE = 1e4

_TARGET_DEPTH_RE = re.compile(
    r"^\s*(?:(?P<official>[tfa])(?P<official_value>[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)"
    r"|(?P<kind>absolute|fold|add)\s*:\s*(?P<value>[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?))\s*$"
)
_OFFICIAL_KIND = {"t": "absolute", "f": "fold", "a": "add"}


@dataclass(frozen=True)
class TargetDepth:
    """The target read depth given to the model through the ``T`` token.

    ``T`` tells the model at which sequencing depth (``log10`` of total counts) to represent the
    cell; the ``S`` token always carries the cell's own depth. ``T > S`` asks the model for an
    enhanced, deeper version of a shallow cell (scFoundation's read-depth enhancement).

    Parameters
    ----------
    kind
        ``"absolute"``: ``T = value`` (``log10`` counts, e.g. 4.0 = 10,000 counts; official
        ``t4``); ``"fold"``: ``T = log10(total * value)`` (official ``f2``: twice the cell's
        depth; ``fold:1`` = the cell's own depth); ``"add"``: ``T = log10(total) + value``
        (official ``a5``).
    value
        The number that goes with ``kind``.
    """

    kind: Literal["absolute", "fold", "add"]
    value: float

    def __post_init__(self) -> None:
        if self.kind not in ("absolute", "fold", "add"):
            raise ValueError(f"Unknown target-depth kind {self.kind!r}.")
        if not np.isfinite(self.value):
            raise ValueError(f"The target depth must be finite, got {self.value}.")
        if self.kind == "fold" and self.value <= 0:
            raise ValueError(f"A fold target depth must be > 0, got {self.value}.")

    @classmethod
    def parse(cls, spec: TargetDepth | float | str) -> TargetDepth:
        """Parse ``4.0``, ``"t4"``, ``"f2"``, ``"a5"``, ``"fold:2"``, ``"add:5"`` or ``"absolute:4"``."""
        if isinstance(spec, TargetDepth):
            return spec
        if isinstance(spec, bool):
            raise TypeError("target_depth must be a number or a string such as 't4', not a bool.")
        if isinstance(spec, int | float | np.floating | np.integer):
            return cls("absolute", float(spec))
        if isinstance(spec, str):
            m = _TARGET_DEPTH_RE.match(spec)
            if m is not None:
                if m["official"]:
                    return cls(_OFFICIAL_KIND[m["official"]], float(m["official_value"]))
                return cls(m["kind"], float(m["value"]))  # type: ignore[arg-type]
        raise ValueError(
            f"Cannot read target_depth={spec!r}. Use a number (log10 counts, e.g. 4.0), "
            "'fold:N' / 'fN' (N times the cell's depth), 'add:N' / 'aN' (log10 depth + N) or "
            "'absolute:N' / 'tN'."
        )

    def official(self) -> str:
        """The equivalent official ``--tgthighres`` string."""
        letter = {"absolute": "t", "fold": "f", "add": "a"}[self.kind]
        return f"{letter}{self.value:g}"

    def __call__(self, totals: np.ndarray) -> np.ndarray:
        """``T`` for cells with the given total counts (float64)."""
        totals = np.asarray(totals, dtype=np.float64)
        if self.kind == "absolute":
            return np.full(totals.shape, self.value, dtype=np.float64)
        if self.kind == "fold":
            return np.log10(totals * self.value)
        return np.log10(totals) + self.value


@dataclass(frozen=True)
class InputSpec:
    """How the values of a matrix become model inputs.

    Parameters
    ----------
    input_type
        ``"counts"``: raw counts, normalised here as ``log1p(x / total * 1e4)`` with ``total`` =
        the sum over vocabulary genes, ``S = log10(total)``. ``"log1p"``: already
        log-normalised values, used as given; ``S`` is ``log10`` of the cell's total counts when
        they are supplied, otherwise ``log10`` of the sum of the given values (the official
        ``pre_normalized=T`` behaviour, which is not a read depth; kept for compatibility).
        ``"bulk"``: bulk expression profiles (official ``--input_type bulk``): each sample is
        scaled to ``scale`` total (the median library size of the dataset) and ``log1p``-ed,
        and ``T = S = log10`` of the sum of those values; ``target_depth`` is ignored.
    target_depth
        How ``T`` is set; see :class:`TargetDepth`.
    max_genes
        Cap on the number of gene tokens per cell (the cell's highest values are kept);
        ``None`` for no cap.
    scale
        Library size that counts are normalised to (``1e4`` for single cells).
    """

    input_type: InputType = "counts"
    target_depth: TargetDepth = field(default_factory=lambda: TargetDepth("absolute", 4.0))
    max_genes: int | None = None
    scale: float = NORMALIZE_SCALE

    def __post_init__(self) -> None:
        if self.input_type not in ("counts", "log1p", "bulk"):
            raise ValueError(
                f"input_type must be 'counts', 'log1p' or 'bulk', not {self.input_type!r}."
            )
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive number, got {self.scale}.")
        if self.max_genes is not None and self.max_genes < 1:
            raise ValueError(f"max_genes must be >= 1 or None, got {self.max_genes}.")


@dataclass(frozen=True)
class TokenIndex:
    """Special gene indices of a model with ``n_genes`` vocabulary genes."""

    n_genes: int

    @property
    def t(self) -> int:
        """Gene index of the target-depth token T."""
        return self.n_genes

    @property
    def s(self) -> int:
        """Gene index of the source-depth token S."""
        return self.n_genes + 1

    @property
    def pad(self) -> int:
        """Gene index of padding positions."""
        return self.n_genes + 2


def csr_arrays(matrix: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR arrays of ``matrix`` in dtypes the kernels take (float16 becomes float32)."""
    data = matrix.data
    if data.dtype == np.float16 or data.dtype == np.bool_:
        data = data.astype(np.float32)
    return matrix.indptr, matrix.indices, data


def gather_values(
    matrix: sp.csr_matrix,
    rows: np.ndarray,
    col_to_vocab: np.ndarray,
    spec: InputSpec,
    total_counts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gather rows into ragged (gene, normalised value) lists and their depth.

    Returns
    -------
    row_ptr, genes, values, totals
        Ragged rows sorted by gene, log-normalised float64 values, and the per-cell total used
        for ``S`` (in-vocabulary counts; or ``total_counts`` / sum of values for ``log1p``).
    """
    indptr, indices, data = csr_arrays(matrix)
    row_ptr, genes, raw = gather_csr_rows(
        indptr, indices, data, col_to_vocab, np.ascontiguousarray(rows, dtype=np.int64)
    )
    if spec.input_type == "counts":
        totals = row_sums(row_ptr, raw)
        values = log_normalize(row_ptr, raw, totals, spec.scale)
    elif spec.input_type == "bulk":
        values = log_normalize(row_ptr, raw, row_sums(row_ptr, raw), spec.scale)
        totals = row_sums(row_ptr, values)  # official: depth tokens from the log values
    else:
        values = raw
        totals = (
            np.asarray(total_counts, dtype=np.float64)
            if total_counts is not None
            else row_sums(row_ptr, raw)
        )
    return row_ptr, genes, values, totals


def encoder_tokens(
    row_ptr: np.ndarray,
    genes: np.ndarray,
    values: np.ndarray,
    totals: np.ndarray,
    spec: InputSpec,
    index: TokenIndex,
) -> dict[str, np.ndarray]:
    """Pack ragged rows into the padded encoder input ``[T, S, genes…, pad…]``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.log10(totals)
        t = s if spec.input_type == "bulk" else spec.target_depth(totals)
    gene_index, value, padding_mask = pack_tokens(
        row_ptr,
        genes,
        values,
        t,
        s,
        index.t,
        index.s,
        index.pad,
        -1 if spec.max_genes is None else int(spec.max_genes),
    )
    return {"gene_index": gene_index, "value": value, "padding_mask": padding_mask}


def inference_batch(
    matrix: sp.csr_matrix,
    rows: np.ndarray,
    col_to_vocab: np.ndarray,
    spec: InputSpec,
    index: TokenIndex,
    total_counts: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Encoder tokens for ``rows`` of ``matrix`` (local row numbers)."""
    ragged = gather_values(matrix, rows, col_to_vocab, spec, total_counts)
    return encoder_tokens(*ragged, spec, index)


# --------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskingSpec:
    """Masked-regression and read-depth-aware pretraining settings (scFoundation defaults).

    Parameters
    ----------
    nonzero_prob
        Share of a cell's non-zero genes that are masked (hidden from the encoder, predicted).
    zero_prob
        Share of a cell's zero genes that are masked and must be predicted as (near) zero.
    replace_prob, random_prob
        BERT-style split of the masked positions' decoder input: the mask embedding, a random
        non-zero value of the same cell, or (the rest) the unchanged value.
    downsample_prob
        Share of cells whose counts are binomially down-sampled (read-depth-aware pretraining):
        the input gets the lower depth ``S``, ``T`` keeps the original depth and the targets are
        the original, full-depth values.
    min_rate, min_counts
        Down-sampling rates are drawn log-uniformly from ``[max(min_rate, min_counts / total), 1]``.
    """

    nonzero_prob: float = 0.3
    zero_prob: float = 0.03
    replace_prob: float = 0.8
    random_prob: float = 0.1
    downsample_prob: float = 0.5
    min_rate: float = 0.05
    min_counts: float = 200.0

    def __post_init__(self) -> None:
        for name in ("nonzero_prob", "zero_prob", "replace_prob", "random_prob", "downsample_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}.")
        if self.replace_prob + self.random_prob > 1.0:
            raise ValueError("replace_prob + random_prob must be <= 1.")
        if not 0.0 < self.min_rate <= 1.0:
            raise ValueError(f"min_rate must be in (0, 1], got {self.min_rate}.")


def row_seeds(seed: int, epoch: int, cells: np.ndarray, stream: int = 0) -> np.ndarray:
    """Per-cell seeds that depend only on (seed, epoch, cell, stream), never on batch layout."""
    x = np.asarray(cells, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x ^= np.uint64((seed * 1_000_003 + epoch * 7_919 + stream * 104_729) & 0xFFFFFFFFFFFFFFFF)
    # splitmix64 finaliser: neighbouring cells get unrelated seeds.
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(1)).astype(np.int64)


def _uniform(seeds: np.ndarray) -> np.ndarray:
    """One uniform number in [0, 1) per seed."""
    return (seeds.astype(np.uint64) >> np.uint64(11)).astype(np.float64) / float(1 << 52)


def downsample_rates(totals: np.ndarray, seeds: np.ndarray, spec: MaskingSpec) -> np.ndarray:
    """Binomial down-sampling rate per cell (1.0 for cells that are kept at full depth)."""
    picked = _uniform(seeds) < spec.downsample_prob
    low = np.clip(np.maximum(spec.min_rate, spec.min_counts / np.maximum(totals, 1.0)), None, 1.0)
    u = _uniform(row_seeds(0, 0, seeds, stream=1))
    rates = np.exp(np.log(low) * (1.0 - u))  # log-uniform in [low, 1]
    return np.where(picked, rates, 1.0)


def pretraining_batch(
    matrix: sp.csr_matrix,
    rows: np.ndarray,
    col_to_vocab: np.ndarray,
    index: TokenIndex,
    spec: MaskingSpec,
    seeds: np.ndarray,
    max_genes: int | None = None,
) -> dict[str, np.ndarray]:
    """One masked-regression pretraining batch from raw counts.

    Parameters
    ----------
    matrix
        Raw counts, CSR.
    rows
        Rows of ``matrix`` in the batch.
    col_to_vocab
        Column-to-vocabulary map.
    index
        Special token indices.
    spec
        Masking and down-sampling settings.
    seeds
        One ``int64`` seed per row. The random draws of a row (down-sampling, masking) depend
        only on its seed, never on the other rows of the batch;
        :class:`~scxtrimo.train.PretrainingDataset` derives the seeds from its seed, the epoch
        and the cell's index.
    max_genes
        Cap on visible gene tokens per cell.

    Returns
    -------
    The encoder tokens (``gene_index``, ``value``, ``padding_mask``) of the visible genes and the
    padded masked positions (``masked_index``, ``masked_value``, ``masked_token``,
    ``masked_pad``, ``target_value``, ``target_nonzero``), and ``visible_target``: the
    full-depth normalised value of each visible gene token (0 at T, S and padding).
    """
    indptr, indices, data = csr_arrays(matrix)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    ptr, genes, counts = gather_csr_rows(indptr, indices, data, col_to_vocab, rows)
    totals = row_sums(ptr, counts)
    target_values = log_normalize(ptr, counts, totals, NORMALIZE_SCALE)

    rates = downsample_rates(totals, seeds, spec)
    if np.any(rates < 1.0):
        in_ptr, in_genes, in_counts = binomial_thin(
            ptr, genes, counts, rates, row_seeds(0, 0, seeds, stream=2)
        )
        in_totals = row_sums(in_ptr, in_counts)
        # A cell thinned to nothing keeps its full depth rather than losing every token.
        empty = in_totals < 1
        if empty.any():
            rates = np.where(empty, 1.0, rates)
            in_ptr, in_genes, in_counts = binomial_thin(
                ptr, genes, counts, rates, row_seeds(0, 0, seeds, stream=2)
            )
            in_totals = row_sums(in_ptr, in_counts)
    else:
        in_ptr, in_genes, in_counts, in_totals = ptr, genes, counts, totals
    in_values = log_normalize(in_ptr, in_counts, in_totals, NORMALIZE_SCALE)

    visible, m_ptr, m_genes, m_input, m_token = mask_positions(
        in_ptr,
        in_genes,
        in_values,
        index.n_genes,
        spec.nonzero_prob,
        spec.zero_prob,
        spec.replace_prob,
        spec.random_prob,
        row_seeds(0, 0, seeds, stream=3),
    )
    m_target = lookup_values(ptr, genes, target_values, m_ptr, m_genes)

    # Keep only the visible non-zeros for the encoder.
    n = len(rows)
    row_of_entry = np.repeat(np.arange(n), np.diff(in_ptr))
    vis_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of_entry[visible], minlength=n), out=vis_ptr[1:])
    s = np.log10(in_totals)
    t = np.log10(totals)
    gene_index, value, padding_mask = pack_tokens(
        vis_ptr,
        in_genes[visible],
        in_values[visible],
        t,
        s,
        index.t,
        index.s,
        index.pad,
        -1 if max_genes is None else int(max_genes),
    )
    # Full-depth targets of the visible genes too (what a down-sampled cell should become).
    is_gene = ~padding_mask
    is_gene[:, :2] = False  # T and S
    q_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(is_gene.sum(axis=1), out=q_ptr[1:])
    visible_target = np.zeros(value.shape, dtype=np.float32)
    visible_target[is_gene] = lookup_values(ptr, genes, target_values, q_ptr, gene_index[is_gene])
    masked_index, valid = ragged_to_padded(m_ptr, m_genes.astype(np.int64), np.int64(0))
    masked_value, _ = ragged_to_padded(m_ptr, m_input, np.float32(0))
    masked_token, _ = ragged_to_padded(m_ptr, m_token, False)
    target, _ = ragged_to_padded(m_ptr, m_target.astype(np.float32), np.float32(0))
    return {
        "gene_index": gene_index,
        "value": value,
        "padding_mask": padding_mask,
        "masked_index": masked_index,
        "masked_value": masked_value,
        "masked_token": masked_token,
        "masked_pad": ~valid,
        "target_value": target,
        "target_nonzero": target > 0,
        "visible_target": visible_target,
    }
