"""Random and lookup kernels of pretraining: binomial thinning, masking, value lookup."""

# numba compiles only the legacy np.random API, whose per-thread state is what makes per-row
# seeding inside prange loops possible; numpy's Generator advice does not apply here.
# ruff: noqa: NPY002

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
    _mix64,
    _prefix_sum,
    _seed_row,
    _serial_twin,
)

__all__ = [
    "binomial_thin",
    "binomial_thin_serial",
    "lookup_values",
    "lookup_values_serial",
    "mask_positions",
    "mask_positions_serial",
]

# Largest n_genes for which mask_positions samples zero genes with a per-row bitmap
# (n_genes / 8 bytes); beyond it, Floyd's algorithm on ranks plus a sort is used.
_BITMAP_GENES_LIMIT = 1 << 20

# Per-kernel random streams: the same row seed drives independent generators in each kernel.
_STREAM_THIN = 1
_STREAM_MASK_A = 2
_STREAM_MASK_B = 3


# --------------------------------------------------------------------------------------------
# sampling helpers
# --------------------------------------------------------------------------------------------


@_jit()
def _hash_insert(table, key):
    # Open addressing in a power-of-two table of non-negative keys (-1 = empty).
    # Returns True when the key was absent (and inserts it).
    mask = table.shape[0] - 1
    h = np.int64(_mix64(np.uint64(key)) & np.uint64(mask))
    while True:
        cur = table[h]
        if cur == key:
            return False
        if cur < 0:
            table[h] = key
            return True
        h = (h + 1) & mask


@_jit()
def _floyd_sample(n, k):
    # Robert Floyd's algorithm: a uniform k-subset of [0, n) with exactly k draws; the hash
    # set keeps it O(k) instead of O(n).
    cap = 16
    while cap < 2 * k:
        cap *= 2
    table = np.full(cap, -1, np.int64)
    out = np.empty(k, np.int64)
    for t in range(k):
        j = n - k + t
        r = np.random.randint(0, j + 1)
        if _hash_insert(table, r):
            out[t] = r
        else:
            # r was taken; j itself cannot be, since every earlier pick is < j.
            _hash_insert(table, j)
            out[t] = j
    return out


@_jit()
def _sample_sorted_ranks(n, k):
    # Sorted uniform k-subset of [0, n). For k > n / 2 draw the complement instead, so
    # Floyd's draws stay below n / 2 and the O(n) walk over [0, n) is O(k).
    if 2 * k <= n:
        out = _floyd_sample(n, k)
        out.sort()
        return out
    excluded = _floyd_sample(n, n - k)
    excluded.sort()
    out = np.empty(k, np.int64)
    e = 0
    t = 0
    for r in range(n):
        if e < excluded.shape[0] and excluded[e] == r:
            e += 1
        else:
            out[t] = r
            t += 1
    return out


@_jit()
def _zero_genes_by_ranks(genes, a, b, n_genes, k):
    # General path (any n_genes): a sorted uniform k-subset of the ranks of the row's zero
    # genes, mapped to genes. The r-th zero gene is r plus the number of stored genes below
    # it; ranks ascend, so one forward sweep over the stored genes maps them all.
    ranks = _sample_sorted_ranks(n_genes - (b - a), k)
    out = np.empty(k, np.int64)
    t = a
    for z in range(k):
        r = ranks[z]
        while t < b and genes[t] <= r + (t - a):
            t += 1
        out[z] = r + (t - a)
    return out


@_jit()
def _zero_genes_by_bitmap(genes, a, b, n_genes, k, lowest_bit):
    # Fast path for vocabulary-sized n_genes: rejection-sample genes against a bitmap of the
    # row's stored genes and of the picks so far, then walk the bitmap, which yields the
    # picks already sorted (no hash set, no sort). At most half of the zero genes are ever
    # drawn (beyond that, the complement, i.e. the zero genes to leave out, is drawn), so a
    # pick takes at most 2 * n_genes / n_zero draws on average: about 1 for a cell, which
    # stores a small part of the vocabulary, and O(n_genes) in total at worst.
    n_zero = n_genes - (b - a)
    n_words = (n_genes + 63) >> 6
    taken = np.zeros(n_words, np.uint64)
    for j in range(a, b):
        g = np.int64(genes[j])
        taken[g >> 6] |= np.uint64(1) << np.uint64(g & 63)
    complement = 2 * k > n_zero
    n_draw = n_zero - k if complement else k
    picked = np.zeros(n_words, np.uint64)
    for _ in range(n_draw):
        while True:
            g = np.random.randint(0, n_genes)
            bit = np.uint64(1) << np.uint64(g & 63)
            if not (taken[g >> 6] & bit):
                taken[g >> 6] |= bit
                picked[g >> 6] |= bit
                break
    out = np.empty(k, np.int64)
    z = 0
    for wd in range(n_words):
        if complement:
            # Every gene neither stored nor left out; bits past n_genes are masked off.
            word = ~taken[wd]
            tail = n_genes - (wd << 6)
            if tail < 64:
                word &= (np.uint64(1) << np.uint64(tail)) - np.uint64(1)
        else:
            word = picked[wd]
        while word != np.uint64(0):
            low = word & (np.uint64(0) - word)
            word ^= low
            out[z] = (wd << 6) + lowest_bit[(low * _DEBRUIJN) >> _S58]
            z += 1
    return out


# --------------------------------------------------------------------------------------------
# 5. binomial down-sampling
# --------------------------------------------------------------------------------------------


@_jit()
def _thin_row(counts, a, b, p, seed, thinned):
    # Thinned counts of one row into thinned[a:b]; returns how many are non-zero, or -1
    # for a count that is negative or not an integer.
    if p < 1.0 and p > 0.0:
        _seed_row(seed, _STREAM_THIN)
    kept = 0
    for j in range(a, b):
        c = np.float64(counts[j])
        if not (c >= 0.0 and c == np.floor(c) and c < 9.0e18):
            return -1
        if p >= 1.0 or c == 0.0:
            x = c
        elif p <= 0.0:
            x = 0.0
        elif c <= 4.0:
            # Small counts dominate scRNA-seq data: c Bernoulli trials are an exact
            # Binomial(c, p) draw and cheaper than numba's inversion sampler, which computes
            # a power per call.
            x = 0.0
            for _ in range(np.int64(c)):
                if np.random.random() < p:
                    x += 1.0
        else:
            x = np.float64(np.random.binomial(np.int64(c), p))
        thinned[j] = x
        if x != 0.0:
            kept += 1
    return kept


@_jit(parallel=True)
def binomial_thin(
    row_ptr: NDArray[np.int64],
    genes: NDArray[np.integer],
    counts: NDArray[np.number],
    rates: NDArray[np.floating],
    row_seeds: NDArray[np.int64],
) -> tuple[NDArray[np.int64], NDArray[np.integer], NDArray[np.float64]]:
    """Binomially down-sample integer counts, row by row.

    Each count ``c`` of row ``i`` becomes a draw from ``Binomial(c, rates[i])``; entries that
    become 0 are removed. A rate of 1 returns the row unchanged and a rate of 0 empties it,
    neither drawing random numbers.

    Parameters
    ----------
    row_ptr
        int64 ``[n + 1]`` ragged offsets.
    genes
        ``[nnz]`` gene indices (int32 or int64).
    counts
        ``[nnz]`` non-negative integer-valued counts (any integer or floating dtype).
    rates
        ``[n]`` keep probabilities in ``[0, 1]``.
    row_seeds
        int64 ``[n]`` per-row seeds.

    Returns
    -------
    row_ptr
        int64 ``[n + 1]`` offsets of the thinned rows.
    genes
        ``[nnz']`` gene indices, same dtype as the input ``genes``.
    counts
        float64 ``[nnz']`` thinned counts, all > 0.

    Raises
    ------
    ValueError
        If a rate is outside ``[0, 1]`` (or NaN) or a count is negative or not an integer.
    """
    n = _check_row_ptr(row_ptr, counts.shape[0])
    if genes.shape[0] != counts.shape[0]:
        raise ValueError("genes and counts must have the same length")
    if rates.shape[0] != n or row_seeds.shape[0] != n:
        raise ValueError("rates and row_seeds must have one value per row")
    for i in range(n):
        if not (rates[i] >= 0.0 and rates[i] <= 1.0):
            raise ValueError("rates must lie in [0, 1]")

    thinned = _empty(counts.shape[0], np.float64)
    # Row lengths; -1 flags a row with an invalid count, raised after the parallel loop.
    lengths = np.zeros(n + 1, np.int64)
    for i in numba.prange(n):
        lengths[i + 1] = _thin_row(
            counts, row_ptr[i], row_ptr[i + 1], np.float64(rates[i]), row_seeds[i], thinned
        )
    for i in range(n):
        if lengths[i + 1] < 0:
            raise ValueError("counts must be non-negative integers")

    out_ptr = _prefix_sum(lengths)
    out_genes = _empty(out_ptr[n], genes.dtype)
    out_counts = _empty(out_ptr[n], np.float64)
    for i in numba.prange(n):
        w = out_ptr[i]
        for j in range(row_ptr[i], row_ptr[i + 1]):
            if thinned[j] != 0.0:
                out_genes[w] = genes[j]
                out_counts[w] = thinned[j]
                w += 1
    return out_ptr, out_genes, out_counts


# --------------------------------------------------------------------------------------------
# 6. masking
# --------------------------------------------------------------------------------------------


@_jit()
def _mask_row_stored(genes, a, b, n_genes, p_nz, p_zero, seed, visible):
    # Pass 1 for one row (stream A): mask stored entries into visible[a:b] and draw K, the
    # number of masked zero genes. Returns (masked positions = masked stored entries + K, K),
    # or (-1, 0) if the row's genes are not strictly ascending within [0, n_genes).
    m = b - a
    for j in range(a, b):
        g = genes[j]
        if g < 0 or g >= n_genes or (j > a and g <= genes[j - 1]):
            return -1, 0
    _seed_row(seed, _STREAM_MASK_A)
    n_masked = 0
    for j in range(a, b):
        vis = np.random.random() >= p_nz
        visible[j] = vis
        if not vis:
            n_masked += 1
    if m > 0 and n_masked == m:
        visible[a + np.random.randint(0, m)] = True
        n_masked -= 1
    n_zero = n_genes - m
    k = 0
    if n_zero > 0 and p_zero > 0.0:
        k = np.random.binomial(n_zero, p_zero)
    return n_masked + k, k


@_jit()
def _mask_row_positions(
    genes,
    values,
    a,
    b,
    n_genes,
    k,
    seed,
    visible,
    lowest_bit,
    cut_replace,
    cut_random,
    w0,
    m_genes,
    m_input,
    m_token,
):
    # Pass 2 for one row (stream B): draw which K zero genes, merge them with the masked
    # stored entries by gene into the output from w0 on, then draw each decoder input.
    m = b - a
    _seed_row(seed, _STREAM_MASK_B)
    if k == 0:
        zero_genes = np.empty(0, np.int64)
    elif n_genes <= _BITMAP_GENES_LIMIT:
        zero_genes = _zero_genes_by_bitmap(genes, a, b, n_genes, k, lowest_bit)
    else:
        zero_genes = _zero_genes_by_ranks(genes, a, b, n_genes, k)
    # The entry's own value goes into m_input for now; the split below overwrites it.
    w = w0
    j = a
    z = 0
    while True:
        while j < b and visible[j]:
            j += 1
        if j < b and (z >= k or genes[j] < zero_genes[z]):
            m_genes[w] = genes[j]
            m_input[w] = np.float32(values[j])
            j += 1
        elif z < k:
            m_genes[w] = zero_genes[z]
            m_input[w] = 0.0
            z += 1
        else:
            break
        w += 1
    for t in range(w0, w):
        u = np.random.random()
        if u < cut_replace:
            m_token[t] = True
            m_input[t] = 0.0
        elif u < cut_random:
            m_token[t] = False
            m_input[t] = np.float32(values[a + np.random.randint(0, m)]) if m > 0 else 0.0
        else:
            m_token[t] = False


@_jit(parallel=True)
def mask_positions(
    row_ptr: NDArray[np.int64],
    genes: NDArray[np.integer],
    values: NDArray[np.floating],
    n_genes: int,
    nonzero_prob: float,
    zero_prob: float,
    replace_prob: float,
    random_prob: float,
    row_seeds: NDArray[np.int64],
) -> tuple[
    NDArray[np.bool_], NDArray[np.int64], NDArray[np.int32], NDArray[np.float32], NDArray[np.bool_]
]:
    """Choose masked positions for masked-regression pretraining.

    Per row: every stored entry (a non-zero gene) is masked independently with probability
    ``nonzero_prob``; if that masks all of a non-empty row, one entry chosen uniformly is
    un-masked so the encoder keeps a gene token. Then ``K ~ Binomial(n_zero, zero_prob)``
    distinct genes are drawn uniformly from the row's zero genes (genes in ``[0, n_genes)``
    not stored in the row). For each masked position, in gene order, one uniform ``u`` picks
    the decoder input: ``u < replace_prob`` → mask token; ``u < replace_prob + random_prob``
    → the value of a uniformly chosen stored entry of the row (0 if the row is empty);
    otherwise the position's own value (0 for a zero gene).

    Parameters
    ----------
    row_ptr
        int64 ``[n + 1]`` ragged offsets.
    genes
        ``[nnz]`` gene indices (int32 or int64), strictly ascending within each row and in
        ``[0, n_genes)``.
    values
        ``[nnz]`` values of the stored entries (float32 or float64).
    n_genes
        Vocabulary size; zero genes are drawn from ``[0, n_genes)``.
    nonzero_prob
        Masking probability of each stored entry (0.3 in xTrimoGene).
    zero_prob
        Masking probability of each zero gene (0.03 in xTrimoGene).
    replace_prob
        Probability that a masked position gets the mask token (0.8).
    random_prob
        Probability that a masked position gets a random value of its row (0.1). The
        remaining ``1 - replace_prob - random_prob`` keep their own value.
    row_seeds
        int64 ``[n]`` per-row seeds.

    Returns
    -------
    visible
        bool ``[nnz]``: True for stored entries that are not masked (the encoder input).
    m_ptr
        int64 ``[n + 1]`` ragged offsets of the masked positions.
    m_genes
        int32 ``[M]`` masked genes, ascending within each row (masked stored entries and
        sampled zero genes together).
    m_input
        float32 ``[M]`` decoder input value at each masked position (0 with the mask token).
    m_token
        bool ``[M]``: True where the decoder uses the learned mask embedding.

    Raises
    ------
    ValueError
        If a probability is outside ``[0, 1]``, ``replace_prob + random_prob > 1``, or a
        row's genes are not strictly ascending within ``[0, n_genes)``.
    """
    n = _check_row_ptr(row_ptr, values.shape[0])
    nnz = values.shape[0]
    if genes.shape[0] != nnz:
        raise ValueError("genes and values must have the same length")
    if row_seeds.shape[0] != n:
        raise ValueError("row_seeds must have one value per row")
    if not (0.0 <= nonzero_prob <= 1.0 and 0.0 <= zero_prob <= 1.0):
        raise ValueError("nonzero_prob and zero_prob must lie in [0, 1]")
    if not (replace_prob >= 0.0 and random_prob >= 0.0 and replace_prob + random_prob <= 1.0):
        raise ValueError("replace_prob and random_prob must be >= 0 with a sum <= 1")
    if n_genes < 0 or n_genes > _INT32_MAX:
        raise ValueError("n_genes must lie in [0, 2**31)")
    p_nz = np.float64(nonzero_prob)
    p_zero = np.float64(zero_prob)
    cut_replace = np.float64(replace_prob)
    cut_random = np.float64(replace_prob) + np.float64(random_prob)
    lowest_bit = _debruijn_table()

    visible = _empty(nnz, np.bool_)
    m_len = np.zeros(n + 1, np.int64)
    n_zero_masked = np.zeros(n, np.int64)

    # Pass 1 (stream A): mask stored entries and draw the number of masked zero genes,
    # which together size the output. Pass 2 (stream B) draws which zero genes and the
    # decoder inputs. Two streams, so pass 2 needs nothing random from pass 1 but K.
    for i in numba.prange(n):
        n_positions, k = _mask_row_stored(
            genes, row_ptr[i], row_ptr[i + 1], n_genes, p_nz, p_zero, row_seeds[i], visible
        )
        n_zero_masked[i] = k
        m_len[i + 1] = n_positions
    for i in range(n):
        if m_len[i + 1] < 0:
            raise ValueError("genes must be strictly ascending within [0, n_genes) in each row")

    m_ptr = _prefix_sum(m_len)
    M = m_ptr[n]
    m_genes = _empty(M, np.int32)
    m_input = _empty(M, np.float32)
    m_token = _empty(M, np.bool_)
    for i in numba.prange(n):
        _mask_row_positions(
            genes,
            values,
            row_ptr[i],
            row_ptr[i + 1],
            n_genes,
            n_zero_masked[i],
            row_seeds[i],
            visible,
            lowest_bit,
            cut_replace,
            cut_random,
            m_ptr[i],
            m_genes,
            m_input,
            m_token,
        )
    return visible, m_ptr, m_genes, m_input, m_token


# --------------------------------------------------------------------------------------------
# 7./8. lookups and padding
# --------------------------------------------------------------------------------------------


@_jit()
def _lookup_row(genes_a, values_a, a, b, genes_q, qa, qb, out):
    # Sorted queries (the usual case) search forward from where the previous one ended,
    # galloping (steps 1, 2, 4, …) and then bisecting, so a run of dense sorted queries costs
    # about a merge and sparse ones about a binary search each. An out-of-order query
    # restarts at the row start, so any order is still correct.
    lo = a
    prev = np.int64(-1)
    for q in range(qa, qb):
        g = np.int64(genes_q[q])
        if g < prev:
            lo = a
        prev = g
        if lo < b and genes_a[lo] < g:
            # invariant: genes_a[lo] < g
            step = 1
            while lo + step < b and genes_a[lo + step] < g:
                lo += step
                step <<= 1
            hi = min(lo + step, b)
            lo += 1
            while lo < hi:
                mid = (lo + hi) >> 1
                if genes_a[mid] < g:
                    lo = mid + 1
                else:
                    hi = mid
        # lo is now the first table position with gene >= g (or b)
        out[q] = np.float64(values_a[lo]) if lo < b and genes_a[lo] == g else 0.0


@_jit(parallel=True)
def lookup_values(
    row_ptr_a: NDArray[np.int64],
    genes_a: NDArray[np.integer],
    values_a: NDArray[np.number],
    row_ptr_q: NDArray[np.int64],
    genes_q: NDArray[np.integer],
) -> NDArray[np.float64]:
    """Look up, per row, the values of query genes in another ragged array.

    Parameters
    ----------
    row_ptr_a
        int64 ``[n + 1]`` offsets of the table.
    genes_a
        ``[nnz_a]`` table genes, ascending and unique within each row.
    values_a
        ``[nnz_a]`` table values, any integer or floating dtype (float16 excluded).
    row_ptr_q
        int64 ``[n + 1]`` offsets of the queries (same number of rows as the table).
    genes_q
        ``[nnz_q]`` query genes; any order, repeats allowed.

    Returns
    -------
    float64 ``[nnz_q]``: the value of each query gene in the same row of the table, 0 when
    the row does not store it.
    """
    n = _check_row_ptr(row_ptr_a, values_a.shape[0])
    if genes_a.shape[0] != values_a.shape[0]:
        raise ValueError("genes_a and values_a must have the same length")
    if _check_row_ptr(row_ptr_q, genes_q.shape[0]) != n:
        raise ValueError("row_ptr_a and row_ptr_q must describe the same number of rows")
    out = _empty(genes_q.shape[0], np.float64)
    for i in numba.prange(n):
        _lookup_row(
            genes_a,
            values_a,
            row_ptr_a[i],
            row_ptr_a[i + 1],
            genes_q,
            row_ptr_q[i],
            row_ptr_q[i + 1],
            out,
        )
    return out


binomial_thin_serial = _serial_twin(binomial_thin)
mask_positions_serial = _serial_twin(mask_positions)
lookup_values_serial = _serial_twin(lookup_values)
