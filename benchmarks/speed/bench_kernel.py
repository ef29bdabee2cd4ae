"""Section a: the numba token kernels vs a vectorised numpy/scipy implementation.

``numba`` is :func:`~scxtrimo.data._tokens.inference_batch` as the package runs it (parallel
kernels); ``numba_serial`` runs the same kernels' single-threaded twins, which isolates the cost
of waking the thread pool on every call from the kernels' own work.

Both sides turn CSR rows of raw counts into the padded encoder input ``[T, S, genes…, pad]``
(gather and map columns to the vocabulary, sum duplicates, sort by gene, log-normalise, pack),
i.e. what :func:`scxtrimo.data._tokens.inference_batch` does. Their outputs are checked to be
identical on every batch before anything is timed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from _common import (
    copy_bandwidth,
    interleaved,
    load_average,
    load_pbmc4k,
    log,
    summary,
    tokens_per_cell,
)
from scxtrimo.data import _kernels as K
from scxtrimo.data._loading import plan_batches
from scxtrimo.data._tokens import (
    NORMALIZE_SCALE,
    InputSpec,
    TokenIndex,
    csr_arrays,
    inference_batch,
)

#: Batch plans timed: the embedding path's default token budget, and large batches.
REGIMES = {
    "embedding batches (16,384-token budget)": 16_384,
    "large batches (1,048,576-token budget)": 1_048_576,
}


def tile_csr(matrix: sp.csr_matrix, n_cells: int) -> sp.csr_matrix:
    """``matrix`` stacked on itself (``scipy.sparse.vstack``) up to exactly ``n_cells`` rows."""
    full, rest = divmod(n_cells, matrix.shape[0])
    blocks = [matrix] * full + ([matrix[:rest]] if rest else [])
    return sp.vstack(blocks, format="csr")


def numpy_inference_batch(
    matrix: sp.csr_matrix,
    rows: np.ndarray,
    col_to_vocab: np.ndarray,
    spec: InputSpec,
    index: TokenIndex,
) -> dict[str, np.ndarray]:
    """Vectorised numpy/scipy twin of :func:`~scxtrimo.data._tokens.inference_batch`."""
    n = len(rows)
    sub = matrix[rows]
    genes = col_to_vocab[sub.indices]
    keep = genes >= 0
    row_of_entry = np.repeat(np.arange(n), np.diff(sub.indptr))
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of_entry[keep], minlength=n), out=indptr[1:])
    vocab = sp.csr_matrix(
        (sub.data[keep].astype(np.float64), genes[keep], indptr), shape=(n, index.n_genes)
    )
    vocab.sum_duplicates()  # sorts genes within rows and adds repeated genes
    vocab.eliminate_zeros()
    lengths = np.diff(vocab.indptr)
    row_of_entry = np.repeat(np.arange(n), lengths)
    totals = np.bincount(row_of_entry, weights=vocab.data, minlength=n)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.log1p(vocab.data / totals[row_of_entry] * NORMALIZE_SCALE)
        values[totals[row_of_entry] <= 0] = 0.0
        s = np.log10(totals)
        t = spec.target_depth(totals)
    return _pack(vocab.indices, values, lengths, t, s, spec, index)


def serial_inference_batch(
    matrix: sp.csr_matrix,
    rows: np.ndarray,
    col_to_vocab: np.ndarray,
    spec: InputSpec,
    index: TokenIndex,
) -> dict[str, np.ndarray]:
    """:func:`~scxtrimo.data._tokens.inference_batch` with the kernels' single-threaded twins."""
    indptr, indices, data = csr_arrays(matrix)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    row_ptr, genes, raw = K.gather_csr_rows_serial(indptr, indices, data, col_to_vocab, rows)
    totals = K.row_sums(row_ptr, raw)
    values = K.log_normalize_serial(row_ptr, raw, totals, NORMALIZE_SCALE)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.log10(totals)
        t = spec.target_depth(totals)
    gene_index, value, padding_mask = K.pack_tokens_serial(
        row_ptr, genes, values, t, s, index.t, index.s, index.pad, -1
    )
    return {"gene_index": gene_index, "value": value, "padding_mask": padding_mask}


def _pack(
    genes: np.ndarray,
    values: np.ndarray,
    lengths: np.ndarray,
    t: np.ndarray,
    s: np.ndarray,
    spec: InputSpec,
    index: TokenIndex,
) -> dict[str, np.ndarray]:
    """Pad ragged rows into ``[T, S, genes…, pad]`` (no ``max_genes`` cap)."""
    if spec.max_genes is not None:
        raise NotImplementedError("the numpy baseline does not cap genes")
    n = len(lengths)
    width = 2 + (int(lengths.max()) if n else 0)
    valid = np.arange(width - 2) < lengths[:, None]  # row-major order = ragged order
    gene_index = np.full((n, width), index.pad, dtype=np.int64)
    value = np.zeros((n, width), dtype=np.float32)
    padding_mask = np.ones((n, width), dtype=bool)
    gene_index[:, 0], gene_index[:, 1] = index.t, index.s
    value[:, 0], value[:, 1] = t, s
    padding_mask[:, :2] = False
    gene_index[:, 2:][valid] = genes
    value[:, 2:][valid] = values
    padding_mask[:, 2:][valid] = False
    return {"gene_index": gene_index, "value": value, "padding_mask": padding_mask}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for key in ("gene_index", "value", "padding_mask"):
        if a[key].shape != b[key].shape or not np.array_equal(a[key], b[key]):
            raise AssertionError(f"numba and numpy outputs differ in {key!r}")


def bytes_touched(matrix: sp.csr_matrix, batches: list[np.ndarray], widths: list[int]) -> int:
    """Compulsory memory traffic of a pass: CSR rows and vocabulary lookups read, tokens written.

    Intermediate ragged arrays are not counted, so this is a lower bound of either side's traffic.
    """
    lengths = np.diff(matrix.indptr)
    entry = matrix.indices.itemsize + matrix.data.itemsize + 8  # + int64 col_to_vocab lookup
    total = 0
    for rows, width in zip(batches, widths):
        total += int(lengths[rows].sum()) * entry + len(rows) * 2 * matrix.indptr.itemsize
        total += len(rows) * width * (8 + 4 + 1)  # int64 gene, float32 value, bool mask
    return total


def _pass(build, matrix, batches, col_to_vocab, spec, index):
    def run() -> None:
        for rows in batches:
            build(matrix, rows, col_to_vocab, spec, index)

    return run


def _regime(matrix, col_to_vocab, n_tokens, max_tokens, repeats) -> dict[str, Any]:
    spec, index = InputSpec(), TokenIndex(19264)
    batches = plan_batches(n_tokens, max_tokens=max_tokens)
    widths = []
    for rows in batches:  # equality on every batch; also the warm-up of both sides
        ours = inference_batch(matrix, rows, col_to_vocab, spec, index)
        _assert_same(ours, numpy_inference_batch(matrix, rows, col_to_vocab, spec, index))
        _assert_same(ours, serial_inference_batch(matrix, rows, col_to_vocab, spec, index))
        widths.append(ours["value"].shape[1])
    times = interleaved(
        {
            "numba": _pass(inference_batch, matrix, batches, col_to_vocab, spec, index),
            "numpy": _pass(numpy_inference_batch, matrix, batches, col_to_vocab, spec, index),
            "numba_serial": _pass(
                serial_inference_batch, matrix, batches, col_to_vocab, spec, index
            ),
        },
        repeats,
    )
    n_cells = int(sum(len(b) for b in batches))
    nnz = int(np.diff(matrix.indptr).sum())
    traffic = bytes_touched(matrix, batches, widths)
    out: dict[str, Any] = {
        "max_tokens": max_tokens,
        "n_batches": len(batches),
        "mean_cells_per_batch": n_cells / len(batches),
        "bytes_touched": traffic,
        "outputs_identical": True,
    }
    for name, ts in times.items():
        best = summary(ts)
        median = best["median_s"]
        out[name] = {
            **best,
            "cells_per_s": n_cells / median,
            "nnz_per_s": nnz / median,
            "bytes_per_s": traffic / median,
        }
    out["speedup"] = out["numpy"]["median_s"] / out["numba"]["median_s"]
    out["speedup_serial"] = out["numpy"]["median_s"] / out["numba_serial"]["median_s"]
    return out


def kernel_benchmark(n_cells: int, repeats: int) -> dict[str, Any]:
    """Worker: time both implementations on pbmc4k tiled to ``n_cells`` cells."""
    load_start = load_average()
    adata, col_to_vocab = load_pbmc4k()
    matrix = tile_csr(adata.X, n_cells)
    n_tokens = tokens_per_cell(matrix, col_to_vocab)
    log(f"kernel: {n_cells:,} cells, {matrix.nnz:,} non-zeros")
    bandwidth = copy_bandwidth()
    regimes = {}
    for name, max_tokens in REGIMES.items():
        log(f"kernel: {name}")
        regimes[name] = _regime(matrix, col_to_vocab, n_tokens, max_tokens, repeats)
    return {
        "n_cells": n_cells,
        "nnz": int(matrix.nnz),
        "mean_tokens_per_cell": float(n_tokens.mean()),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "copy_bandwidth_end_bytes_per_s": copy_bandwidth(),
        "regimes": regimes,
        "load_average_start": load_start,
    }
