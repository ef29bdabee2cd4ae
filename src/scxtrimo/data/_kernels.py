"""Numba kernels that turn CSR rows of a count matrix into model tokens.

This module is the hot path of every batch: gather the requested cells from a CSR matrix,
map their columns onto the model vocabulary, normalise, optionally down-sample and mask them,
and pack them into the dense ``(T, S, genes…, padding)`` layout the encoder consumes.

Ragged rows
-----------
Variable-length per-cell data are passed between the kernels as *ragged rows*: an offset array
``row_ptr: int64[n + 1]`` with ``row_ptr[0] == 0`` and ``row_ptr[n] == nnz``, plus one or more
flat per-entry arrays of length ``nnz``. Row ``i`` owns the entries ``row_ptr[i]:row_ptr[i + 1]``.
Within a row, entries are **sorted by gene index ascending and genes are unique**; the entries
are exactly the row's non-zero genes (zero values are never stored). This is CSR restricted to
the vocabulary, canonical form, but with 64-bit offsets and without a fixed column count, so
that several arrays (genes, counts, normalised values, masks…) can share one ``row_ptr``.

Randomness
----------
Every random kernel takes ``row_seeds: int64[n]``. Right before drawing for row ``i`` it seeds
the current thread's generator from ``row_seeds[i]`` (mixed with splitmix64 and a per-kernel
stream constant, so that the same seeds can be passed to several kernels without their draws
being correlated). A row's result therefore depends only on its own seed and data: not on the
thread count, nor on which other rows are in the batch, nor on their order. (This re-seeds
numba's internal per-thread generator, which is separate from NumPy's global one.)

Dtypes
------
Numba compiles one specialisation per combination of argument dtypes. Index arrays may be
int32 or int64 and data any integer or floating dtype, **except float16**, which numba does
not support: callers must cast float16 data to float32 first. Invalid inputs (rows or
columns out of range, malformed ``row_ptr``, probabilities outside ``[0, 1]``…) raise
``ValueError`` rather than reading out of bounds.

Threading
---------
The kernels release the GIL (``nogil=True``), and the row-parallel ones
(:func:`gather_csr_rows`, :func:`log_normalize`, :func:`pack_tokens`, :func:`binomial_thin`,
:func:`mask_positions`, :func:`lookup_values`) use ``numba.prange``. Each of those has a
serial twin, ``<kernel>_serial``, with the same signature and bit-identical results. Use the
twins inside worker processes: with numba's OpenMP threading layer, a process that forks
*after* running a parallel kernel (e.g. a ``torch.utils.data.DataLoader`` with ``fork``
workers) aborts as soon as the child runs a parallel kernel, and several workers each
starting a thread pool oversubscribe the cores anyway.
"""

# numba compiles only the legacy np.random API, whose per-thread state is what makes per-row
# seeding inside prange loops possible; numpy's Generator advice does not apply here.
# ruff: noqa: NPY002

from __future__ import annotations

import sys
import types as pytypes

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic
from numpy.typing import NDArray

__all__ = [
    "binomial_thin",
    "binomial_thin_serial",
    "gather_csr_rows",
    "gather_csr_rows_serial",
    "log_normalize",
    "log_normalize_serial",
    "lookup_values",
    "lookup_values_serial",
    "mask_positions",
    "mask_positions_serial",
    "pack_tokens",
    "pack_tokens_serial",
    "ragged_to_padded",
    "row_sums",
]

# splitmix64 constants. Kept as np.uint64 globals so numba freezes them as uint64 constants
# (a bare literal above 2**63 would not type as int64, and mixing int64 with uint64 would
# silently promote to float64).
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_S32 = np.uint64(32)
_S58 = np.uint64(58)

# De Bruijn multiply-and-lookup gives the index of a word's lowest set bit without a
# hardware intrinsic: (lowbit * B) >> 58 is distinct for each of the 64 single-bit words.
_DEBRUIJN = np.uint64(0x03F79D71B4CB0A89)

# Largest vocabulary extent handled with dense per-chunk scratch in gather_csr_rows
# (8 bytes a gene a chunk, so 1 MiB a chunk); larger gene indices fall back to sorting.
_DENSE_VOCAB_LIMIT = 1 << 17
# Row chunks of the dense gather (each holds its own scratch): enough for load balance on
# typical core counts while keeping scratch allocation negligible.
_GATHER_CHUNKS = 64
# Largest n_genes for which mask_positions samples zero genes with a per-row bitmap
# (n_genes / 8 bytes); beyond it, Floyd's algorithm on ranks plus a sort is used.
_BITMAP_GENES_LIMIT = 1 << 20

# Integer counts below this are memoised per row in log_normalize.
_LOG_MEMO_SIZE = 64

# Per-kernel random streams: the same row seed drives independent generators in each kernel.
_STREAM_THIN = 1
_STREAM_MASK_A = 2
_STREAM_MASK_B = 3

_INT32_MAX = 2147483647
_LOW32 = 0xFFFFFFFF


def _jit(parallel: bool = False):
    # Parallel kernels only parallelise their explicit prange loops: numba's automatic
    # conversion of array expressions (np.zeros, slicing arithmetic…) into parallel loops
    # would buy nothing on these small per-call arrays and roughly doubles compile time.
    if parallel:
        options = dict.fromkeys(
            (
                "comprehension",
                "reduction",
                "inplace_binop",
                "setitem",
                "numpy",
                "stencil",
                "fusion",
            ),
            False,
        )
        return numba.njit(cache=True, nogil=True, parallel={**options, "prange": True})
    return numba.njit(cache=True, nogil=True)


def _serial_twin(dispatcher):
    """Compile a serial copy of a parallel kernel.

    The copy is a new function object with its own ``__qualname__`` because numba's on-disk
    cache is keyed by qualified name, signature and bytecode, not by the ``parallel`` flag:
    jitting the *same* function twice would let the serial dispatcher load the parallel
    machine code from the cache.
    """
    fn = dispatcher.py_func
    twin = pytypes.FunctionType(
        fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__
    )
    twin.__qualname__ = fn.__qualname__ + "_serial"
    twin.__doc__ = (
        f"Serial (single-threaded) twin of :func:`{fn.__name__}`; fork-safe, same results.\n"
    )
    twin.__annotations__ = dict(fn.__annotations__)
    twin.__module__ = fn.__module__
    return _jit(parallel=False)(twin)


# --------------------------------------------------------------------------------------------
# allocation
# --------------------------------------------------------------------------------------------

# NumPy asks Linux for transparent huge pages on arrays of 4 MiB or more; numba's allocator
# does not, and glibc serves allocations above its mmap threshold (32 MiB at most) with fresh
# pages on every call. For large batches (e.g. 2,000 cells x 3,700 tokens of int64) the
# first-touch faults on 4 KiB pages then cost several times the kernel's own work (measured:
# pack_tokens 35 ms -> 15 ms). Advising the range as MADV_HUGEPAGE before the first write
# restores NumPy's behaviour. On other platforms it is a no-op.
_HUGE_PAGE_MIN_BYTES = 4 << 20
_MADV_HUGEPAGE = 14

if sys.platform.startswith("linux"):

    @intrinsic
    def _madvise(typingctx, addr, length, advice):
        # Direct call to libc's madvise: a ctypes function pointer would make every kernel
        # that uses it uncacheable.
        sig = types.int32(types.intp, types.intp, types.int32)

        def codegen(context, builder, signature, args):
            i8p = ir.IntType(8).as_pointer()
            size_t = context.get_value_type(types.intp)
            fnty = ir.FunctionType(ir.IntType(32), [i8p, size_t, ir.IntType(32)])
            fn = builder.module.globals.get("madvise")
            if fn is None:
                fn = ir.Function(builder.module, fnty, name="madvise")
            return builder.call(fn, [builder.inttoptr(args[0], i8p), args[1], args[2]])

        return sig, codegen

    @_jit()
    def _advise_huge_pages(arr):
        nbytes = arr.size * arr.itemsize
        if nbytes >= _HUGE_PAGE_MIN_BYTES:
            start = arr.ctypes.data
            aligned = (start + 4095) & ~4095  # madvise needs a page-aligned start
            end = start + nbytes
            if end > aligned:
                _madvise(aligned, end - aligned, np.int32(_MADV_HUGEPAGE))  # advice only

else:

    @_jit()
    def _advise_huge_pages(arr):
        pass


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@_jit()
def _mix64(x):
    # splitmix64 finaliser: a bijective avalanche on 64 bits, so nearby seeds (0, 1, 2, …)
    # give unrelated generator states.
    z = x + _GOLDEN
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


@_jit()
def _seed_row(seed, stream):
    # numba's generator takes a 32-bit seed; keep the high half of the mixed word, which
    # depends on all 64 input bits (plain truncation would alias seeds differing by 2**32).
    z = _mix64(np.uint64(np.int64(seed)) + np.uint64(stream) * _GOLDEN)
    np.random.seed(np.uint32(z >> _S32))


@_jit()
def _check_row_ptr(row_ptr, nnz):
    n = row_ptr.shape[0] - 1
    if n < 0:
        raise ValueError("row_ptr must have at least one element")
    if row_ptr[0] != 0 or row_ptr[n] != nnz:
        raise ValueError("row_ptr must start at 0 and end at the number of entries")
    for i in range(n):
        if row_ptr[i + 1] < row_ptr[i]:
            raise ValueError("row_ptr must be non-decreasing")
    return n


@_jit()
def _debruijn_table():
    # Built per call (64 steps) rather than held as a global array, which numba would refuse
    # to cache.
    table = np.empty(64, np.int64)
    for bit in range(64):
        table[(np.uint64(1) << np.uint64(bit)) * _DEBRUIJN >> _S58] = bit
    return table


@_jit()
def _prefix_sum(lengths):
    # lengths[0] is 0 and lengths[i + 1] holds row i's length; turned into offsets in place.
    for i in range(1, lengths.shape[0]):
        lengths[i] += lengths[i - 1]
    return lengths


@_jit()
def _max_row_length(row_ptr):
    m = 0
    for i in range(row_ptr.shape[0] - 1):
        m = max(m, row_ptr[i + 1] - row_ptr[i])
    return m


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
# 1. gather
# --------------------------------------------------------------------------------------------


# The per-row (or per-chunk) work of each parallel kernel lives in a plain njit helper that
# the prange loop calls. Numba's parfor passes then see only an opaque call, which keeps the
# parallel kernels several times quicker to compile, and the serial twins reuse the same
# compiled helpers.


@_jit()
def _gather_dense_rows(
    lo,
    hi,
    indptr,
    indices,
    data,
    col_to_vocab,
    rows,
    n_vocab,
    lowest_bit,
    bound,
    genes_tmp,
    counts_tmp,
    lengths,
    err,
):
    # Dense strategy, for vocabulary-sized gene ranges: accumulate a row into a dense scratch
    # vector and mark touched genes in a bitmap; walking the bitmap words then yields the
    # genes already sorted. This is a one-pass radix sort, several times cheaper than a
    # comparison sort of each row's entries. The value scratch needs no zeroing (a gene's
    # first entry assigns, later ones add, in CSR order) and the bitmap is cleared while it
    # is walked, so the scratch is allocated once for rows lo..hi and a row's result cannot
    # depend on which rows share it.
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
def _gather_sorted_row(
    i, indptr, indices, data, col_to_vocab, rows, keys, bound, genes_tmp, counts_tmp, lengths, err
):
    # Sparse strategy, for huge gene ranges where dense scratch would not fit: encode
    # (gene, position) in one int64 key so that a single in-place sort orders by gene and,
    # within a gene, by CSR position (the same summation order as the dense strategy), then
    # merge runs of equal genes.
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
    genes_tmp = np.empty(total, np.int32)
    _advise_huge_pages(genes_tmp)
    counts_tmp = np.empty(total, np.float64)
    _advise_huge_pages(counts_tmp)
    lengths = np.zeros(n + 1, np.int64)
    # A bad column index is recorded per row and raised after the parallel loop, because
    # raising from inside a prange body is not reliable across threading layers.
    err = np.zeros(n, np.int8)

    if n_vocab <= _DENSE_VOCAB_LIMIT:
        # Rows go in a fixed number of chunks, each with its own dense scratch (see
        # _gather_dense_rows). The count is fixed rather than numba.get_num_threads(),
        # which would make the function uncacheable; results never depend on it.
        lowest_bit = _debruijn_table()
        n_chunks = min(n, _GATHER_CHUNKS)
        for ch in numba.prange(n_chunks):
            _gather_dense_rows(
                ch * n // n_chunks,
                (ch + 1) * n // n_chunks,
                indptr,
                indices,
                data,
                col_to_vocab,
                rows,
                n_vocab,
                lowest_bit,
                bound,
                genes_tmp,
                counts_tmp,
                lengths,
                err,
            )
    else:
        keys = np.empty(total, np.int64)
        _advise_huge_pages(keys)
        for i in numba.prange(n):
            _gather_sorted_row(
                i,
                indptr,
                indices,
                data,
                col_to_vocab,
                rows,
                keys,
                bound,
                genes_tmp,
                counts_tmp,
                lengths,
                err,
            )

    for i in range(n):
        if err[i] != 0:
            raise ValueError("indices contains a column out of range of col_to_vocab")

    # Compact the scratch into the final arrays.
    row_ptr = _prefix_sum(lengths)
    genes = np.empty(row_ptr[n], np.int32)
    _advise_huge_pages(genes)
    counts = np.empty(row_ptr[n], np.float64)
    _advise_huge_pages(counts)
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
    out = np.empty(counts.shape[0], np.float64)
    _advise_huge_pages(out)
    for i in numba.prange(n):
        _log_normalize_row(counts, row_ptr[i], row_ptr[i + 1], np.float64(totals[i]), s, out)
    return out


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
    gene_index = np.empty((n, width), np.int64)
    _advise_huge_pages(gene_index)
    value = np.empty((n, width), np.float32)
    _advise_huge_pages(value)
    padding_mask = np.empty((n, width), np.bool_)
    _advise_huge_pages(padding_mask)
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

    thinned = np.empty(counts.shape[0], np.float64)
    _advise_huge_pages(thinned)
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
    out_genes = np.empty(out_ptr[n], genes.dtype)
    _advise_huge_pages(out_genes)
    out_counts = np.empty(out_ptr[n], np.float64)
    _advise_huge_pages(out_counts)
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

    visible = np.empty(nnz, np.bool_)
    _advise_huge_pages(visible)
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
    m_genes = np.empty(M, np.int32)
    _advise_huge_pages(m_genes)
    m_input = np.empty(M, np.float32)
    _advise_huge_pages(m_input)
    m_token = np.empty(M, np.bool_)
    _advise_huge_pages(m_token)
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
    out = np.empty(genes_q.shape[0], np.float64)
    _advise_huge_pages(out)
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
    padded = np.empty((n, maxlen), values.dtype)
    _advise_huge_pages(padded)
    valid = np.empty((n, maxlen), np.bool_)
    _advise_huge_pages(valid)
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


gather_csr_rows_serial = _serial_twin(gather_csr_rows)
log_normalize_serial = _serial_twin(log_normalize)
pack_tokens_serial = _serial_twin(pack_tokens)
binomial_thin_serial = _serial_twin(binomial_thin)
mask_positions_serial = _serial_twin(mask_positions)
lookup_values_serial = _serial_twin(lookup_values)
