"""Checks on the input matrix that run before any model work starts.

One chunked pass over the matrix finds bad values (negative, NaN/inf, non-integer counts,
counts passed as log-normalised data) and computes what later steps need per cell: the total
of in-vocabulary counts (``S``), the number of gene tokens (for length bucketing) and the
share of counts that the vocabulary covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._matrix import iter_row_chunks

MIN_TOTAL_COUNTS = 2.0
#: Largest value accepted in one cell and gene: above it the matrix is not expression data.
MAX_VALUE = 1e9


@dataclass(frozen=True)
class CellStats:
    """Per-cell summaries from one pass over the matrix.

    Attributes
    ----------
    totals
        Sum of in-vocabulary values per cell (float64).
    n_tokens
        Number of in-vocabulary non-zero entries per cell (an upper bound of its gene tokens
        when several columns map to one gene).
    count_fraction
        Share of all values that fall on vocabulary genes.
    """

    totals: np.ndarray
    n_tokens: np.ndarray
    count_fraction: float


def _examples(names: pd.Index, idx: np.ndarray, k: int = 5) -> str:
    shown = ", ".join(repr(str(n)) for n in names[idx[:k]])
    return shown + (f" and {len(idx) - k:,} more" if len(idx) > k else "")


def scan_cells(
    matrix: Any,
    col_to_vocab: np.ndarray,
    *,
    input_type: str = "counts",
    obs_names: pd.Index | None = None,
    var_names: pd.Index | None = None,
    chunk_size: int = 10_000,
    rows: np.ndarray | None = None,
) -> CellStats:
    """Validate the matrix and compute per-cell totals and token counts.

    Parameters
    ----------
    matrix
        Cells x genes; dense, any scipy sparse format, or a backed anndata dataset.
    col_to_vocab
        Column-to-vocabulary map from :func:`~scxtrimo.data.map_genes`.
    input_type
        ``"counts"`` requires non-negative integers; ``"log1p"`` requires non-negative values
        and refuses matrices that are all integers (raw counts declared as normalised);
        ``"bulk"`` requires non-negative values.
    obs_names, var_names
        Names used in error messages.
    chunk_size
        Rows per chunk read from disk (bounds memory for backed files).
    rows
        Only the rows that will be used (positions). Chunks of a backed or dense matrix that
        hold none of them are neither read nor checked, and their rows get zero statistics;
        an in-memory sparse matrix is always checked whole.

    Raises
    ------
    ValueError
        On empty data, a boolean matrix, negative, NaN/inf or impossibly large values (above
        ``MAX_VALUE`` = 1e9 in one cell and gene), non-integer counts, or integer data declared
        as log-normalised; the message names the offending cells or genes and how to fix it.
    """
    n_obs, n_vars = matrix.shape
    if n_obs == 0:
        raise ValueError("The AnnData has no cells (n_obs == 0).")
    if n_vars == 0:
        raise ValueError("The AnnData has no genes (n_vars == 0).")
    obs_names = pd.Index(obs_names if obs_names is not None else np.arange(n_obs).astype(str))
    var_names = pd.Index(var_names if var_names is not None else np.arange(n_vars).astype(str))
    in_vocab = (col_to_vocab >= 0).astype(np.float64)
    totals = np.zeros(n_obs, dtype=np.float64)
    n_tokens = np.zeros(n_obs, dtype=np.int64)
    all_total = 0.0
    has_non_integer = False

    wanted = None
    if rows is not None:
        wanted = np.zeros(n_obs, dtype=bool)
        wanted[np.asarray(rows, dtype=np.int64)] = True
    for start, chunk in iter_row_chunks(matrix, chunk_size, wanted):
        chunk = sp.csr_matrix(chunk) if not sp.issparse(chunk) else chunk
        data = chunk.data
        if data.dtype.kind == "b":
            raise ValueError(
                f"The matrix is boolean (dtype {data.dtype}): detected / not detected, not "
                f"{'counts' if input_type == 'counts' else 'expression values'}. scFoundation "
                "needs the raw counts (layer=<counts layer> or adata.raw); a binarised matrix "
                "would be read as one count per detected gene."
            )
        if data.dtype.kind not in "iuf":
            raise ValueError(f"The matrix has dtype {data.dtype}; numeric values are required.")
        if data.dtype.kind == "f":
            bad = ~np.isfinite(data)
            if bad.any():
                cells = np.unique(np.repeat(np.arange(chunk.shape[0]), np.diff(chunk.indptr))[bad])
                raise ValueError(
                    f"The matrix holds NaN or infinite values ({int(bad.sum()):,} entries, in "
                    f"cells {_examples(obs_names, start + cells)}). Remove or fix those cells "
                    "before embedding."
                )
        negative = data < 0
        if negative.any():
            entries = np.flatnonzero(negative)
            cells = np.repeat(np.arange(chunk.shape[0]), np.diff(chunk.indptr))[entries]
            genes = chunk.indices[entries]
            raise ValueError(
                f"The matrix holds negative values ({int(negative.sum()):,} entries, e.g. cells "
                f"{_examples(obs_names, start + np.unique(cells))}; genes "
                f"{_examples(var_names, np.unique(genes))}). scFoundation needs raw counts or "
                "log1p-normalised values; scaled or centred data (sc.pp.scale, regress_out) "
                "cannot be used. Pass layer=<raw counts layer> or use adata.raw."
            )
        huge = data > MAX_VALUE
        if huge.any():
            entries = np.flatnonzero(huge)
            cells = np.repeat(np.arange(chunk.shape[0]), np.diff(chunk.indptr))[entries]
            raise ValueError(
                f"The matrix holds values above {MAX_VALUE:.0e} ({int(huge.sum()):,} entries, "
                f"e.g. {float(data[entries[0]]):.4g} in cells "
                f"{_examples(obs_names, start + np.unique(cells))}; genes "
                f"{_examples(var_names, np.unique(chunk.indices[entries]))}), more reads than "
                "a sequencing run yields for one gene of one cell: this is not expression data "
                "(an ID column, an overflow, a wrong layer?). Check the matrix and pass the raw "
                "counts (layer=<counts layer> or adata.raw)."
            )
        if data.dtype.kind == "f" and input_type == "counts":
            frac = data != np.round(data)
            if frac.any():
                entries = np.flatnonzero(frac)
                cells = np.repeat(np.arange(chunk.shape[0]), np.diff(chunk.indptr))[entries]
                raise ValueError(
                    f"The matrix was declared as raw counts but {int(frac.sum()):,} values are "
                    f"not integers (e.g. {data[entries[0]]:.4g} in cell "
                    f"{_examples(obs_names, start + np.unique(cells), 3)}). It looks "
                    "normalised. Pass the raw counts (layer=<counts layer> or adata.raw), or "
                    "declare the input as log-normalised with input_type='log1p' (optionally "
                    "with total_counts_key=<obs column of total counts>)."
                )
        if data.dtype.kind == "f" and data.size and not has_non_integer:
            has_non_integer = bool(np.any(data != np.round(data)))
        chunk_totals = np.asarray(chunk @ in_vocab, dtype=np.float64).ravel()
        nonzero = chunk.copy()
        nonzero.data = (nonzero.data != 0).astype(np.float64)
        chunk_tokens = np.asarray(nonzero @ in_vocab).ravel().astype(np.int64)
        stop = start + chunk.shape[0]
        totals[start:stop] = chunk_totals
        n_tokens[start:stop] = chunk_tokens
        all_total += float(data.sum(dtype=np.float64))

    if input_type == "log1p" and not has_non_integer and all_total > 0:
        raise ValueError(
            "The input was declared as log-normalised (input_type='log1p') but every value is "
            "an integer: these look like raw counts. Use input_type='counts' for raw counts."
        )
    count_fraction = float(totals.sum() / all_total) if all_total > 0 else 0.0
    return CellStats(totals=totals, n_tokens=n_tokens, count_fraction=count_fraction)


def invalid_cells(stats: CellStats, input_type: str = "counts") -> np.ndarray:
    """Indices of cells the model cannot embed.

    A cell needs at least one gene token, and with raw counts at least 2 in-vocabulary counts,
    so that ``S = log10(total)`` is positive (with total 1, ``S = 0`` and the official code
    silently drops the S token). With other input types its total must be positive.

    Parameters
    ----------
    stats
        Per-cell summaries from :func:`scan_cells`.
    input_type
        ``"counts"``, ``"log1p"`` or ``"bulk"``, as given to :func:`scan_cells`.

    Returns
    -------
    Row indices of the cells that cannot be embedded, in increasing order.
    """
    if input_type == "counts":
        bad = (stats.totals < MIN_TOTAL_COUNTS) | (stats.n_tokens < 1)
    else:
        bad = (stats.totals <= 0) | (stats.n_tokens < 1)
    return np.flatnonzero(bad)


def invalid_cells_message(idx: np.ndarray, obs_names: pd.Index, stats: CellStats) -> str:
    """Error text for cells without enough in-vocabulary counts."""
    return (
        f"{len(idx):,} cells have fewer than {MIN_TOTAL_COUNTS:g} counts on vocabulary genes "
        f"(or no vocabulary gene at all), so their read depth S = log10(total) is undefined: "
        f"{_examples(obs_names, idx)} (totals: "
        f"{', '.join(f'{t:g}' for t in stats.totals[idx[:5]])}). Filter them first, e.g. "
        "sc.pp.filter_cells(adata, min_counts=2), or pass invalid_cells='skip' to leave them "
        "out (their embedding rows are NaN)."
    )
