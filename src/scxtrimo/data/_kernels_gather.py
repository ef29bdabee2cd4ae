"""Kernels from CSR rows to vocabulary rows: gather and map columns, row sums, log-normalise."""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import NDArray

from ._kernels_base import (
    _DEBRUIJN,
    _INT32_MAX,
    _S58,
    _check_row_ptr,
    _debruijn_table,
    _empty,
    _jit,
    _prefix_sum,
    _serial_twin,
)

__all__ = [
    "gather_csr_rows",
    "gather_csr_rows_serial",
    "log_normalize",
    "log_normalize_serial",
    "row_sums",
]

# Largest vocabulary extent handled with dense per-chunk scratch in gather_csr_rows
# (8 bytes a gene a chunk, so 1 MiB a chunk); larger gene indices fall back to sorting.
_DENSE_VOCAB_LIMIT = 1 << 17
# Row chunks of the dense gather (each holds its own scratch): enough for load balance on
# typical core counts while keeping scratch allocation negligible.
_GATHER_CHUNKS = 64

# Integer counts below this are memoised per row in log_normalize.
_LOG_MEMO_SIZE = 64
_LOW32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# 1. gather
# --------------------------------------------------------------------------------------------


# The per-row (or per-chunk) work of each parallel kernel lives in a plain njit helper that
# the prange loop calls. Numba's parfor passes then see only an opaque call, which keeps the
# parallel kernels several times quicker to compile, and the serial twins reuse the same
# compiled helpers.


@_jit()
def _gather_dense_rows(lo, hi, csr, col_to_vocab, rows, n_vocab, lowest_bit, scratch):
    # Dense strategy, for vocabulary-sized gene ranges: accumulate a row into a dense scratch
    # vector and mark touched genes in a bitmap; walking the bitmap words then yields the
    # genes already sorted. This is a one-pass radix sort, several times cheaper than a
    # comparison sort of each row's entries. The value scratch needs no zeroing (a gene's
    # first entry assigns, later ones add, in CSR order) and the bitmap is cleared while it
    # is walked, so the scratch is allocated once for rows lo..hi and a row's result cannot
    # depend on which rows share it.
    indptr, indices, data = csr
    bound, genes_tmp, counts_tmp, lengths, err = scratch
    n_cols = col_to_vocab.shape[0]
    n_words = (n_vocab + 63) >> 6
    acc = np.empty(max(n_vocab, 1), np.float64)
    bits = np.zeros(max(n_words, 1), np.uint64)
    for i in range(lo, hi):
        r = rows[i]
        a = np.int64(indptr[r])
        b = np.int64(indptr[r + 1])
        lo_word = n_words
        hi_word = np.int64(-1)
        # The same column check as _gather_sorted_row's: kept inline, the innermost hot loop.
        for p in range(a, b):
            col = np.int64(indices[p])
            if col < 0 or col >= n_cols:
                err[i] = 1
                break
            g = col_to_vocab[col]
            if g >= 0:
                wd = g >> 6
                bit = np.uint64(1) << np.uint64(g & 63)
                if bits[wd] & bit:
                    acc[g] += np.float64(data[p])
                else:
                    acc[g] = np.float64(data[p])
                    bits[wd] |= bit
                    lo_word = min(lo_word, wd)
                    hi_word = max(hi_word, wd)
        w = bound[i]
        for wd in range(lo_word, hi_word + 1):
            word = bits[wd]
            bits[wd] = np.uint64(0)
            while word != np.uint64(0):
                low = word & (np.uint64(0) - word)
                word ^= low
                g = (wd << 6) + lowest_bit[(low * _DEBRUIJN) >> _S58]
                v = acc[g]
                if v != 0.0:
                    genes_tmp[w] = g
                    counts_tmp[w] = v
                    w += 1
        lengths[i + 1] = w - bound[i]


@_jit()
def _gather_sorted_row(i, csr, col_to_vocab, rows, keys, scratch):
    # Sparse strategy, for huge gene ranges where dense scratch would not fit: encode
    # (gene, position) in one int64 key so that a single in-place sort orders by gene and,
    # within a gene, by CSR position (the same summation order as the dense strategy), then
    # merge runs of equal genes.
    indptr, indices, data = csr
    bound, genes_tmp, counts_tmp, lengths, err = scratch
    n_cols = col_to_vocab.shape[0]
    r = rows[i]
    a = np.int64(indptr[r])
    b = np.int64(indptr[r + 1])
    o = bound[i]
    k = o
    for p in range(a, b):
        col = np.int64(indices[p])
        if col < 0 or col >= n_cols:
            err[i] = 1
            break
        g = col_to_vocab[col]
        if g >= 0:
            keys[k] = (g << 32) | (p - a)
            k += 1
    keys[o:k].sort()
    w = o
    cur = np.int64(-1)
    acc = 0.0
    for t in range(o, k):
        g = keys[t] >> 32
        v = np.float64(data[a + (keys[t] & _LOW32)])
        if g != cur:
            if cur >= 0 and acc != 0.0:
                genes_tmp[w] = cur
                counts_tmp[w] = acc
                w += 1
            cur = g
            acc = v
        else:
            acc += v
    if cur >= 0 and acc != 0.0:
        genes_tmp[w] = cur
        counts_tmp[w] = acc
        w += 1
    lengths[i + 1] = w - o


@_jit(parallel=True)
def gather_csr_rows(
    indptr: NDArray[np.integer],
    indices: NDArray[np.integer],
    data: NDArray[np.number],
    col_to_vocab: NDArray[np.int64],
    rows: NDArray[np.int64],
) -> tuple[NDArray[np.int64], NDArray[np.int32], NDArray[np.float64]]:
    """Gather CSR rows and map them onto the vocabulary as canonical ragged rows.

    For each requested row: map its columns through ``col_to_vocab``, drop unmapped columns,
    sum duplicates (repeated CSR entries of one column as well as several columns mapped to
    the same gene, added in CSR order), sort by gene and drop entries whose sum is exactly
    zero.

    Parameters
    ----------
    indptr
        CSR row offsets, int32 or int64, length ``n_rows + 1``.
    indices
        CSR column indices, int32 or int64; need not be sorted, may repeat within a row.
    data
        CSR values, any integer or floating dtype except float16 (cast it to float32).
    col_to_vocab
        int64 array of length ``n_cols``: vocabulary gene index of each matrix column, or a
        negative value (conventionally -1) for columns outside the vocabulary. Gene indices
        must fit in int32.
    rows
        int64 array of CSR rows to gather, in output order; repeats are allowed.

    Returns
    -------
    row_ptr
        int64 ``[n + 1]`` offsets of the ragged output.
    genes
        int32 ``[nnz]`` vocabulary gene indices, ascending and unique within each row.
    counts
        float64 ``[nnz]`` summed values (exact for integer counts below 2**53).

    Raises
    ------
    ValueError
        If a row is out of range, ``indptr`` is inconsistent, a column index is out of range
        of ``col_to_vocab``, or a gene index does not fit in int32.
    """
    n = rows.shape[0]
    n_rows = indptr.shape[0] - 1
    n_cols = col_to_vocab.shape[0]
    n_entries = indices.shape[0]
    if data.shape[0] != n_entries:
        raise ValueError("indices and data must have the same length")

    # Serial O(n_cols) scan: the vocabulary extent picks the strategy below, and checking
    # the int32 range once here keeps the per-entry loops free of it.
    n_vocab = np.int64(0)
    for c in range(n_cols):
        g = col_to_vocab[c]
        if g > _INT32_MAX:
            raise ValueError("col_to_vocab contains a gene index that does not fit in int32")
        if g >= n_vocab:
            n_vocab = g + 1

    # Serial O(n): validate rows and size the scratch by the raw row lengths, an upper bound
    # on the output length that needs no look at the entries.
    bound = np.zeros(n + 1, np.int64)
    for i in range(n):
        r = rows[i]
        if r < 0 or r >= n_rows:
            raise ValueError("rows contains an index out of range of indptr")
        a = np.int64(indptr[r])
        b = np.int64(indptr[r + 1])
        if a < 0 or b < a or b > n_entries:
            raise ValueError("indptr is not a valid CSR offset array")
        bound[i + 1] = b - a
    _prefix_sum(bound)

    total = bound[n]
    genes_tmp = _empty(total, np.int32)
    counts_tmp = _empty(total, np.float64)
    lengths = np.zeros(n + 1, np.int64)
    # A bad column index is recorded per row and raised after the parallel loop, because
    # raising from inside a prange body is not reliable across threading layers.
    err = np.zeros(n, np.int8)
    # The strategies share the input and scratch arrays (bundled: one list, not two).
    csr = (indptr, indices, data)
    scratch = (bound, genes_tmp, counts_tmp, lengths, err)

    if n_vocab <= _DENSE_VOCAB_LIMIT:
        # Rows go in a fixed number of chunks, each with its own dense scratch (see
        # _gather_dense_rows). The count is fixed rather than numba.get_num_threads(),
        # which would make the function uncacheable; results never depend on it.
        lowest_bit = _debruijn_table()
        n_chunks = min(n, _GATHER_CHUNKS)
        for ch in numba.prange(n_chunks):
            lo, hi = ch * n // n_chunks, (ch + 1) * n // n_chunks
            _gather_dense_rows(lo, hi, csr, col_to_vocab, rows, n_vocab, lowest_bit, scratch)
    else:
        keys = _empty(total, np.int64)
        for i in numba.prange(n):
            _gather_sorted_row(i, csr, col_to_vocab, rows, keys, scratch)

    for i in range(n):
        if err[i] != 0:
            raise ValueError("indices contains a column out of range of col_to_vocab")

    # Compact the scratch into the final arrays.
    row_ptr = _prefix_sum(lengths)
    genes = _empty(row_ptr[n], np.int32)
    counts = _empty(row_ptr[n], np.float64)
    for i in numba.prange(n):
        o = bound[i]
        d = row_ptr[i]
        for t in range(row_ptr[i + 1] - d):
            genes[d + t] = genes_tmp[o + t]
            counts[d + t] = counts_tmp[o + t]
    return row_ptr, genes, counts


# --------------------------------------------------------------------------------------------
# 2./3. sums and normalisation
# --------------------------------------------------------------------------------------------


@_jit()
def row_sums(row_ptr: NDArray[np.int64], values: NDArray[np.number]) -> NDArray[np.float64]:
    """Sum each ragged row.

    Parameters
    ----------
    row_ptr
        int64 ``[n + 1]`` ragged offsets.
    values
        ``[nnz]`` values of any integer or floating dtype (float16 excluded).

    Returns
    -------
    float64 ``[n]`` row sums, accumulated in float64 in entry order; 0 for empty rows.
    """
    # Serial on purpose: one add per entry is memory-bound (all 2.6M entries of pbmc4k take
    # ~1.2 ms), so threads would save well under a millisecond per batch while adding a
    # thread-pool wake-up to every call.
    n = _check_row_ptr(row_ptr, values.shape[0])
    out = np.zeros(n, np.float64)
    for i in range(n):
        s = 0.0
        for j in range(row_ptr[i], row_ptr[i + 1]):
            s += np.float64(values[j])
        out[i] = s
    return out


@_jit()
def _log_normalize_row(counts, a, b, tot, scale, out):
    if tot > 0.0:
        # Raw counts are mostly small integers that repeat within a row, so each row
        # memoises the result per small integer count (NaN = not computed yet). The values
        # are identical, the same operations on the same inputs, while log1p, the dominant
        # cost, runs ~20x less often on count data.
        memo = np.full(_LOG_MEMO_SIZE, np.nan)
        for j in range(a, b):
            c = np.float64(counts[j])
            if c >= 0.0 and c < _LOG_MEMO_SIZE and c == np.floor(c):
                k = np.int64(c)
                v = memo[k]
                if v != v:
                    v = np.log1p(c / tot * scale)
                    memo[k] = v
                out[j] = v
            else:
                out[j] = np.log1p(c / tot * scale)
    else:
        for j in range(a, b):
            out[j] = 0.0


@_jit(parallel=True)
def log_normalize(
    row_ptr: NDArray[np.int64],
    counts: NDArray[np.number],
    totals: NDArray[np.number],
    scale: float,
) -> NDArray[np.float64]:
    """Library-size normalise and log-transform ragged counts.

    Computes ``log1p(count / total * scale)`` per entry in float64, in exactly that order
    (divide, multiply, ``log1p``) for parity with the reference implementation.

    Parameters
    ----------
    row_ptr
        int64 ``[n + 1]`` ragged offsets.
    counts
        ``[nnz]`` counts, any integer or floating dtype (float16 excluded).
    totals
        ``[n]`` per-row totals (e.g. :func:`row_sums` of the full-depth row).
    scale
        Target library size (e.g. ``1e4``).

    Returns
    -------
    float64 ``[nnz]`` normalised values; entries of rows with ``total <= 0`` are 0.

    Notes
    -----
    ``log1p`` here is the C library's. NumPy's ``np.log1p`` uses SIMD code on AVX-512 CPUs
    that differs from it by at most 1 ulp in float64 (on ~6% of pbmc4k entries); after the
    cast to float32 that the model consumes, the two agreed on every pbmc4k entry.
    """
    n = _check_row_ptr(row_ptr, counts.shape[0])
    if totals.shape[0] != n:
        raise ValueError("totals must have one value per row")
    s = np.float64(scale)
    out = _empty(counts.shape[0], np.float64)
    for i in numba.prange(n):
        _log_normalize_row(counts, row_ptr[i], row_ptr[i + 1], np.float64(totals[i]), s, out)
    return out


gather_csr_rows_serial = _serial_twin(gather_csr_rows)
log_normalize_serial = _serial_twin(log_normalize)
