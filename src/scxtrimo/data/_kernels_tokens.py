"""Kernels from vocabulary rows to encoder input: pack tokens under a cap, pad ragged rows."""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import NDArray

from ._kernels_base import (
    _check_row_ptr,
    _empty,
    _jit,
    _max_row_length,
    _serial_twin,
)

__all__ = ["pack_tokens", "pack_tokens_serial", "ragged_to_padded"]


# --------------------------------------------------------------------------------------------
# 4. encoder input
# --------------------------------------------------------------------------------------------


@_jit()
def _pack_row(i, genes, values, a, b, L, pad_index, gene_index, value, padding_mask):
    # Genes of row i from column 2 on, then padding.
    m = b - a
    c = 2
    if m <= L:
        for j in range(a, b):
            gene_index[i, c] = genes[j]
            value[i, c] = np.float32(values[j])
            padding_mask[i, c] = False
            c += 1
    elif L > 0:
        # Keep the L largest values, ties to the smaller gene (= earlier position).
        # Quickselect finds the L-th largest value in O(m); everything above it is kept, and
        # entries equal to it are taken in position order until L are kept. This is exactly
        # a stable descending sort truncated to L, without the O(m log m).
        thr = _kth_largest(values, a, b, L)
        n_above = 0
        for j in range(a, b):
            if values[j] > thr:
                n_above += 1
        ties_left = L - n_above
        for j in range(a, b):
            v = values[j]
            keep = v > thr
            if not keep and v == thr and ties_left > 0:
                keep = True
                ties_left -= 1
            if keep:
                gene_index[i, c] = genes[j]
                value[i, c] = np.float32(v)
                padding_mask[i, c] = False
                c += 1
    for col in range(c, gene_index.shape[1]):
        gene_index[i, col] = pad_index
        value[i, col] = 0.0
        padding_mask[i, col] = True


@_jit()
def _kth_largest(values, a, b, k):
    # The k-th largest (1-based) of values[a:b] by iterative quickselect (Hoare partition,
    # median-of-three pivot) on a scratch copy; O(b - a) expected.
    buf = values[a:b].copy()
    lo = 0
    hi = buf.shape[0] - 1
    target = k - 1  # index in descending order
    while lo < hi:
        mid = (lo + hi) >> 1
        x, y, z = buf[lo], buf[mid], buf[hi]
        pivot = max(min(x, y), min(max(x, y), z))
        i = lo
        j = hi
        while i <= j:
            while buf[i] > pivot:
                i += 1
            while buf[j] < pivot:
                j -= 1
            if i <= j:
                buf[i], buf[j] = buf[j], buf[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            break
    return buf[target]


@_jit(parallel=True)
def pack_tokens(
    row_ptr: NDArray[np.int64],
    genes: NDArray[np.integer],
    values: NDArray[np.float64],
    t_values: NDArray[np.floating],
    s_values: NDArray[np.floating],
    t_index: int,
    s_index: int,
    pad_index: int,
    max_genes: int,
) -> tuple[NDArray[np.int64], NDArray[np.float32], NDArray[np.bool_]]:
    """Pack ragged rows into the padded encoder input ``[T, S, genes…, padding]``.

    Parameters
    ----------
    row_ptr
        int64 ``[n + 1]`` ragged offsets.
    genes
        ``[nnz]`` gene indices (int32 or int64), ascending within each row.
    values
        float64 ``[nnz]`` gene values (must not be NaN).
    t_values
        ``[n]`` value of the T (target depth) token of each row.
    s_values
        ``[n]`` value of the S (source depth) token of each row.
    t_index
        Gene index of the T token.
    s_index
        Gene index of the S token.
    pad_index
        Gene index written at padding positions.
    max_genes
        Cap on the number of gene tokens per row; negative means no cap. A longer row keeps
        its ``max_genes`` largest values (ties go to the smaller gene index), still written
        in ascending gene order.

    Returns
    -------
    gene_index
        int64 ``[n, 2 + L]``; ``L`` is the longest row length, capped at ``max_genes``.
    value
        float32 ``[n, 2 + L]``; cast from float64 as the very last step; 0 at padding.
    padding_mask
        bool ``[n, 2 + L]``, True exactly at padding positions.
    """
    n = _check_row_ptr(row_ptr, values.shape[0])
    if genes.shape[0] != values.shape[0]:
        raise ValueError("genes and values must have the same length")
    if t_values.shape[0] != n or s_values.shape[0] != n:
        raise ValueError("t_values and s_values must have one value per row")
    L = _max_row_length(row_ptr)
    if max_genes >= 0:
        L = min(L, max_genes)
    width = 2 + L
    gene_index = _empty((n, width), np.int64)
    value = _empty((n, width), np.float32)
    padding_mask = _empty((n, width), np.bool_)
    for i in numba.prange(n):
        gene_index[i, 0] = t_index
        value[i, 0] = np.float32(t_values[i])
        padding_mask[i, 0] = False
        gene_index[i, 1] = s_index
        value[i, 1] = np.float32(s_values[i])
        padding_mask[i, 1] = False
        _pack_row(
            i,
            genes,
            values,
            row_ptr[i],
            row_ptr[i + 1],
            L,
            pad_index,
            gene_index,
            value,
            padding_mask,
        )
    return gene_index, value, padding_mask


@_jit()
def ragged_to_padded(
    row_ptr: NDArray[np.int64], values: NDArray, fill: float | bool
) -> tuple[NDArray, NDArray]:
    """Scatter ragged rows into a padded 2-D array.

    Parameters
    ----------
    row_ptr
        int64 ``[n + 1]`` ragged offsets.
    values
        ``[nnz]`` values; int32, int64, float32, float64 and bool are supported.
    fill
        Scalar written at padding positions, of the same kind as ``values``.

    Returns
    -------
    padded
        ``[n, maxlen]`` with the dtype of ``values``; ``maxlen`` is the longest row length
        (0 columns when every row is empty).
    valid
        bool ``[n, maxlen]``, True at positions holding a row entry.
    """
    # Serial: a pure copy is memory-bound; see :func:`row_sums`.
    n = _check_row_ptr(row_ptr, values.shape[0])
    maxlen = _max_row_length(row_ptr)
    padded = _empty((n, maxlen), values.dtype)
    valid = _empty((n, maxlen), np.bool_)
    for i in range(n):
        a = row_ptr[i]
        m = row_ptr[i + 1] - a
        for j in range(m):
            padded[i, j] = values[a + j]
            valid[i, j] = True
        for j in range(m, maxlen):
            padded[i, j] = fill
            valid[i, j] = False
    return padded, valid


pack_tokens_serial = _serial_twin(pack_tokens)
