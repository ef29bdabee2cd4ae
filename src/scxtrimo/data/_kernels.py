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

# One module per concern: _kernels_gather (CSR rows to vocabulary rows, sums, normalisation),
# _kernels_tokens (encoder input), _kernels_masking (thinning, masking, lookup), on top of
# _kernels_base (compile options, twins, allocation). This module gathers their public kernels
# (and the limits and helpers the kernel tests probe) under one name.

from __future__ import annotations

from ._kernels_gather import (
    _DENSE_VOCAB_LIMIT,  # noqa: F401 - probed by the kernel tests
    gather_csr_rows,
    gather_csr_rows_serial,
    log_normalize,
    log_normalize_serial,
    row_sums,
)
from ._kernels_masking import (
    _BITMAP_GENES_LIMIT,  # noqa: F401 - probed by the kernel tests
    binomial_thin,
    binomial_thin_serial,
    lookup_values,
    lookup_values_serial,
    mask_positions,
    mask_positions_serial,
)
from ._kernels_tokens import (
    _kth_largest,  # noqa: F401 - probed by the kernel tests
    pack_tokens,
    pack_tokens_serial,
    ragged_to_padded,
)

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
