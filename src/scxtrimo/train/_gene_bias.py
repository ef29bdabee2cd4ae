"""Data-driven start of the per-gene expression bias."""

from __future__ import annotations

from typing import Any

import numpy as np

from scxtrimo.data._matrix import iter_row_chunks
from scxtrimo.data._tokens import (
    NORMALIZE_SCALE,
    MaskingSpec,
    csr_arrays,
    gather_csr_rows,
    log_normalize,
    row_sums,
)

__all__ = ["expected_masked_values"]


def expected_masked_values(
    matrix: Any,
    col_to_vocab: np.ndarray,
    cells: np.ndarray,
    n_genes: int,
    masking: MaskingSpec,
    *,
    chunk_size: int = 10_000,
) -> np.ndarray:
    """Each gene's expected pretraining target when it is masked, from training cells.

    A gene detected in ``n`` of ``N`` cells, with normalised values summing to ``s`` there, is
    masked ``masking.nonzero_prob * n`` times with a non-zero target and
    ``masking.zero_prob * (N - n)`` times with target 0; the best prediction that ignores the
    cell is the ratio ``nonzero_prob * s / (nonzero_prob * n + zero_prob * (N - n))``. It is
    where the module's ``expression_bias`` starts (config ``expression_gene_bias``), so that the
    network learns what a cell's context adds to it.

    Parameters
    ----------
    matrix
        Raw counts, cells x genes (in memory or backed; read in row chunks).
    col_to_vocab
        Column-to-vocabulary map (``-1`` = not in the vocabulary); columns that map to the same
        gene are summed, as in the token kernels.
    cells
        Rows to use (the training cells; validation cells must not leak into the start).
    n_genes
        Vocabulary size; the result also has the T and S positions (value 0).
    masking
        The pretraining masking rates.

    Returns
    -------
    ``float32`` array of ``n_genes + 2`` values on the ``log1p(x / total * 1e4)`` scale.
    """
    n_obs = matrix.shape[0]
    wanted = np.zeros(n_obs, dtype=bool)
    wanted[np.asarray(cells, dtype=np.int64)] = True
    col_to_vocab = np.asarray(col_to_vocab, dtype=np.int64)
    detected = np.zeros(n_genes, dtype=np.float64)
    value_sum = np.zeros(n_genes, dtype=np.float64)
    for start, block in iter_row_chunks(matrix, chunk_size, wanted):
        rows = np.flatnonzero(wanted[start : start + block.shape[0]])
        # The kernels that build the pretraining targets: same gene mapping, same values.
        ptr, genes, counts = gather_csr_rows(*csr_arrays(block), col_to_vocab, rows)
        values = log_normalize(ptr, counts, row_sums(ptr, counts), NORMALIZE_SCALE)
        detected += np.bincount(genes, minlength=n_genes)
        value_sum += np.bincount(genes, weights=values, minlength=n_genes)
    n_cells = float(wanted.sum())
    weight = masking.nonzero_prob * detected + masking.zero_prob * (n_cells - detected)
    expected = np.divide(
        masking.nonzero_prob * value_sum, weight, out=np.zeros(n_genes), where=weight > 0
    )
    return np.concatenate([expected, np.zeros(2)]).astype(np.float32)
