"""What every kernel shares: compile options, serial twins, huge-page allocation, row helpers."""

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

_INT32_MAX = 2147483647


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


@_jit()
def _empty(shape, dtype):
    # np.empty with the huge-page advice above, for every array a kernel fills at scale.
    arr = np.empty(shape, dtype)
    _advise_huge_pages(arr)
    return arr


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
