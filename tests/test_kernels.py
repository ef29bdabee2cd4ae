"""Tests of the numba token kernels against plain numpy/scipy references.

Property tests draw random CSR matrices and ragged rows with hypothesis; statistical tests
use fixed seeds with tolerances of several standard errors, so they are deterministic yet
would fail for a wrong rate. Most property tests call the serial twins for the many dtype
combinations (they share the parallel kernels' source and compile several times faster);
the parallel kernels are checked against the twins and on the real data.
"""

from __future__ import annotations

import math
import multiprocessing
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scxtrimo.data import _kernels as K

REPO = Path(__file__).resolve().parents[1]
PBMC_CANDIDATES = (
    REPO / "src/scxtrimo/datasets/pbmc4k.h5ad",
    Path(__file__).resolve().parents[2] / "shared/data/pbmc4k_soupx_2170.h5ad",
)
VOCAB_TSV = REPO / "src/scxtrimo/_resources/OS_scRNA_gene_index.19264.tsv"

# Example counts come from the hypothesis profile (tests/conftest.py): "ci" or HYPOTHESIS_PROFILE=dev.
PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# numba compiles one specialisation per dtype combination (~1-2 s serial, ~4-7 s parallel),
# so the tests use a few combinations that together cover every index dtype and every
# data dtype, rather than the full product.
SERIAL_COMBOS = (
    (np.int32, np.int32, np.int32),
    (np.int64, np.int64, np.float64),
    (np.int32, np.int64, np.float32),
    (np.int64, np.int32, np.int64),
    (np.int32, np.int32, np.uint8),
)
PARALLEL_COMBOS = SERIAL_COMBOS[:2]


# ------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------


def ref_gather(indptr, indices, data, col_to_vocab, rows):
    """Dense in-vocabulary matrix via np.add.at, then its non-zeros in row-major order."""
    n = len(rows)
    starts = indptr[rows].astype(np.int64)
    lens = indptr[rows + 1].astype(np.int64) - starts
    pos = np.concatenate([np.arange(s, s + m) for s, m in zip(starts, lens)] + [[]]).astype(
        np.int64
    )
    row_id = np.repeat(np.arange(n), lens)
    genes = col_to_vocab[indices[pos]]
    keep = genes >= 0
    # np.unique keeps the gene order, so huge gene indices get a small dense matrix.
    uniq, code = np.unique(genes[keep], return_inverse=True)
    dense = np.zeros((n, len(uniq)))
    np.add.at(dense, (row_id[keep], code), data[pos][keep].astype(np.float64))
    r, c = np.nonzero(dense)
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=n))]).astype(np.int64)
    return row_ptr, uniq[c], dense[r, c]


def ref_pack(row_ptr, genes, values, t_values, s_values, t_index, s_index, pad, max_genes):
    n = len(row_ptr) - 1
    lens = np.diff(row_ptr)
    L = int(lens.max()) if n else 0
    if max_genes >= 0:
        L = min(L, max_genes)
    gi = np.full((n, 2 + L), pad, np.int64)
    val = np.zeros((n, 2 + L), np.float32)
    pm = np.ones((n, 2 + L), bool)
    gi[:, 0], gi[:, 1] = t_index, s_index
    val[:, 0], val[:, 1] = t_values, s_values
    pm[:, :2] = False
    for i in range(n):
        g = genes[row_ptr[i] : row_ptr[i + 1]]
        v = values[row_ptr[i] : row_ptr[i + 1]]
        if len(g) > L:
            keep = np.sort(np.lexsort((g, -v))[:L])  # value desc, then smaller gene
            g, v = g[keep], v[keep]
        gi[i, 2 : 2 + len(g)] = g
        val[i, 2 : 2 + len(g)] = v.astype(np.float32)
        pm[i, 2 : 2 + len(g)] = False
    return gi, val, pm


def split_rows(row_ptr, *arrays):
    """Per-row tuples of slices, to compare rows across differently ordered batches."""
    return [tuple(a[row_ptr[i] : row_ptr[i + 1]] for a in arrays) for i in range(len(row_ptr) - 1)]


def assert_rows_equal(rows_a, rows_b):
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b):
        for x, y in zip(ra, rb):
            np.testing.assert_array_equal(x, y)


def ragged_from_lists(genes_per_row, values_per_row, genes_dtype=np.int32):
    lens = [len(g) for g in genes_per_row]
    row_ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    genes = np.concatenate([np.asarray(g) for g in genes_per_row] + [[]]).astype(genes_dtype)
    values = np.concatenate([np.asarray(v) for v in values_per_row] + [[]]).astype(np.float64)
    return row_ptr, genes, values


def random_ragged(rng, n_rows, n_genes, mean_len, *, counts=False):
    """Random canonical ragged rows: sorted unique genes, non-zero values."""
    genes_l, values_l = [], []
    for _ in range(n_rows):
        m = min(n_genes, rng.poisson(mean_len))
        genes_l.append(np.sort(rng.choice(n_genes, m, replace=False)))
        if counts:
            values_l.append(rng.geometric(0.4, m).astype(np.float64))
        else:
            values_l.append(rng.gamma(2.0, 1.0, m) + 0.01)
    return ragged_from_lists(genes_l, values_l)


# ------------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------------


@st.composite
def csr_case(draw, combos=SERIAL_COMBOS):
    """A CSR matrix with duplicates, unsorted columns, empty rows, maybe all zeros."""
    n_rows = draw(st.integers(0, 7))
    n_cols = draw(st.integers(1, 10))
    indptr_dtype, indices_dtype, data_dtype = draw(st.sampled_from(combos))
    data_dtype = np.dtype(data_dtype)
    signed = data_dtype.kind != "u"
    all_zero = draw(st.booleans()) and draw(st.booleans())
    value = st.just(0) if all_zero else st.integers(-4 if signed else 0, 5)
    rows_entries = draw(
        st.lists(
            st.lists(st.tuples(st.integers(0, n_cols - 1), value), max_size=12),
            min_size=n_rows,
            max_size=n_rows,
        )
    )
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows_entries])])
    indices = np.array([c for r in rows_entries for c, _ in r], dtype=np.int64)
    data = np.array([v for r in rows_entries for _, v in r], dtype=np.float64)
    if data_dtype.kind == "f" and draw(st.booleans()):
        data = data / 4  # quarters: fractional yet exactly summable
    # Vocabulary maps with unmapped columns and collisions; sometimes with gene indices far
    # beyond the dense-scratch limit, which exercises the sorting strategy.
    n_vocab = draw(st.integers(1, 8))
    offset = draw(st.sampled_from([0, 0, 0, K._DENSE_VOCAB_LIMIT, 2**31 - 1 - n_vocab]))
    col_to_vocab = np.array(
        draw(st.lists(st.integers(-1, n_vocab - 1), min_size=n_cols, max_size=n_cols)),
        dtype=np.int64,
    )
    col_to_vocab = np.where(col_to_vocab >= 0, col_to_vocab + offset, -1)
    rows = np.array(
        draw(st.lists(st.integers(0, n_rows - 1), max_size=9)) if n_rows else [], np.int64
    )
    return (
        indptr.astype(indptr_dtype),
        indices.astype(indices_dtype),
        data.astype(data_dtype),
        col_to_vocab,
        rows,
    )


@st.composite
def ragged_case(draw, max_rows=6, max_genes=12):
    n_genes = draw(st.integers(1, max_genes))
    n = draw(st.integers(0, max_rows))
    genes_l, values_l = [], []
    for _ in range(n):
        g = sorted(draw(st.sets(st.integers(0, n_genes - 1))))
        # Small integers make ties, which the top-k cap must break by gene index.
        v = draw(st.lists(st.integers(1, 4), min_size=len(g), max_size=len(g)))
        genes_l.append(g)
        values_l.append(v)
    row_ptr, genes, values = ragged_from_lists(genes_l, values_l)
    return n_genes, row_ptr, genes, values


# ------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pbmc():
    path = next((p for p in PBMC_CANDIDATES if p.exists()), None)
    if path is None:
        pytest.skip(f"pbmc4k data set not found at any of {[str(p) for p in PBMC_CANDIDATES]}")
    anndata = pytest.importorskip("anndata")
    pd = pytest.importorskip("pandas")
    adata = anndata.read_h5ad(path)
    X = sp.csr_matrix(adata.X)
    vocab = pd.read_csv(VOCAB_TSV, sep="\t")
    lookup = dict(zip(vocab["gene_name"], vocab["index"]))
    col_to_vocab = np.array([lookup.get(g, -1) for g in adata.var_names], np.int64)
    return X, col_to_vocab, len(vocab)


# ------------------------------------------------------------------------------------------
# gather_csr_rows
# ------------------------------------------------------------------------------------------


@PROPERTY
@given(case=csr_case())
def test_gather_matches_dense_reference(case):
    indptr, indices, data, col_to_vocab, rows = case
    row_ptr, genes, counts = K.gather_csr_rows_serial(indptr, indices, data, col_to_vocab, rows)
    ref_ptr, ref_genes, ref_counts = ref_gather(indptr, indices, data, col_to_vocab, rows)
    assert row_ptr.dtype == np.int64
    assert genes.dtype == np.int32
    assert counts.dtype == np.float64
    np.testing.assert_array_equal(row_ptr, ref_ptr)
    np.testing.assert_array_equal(genes, ref_genes)
    np.testing.assert_array_equal(counts, ref_counts)


@pytest.mark.slow
@PROPERTY
@given(case=csr_case(combos=PARALLEL_COMBOS))
def test_gather_parallel_equals_serial(case):
    par = K.gather_csr_rows(*case)
    ser = K.gather_csr_rows_serial(*case)
    for a, b in zip(par, ser):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("indptr_dtype", "indices_dtype", "data_dtype"), PARALLEL_COMBOS)
def test_gather_parallel_dtypes(indptr_dtype, indices_dtype, data_dtype):
    rng = np.random.default_rng(7)
    # Unsorted columns with duplicates: build COO with repeats, keep the CSR uncanonical.
    n_rows, n_cols = 60, 40
    nnz = 900
    r = np.sort(rng.integers(0, n_rows, nnz))
    c = rng.integers(0, n_cols, nnz)
    v = rng.integers(1, 6, nnz)
    indptr = np.searchsorted(r, np.arange(n_rows + 1)).astype(indptr_dtype)
    indices, data = c.astype(indices_dtype), v.astype(data_dtype)
    col_to_vocab = rng.integers(-1, 25, n_cols).astype(np.int64)
    rows = rng.integers(0, n_rows, 80).astype(np.int64)
    got = K.gather_csr_rows(indptr, indices, data, col_to_vocab, rows)
    for a, b in zip(got, ref_gather(indptr, indices, data, col_to_vocab, rows)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_gather_edge_cases():
    indptr = np.array([0, 0, 3, 3], np.int64)
    indices = np.array([2, 0, 2], np.int32)
    data = np.array([0, 0, 0], np.int32)
    c2v = np.array([1, -1, 0], np.int64)
    # all-zero values, empty rows and n = 0 requested rows
    ptr, genes, counts = K.gather_csr_rows(indptr, indices, data, c2v, np.array([0, 1, 2, 1]))
    np.testing.assert_array_equal(ptr, [0, 0, 0, 0, 0])
    assert genes.shape == (0,)
    assert counts.shape == (0,)
    ptr, genes, counts = K.gather_csr_rows(indptr, indices, data, c2v, np.empty(0, np.int64))
    np.testing.assert_array_equal(ptr, [0])
    assert genes.shape == counts.shape == (0,)
    # row 1 holds column 2 twice (+2 and -2, unsorted around column 0)
    data = np.array([2, 5, -2], np.int32)
    # duplicates cancelling to exactly zero are dropped
    ptr, genes, counts = K.gather_csr_rows(
        indptr, indices, data, np.array([-1, -1, 4]), np.array([1])
    )
    np.testing.assert_array_equal(ptr, [0, 0])
    # a collision sums both columns into one gene
    ptr, genes, counts = K.gather_csr_rows(
        indptr, indices, data, np.array([4, -1, 4]), np.array([1])
    )
    np.testing.assert_array_equal(genes, [4])
    np.testing.assert_array_equal(counts, [5])
    ptr, genes, counts = K.gather_csr_rows(
        indptr, indices, data, np.array([1, -1, 0]), np.array([1, 1])
    )
    np.testing.assert_array_equal(ptr, [0, 1, 2])
    np.testing.assert_array_equal(genes, [1, 1])
    np.testing.assert_array_equal(counts, [5, 5])


@pytest.mark.parametrize(
    ("rows", "indices", "c2v", "message"),
    [
        ([3], [0, 1], [0, 1], "out of range of indptr"),
        ([-1], [0, 1], [0, 1], "out of range of indptr"),
        ([0], [0, 2], [0, 1], "out of range of col_to_vocab"),
        ([0], [0, -1], [0, 1], "out of range of col_to_vocab"),
        ([0], [0, 1], [0, 2**31], "does not fit in int32"),
    ],
)
def test_gather_errors(rows, indices, c2v, message):
    indptr = np.array([0, 2, 2], np.int64)
    with pytest.raises(ValueError, match=message):
        K.gather_csr_rows(
            indptr,
            np.array(indices, np.int64),
            np.array([1.0, 2.0]),
            np.array(c2v, np.int64),
            np.array(rows, np.int64),
        )


# ------------------------------------------------------------------------------------------
# row_sums / log_normalize
# ------------------------------------------------------------------------------------------


@PROPERTY
@given(
    case=ragged_case(),
    scale=st.sampled_from([1.0, 1e4, 123.25]),
    factor=st.sampled_from([1.0, 0.37, 16.0]),
)
def test_row_sums_and_log_normalize(case, scale, factor):
    # factor 1 and 16 give integer counts on both sides of the per-row memo limit (64),
    # factor 0.37 fractional values that bypass the memo.
    _, row_ptr, _, values = case
    values = values * factor
    n = len(row_ptr) - 1
    totals = K.row_sums(row_ptr, values)
    ref_totals = np.zeros(n)
    for i in range(n):  # sequential, like the kernel (np.sum is pairwise)
        for v in values[row_ptr[i] : row_ptr[i + 1]]:
            ref_totals[i] += v
    np.testing.assert_array_equal(totals, ref_totals)
    # Force a zero and a negative total: those rows normalise to 0.
    totals_mod = totals.copy()
    if n:
        totals_mod[0] = 0.0
        totals_mod[-1] = -totals_mod[-1]
    got = K.log_normalize_serial(row_ptr, values, totals_mod, scale)
    per_entry = np.repeat(totals_mod, np.diff(row_ptr))
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = np.where(per_entry > 0, np.log1p(values / per_entry * scale), 0.0)
    # NumPy's SIMD log1p may differ from the C library's by 1 ulp; math.log1p is the C
    # library's, so against it (same operation order) the result must be bit-identical.
    np.testing.assert_allclose(got, ref, rtol=1e-15, atol=0)
    exact = [math.log1p(v / t * scale) if t > 0 else 0.0 for v, t in zip(values, per_entry)]
    np.testing.assert_array_equal(got, np.array(exact, np.float64))
    np.testing.assert_array_equal(K.log_normalize(row_ptr, values, totals_mod, scale), got)


def test_row_sums_integer_values_and_empty():
    row_ptr = np.array([0, 0, 3, 3], np.int64)
    np.testing.assert_array_equal(K.row_sums(row_ptr, np.array([1, 2, 3], np.int32)), [0, 6, 0])
    assert K.row_sums(np.zeros(1, np.int64), np.empty(0)).shape == (0,)
    assert K.log_normalize(np.zeros(1, np.int64), np.empty(0), np.empty(0), 1e4).shape == (0,)
    with pytest.raises(ValueError, match="row_ptr"):
        K.row_sums(np.array([0, 2], np.int64), np.ones(3))


# ------------------------------------------------------------------------------------------
# pack_tokens
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@PROPERTY
@given(case=ragged_case(), max_genes=st.integers(-1, 8), genes64=st.booleans())
def test_pack_tokens_matches_reference(case, max_genes, genes64):
    _, row_ptr, genes, values = case
    if genes64:
        genes = genes.astype(np.int64)
    n = len(row_ptr) - 1
    t_values = np.linspace(1.0, 2.0, n)
    s_values = np.linspace(3.0, 4.0, n)
    args = (row_ptr, genes, values, t_values, s_values, 100, 101, 99, max_genes)
    got = K.pack_tokens_serial(*args)
    ref = ref_pack(*args)
    assert got[0].dtype == np.int64
    assert got[1].dtype == np.float32
    assert got[2].dtype == np.bool_
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(K.pack_tokens(*args), got):
        np.testing.assert_array_equal(a, b)


@PROPERTY
@given(values=st.lists(st.integers(0, 5), min_size=1, max_size=40), data=st.data())
def test_kth_largest_quickselect(values, data):
    # the selection behind the cap, on tie-heavy data, against a full sort
    v = np.array(values, np.float64)
    k = data.draw(st.integers(1, len(v)))
    pad = np.array([9.0, -9.0])  # neighbours outside [a, b) must be ignored
    buf = np.concatenate([pad, v, pad])
    assert K._kth_largest(buf, 2, 2 + len(v), k) == np.sort(v)[::-1][k - 1]
    np.testing.assert_array_equal(buf[2:-2], v)  # input untouched


def test_pack_cap_keeps_largest_values_ties_to_smaller_gene():
    row_ptr = np.array([0, 6, 8], np.int64)
    genes = np.array([1, 3, 4, 7, 8, 9, 2, 5], np.int32)
    values = np.array([0.5, 2.0, 1.0, 2.0, 3.0, 1.0, 1.0, 1.0])
    gi, val, pm = K.pack_tokens(row_ptr, genes, values, np.ones(2), np.ones(2), 20, 21, 22, 4)
    # top 4 of row 0: 3.0 (gene 8), 2.0 (3), 2.0 (7), then the 1.0 tie goes to gene 4 over 9
    np.testing.assert_array_equal(gi[0], [20, 21, 3, 4, 7, 8])
    np.testing.assert_array_equal(val[0], [1, 1, 2, 1, 2, 3])
    np.testing.assert_array_equal(gi[1], [20, 21, 2, 5, 22, 22])
    np.testing.assert_array_equal(pm[1], [False, False, False, False, True, True])
    assert not pm[0].any()
    # the float64 -> float32 cast happens last: a value just above a float32 tie still wins
    values2 = np.array([1.0, 1.0 + 1e-12])
    gi, val, _ = K.pack_tokens(
        np.array([0, 2], np.int64),
        np.array([0, 1], np.int32),
        values2,
        np.ones(1),
        np.ones(1),
        5,
        6,
        7,
        1,
    )
    np.testing.assert_array_equal(gi[0], [5, 6, 1])


def test_pack_empty_inputs():
    gi, val, pm = K.pack_tokens(
        np.zeros(1, np.int64),
        np.empty(0, np.int32),
        np.empty(0),
        np.empty(0),
        np.empty(0),
        1,
        2,
        0,
        -1,
    )
    assert gi.shape == val.shape == pm.shape == (0, 2)
    gi, val, pm = K.pack_tokens(
        np.zeros(3, np.int64),
        np.empty(0, np.int32),
        np.empty(0),
        np.ones(2),
        np.ones(2),
        1,
        2,
        0,
        5,
    )
    assert gi.shape == (2, 2)
    assert not pm.any()


# ------------------------------------------------------------------------------------------
# binomial_thin
# ------------------------------------------------------------------------------------------


def test_binomial_thin_mean_and_variance():
    # One row of assorted counts repeated under many seeds; both small-count (Bernoulli)
    # and large-count (inversion, BTPE) samplers are covered.
    base = np.array([1, 2, 3, 4, 5, 10, 50, 1000], np.float64)
    n_rows, rate = 4000, 0.3
    row_ptr = np.arange(n_rows + 1, dtype=np.int64) * len(base)
    genes = np.tile(np.arange(len(base), dtype=np.int32), n_rows)
    counts = np.tile(base, n_rows)
    out_ptr, out_genes, out_counts = K.binomial_thin(
        row_ptr, genes, counts, np.full(n_rows, rate), np.arange(n_rows, dtype=np.int64)
    )
    assert np.all(out_counts > 0)
    assert np.all(out_counts == np.round(out_counts))
    full = K.lookup_values(out_ptr, out_genes, out_counts, row_ptr, genes).reshape(n_rows, -1)
    assert np.all(full <= base)
    mean, var = full.mean(0), full.var(0, ddof=1)
    exp_mean, exp_var = rate * base, rate * (1 - rate) * base
    # 5 standard errors of the mean; variance within 5 standard errors too (~sqrt(2/n))
    np.testing.assert_array_less(np.abs(mean - exp_mean), 5 * np.sqrt(exp_var / n_rows))
    np.testing.assert_array_less(np.abs(var - exp_var), 5 * exp_var * np.sqrt(2 / n_rows) + 0.02)


def test_binomial_thin_rate_one_zero_and_reproducibility():
    rng = np.random.default_rng(3)
    row_ptr, genes, counts = random_ragged(rng, 30, 50, 10, counts=True)
    seeds = rng.integers(-(2**62), 2**62, 30)
    out = K.binomial_thin(row_ptr, genes, counts, np.ones(30), seeds)
    for a, b in zip(out, (row_ptr, genes, counts)):
        np.testing.assert_array_equal(a, b)
    out = K.binomial_thin(row_ptr, genes, counts, np.zeros(30), seeds)
    np.testing.assert_array_equal(out[0], np.zeros(31))
    rates = rng.uniform(0.2, 0.8, 30)
    a = K.binomial_thin(row_ptr, genes, counts, rates, seeds)
    b = K.binomial_thin(row_ptr, genes, counts, rates, seeds)
    c = K.binomial_thin(row_ptr, genes, counts, rates, seeds + 1)
    s = K.binomial_thin_serial(row_ptr, genes, counts, rates, seeds)
    for x, y, z in zip(a, b, s):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert a[1].dtype == np.int32
    assert a[2].dtype == np.float64
    # genes keep their dtype
    assert (
        K.binomial_thin(row_ptr, genes.astype(np.int64), counts, rates, seeds)[1].dtype == np.int64
    )


@pytest.mark.parametrize(
    ("counts", "rate", "message"),
    [
        ([1.5], 0.5, "integers"),
        ([-1.0], 0.5, "integers"),
        ([1.0], 1.5, r"\[0, 1\]"),
        ([1.0], np.nan, r"\[0, 1\]"),
    ],
)
def test_binomial_thin_errors(counts, rate, message):
    with pytest.raises(ValueError, match=message):
        K.binomial_thin(
            np.array([0, 1], np.int64),
            np.array([0], np.int32),
            np.array(counts),
            np.array([rate]),
            np.zeros(1, np.int64),
        )


# ------------------------------------------------------------------------------------------
# mask_positions
# ------------------------------------------------------------------------------------------

MASK_ARGS = {"nonzero_prob": 0.3, "zero_prob": 0.03, "replace_prob": 0.8, "random_prob": 0.1}


def run_mask(row_ptr, genes, values, n_genes, seeds, fn=None, **kw):
    args = {**MASK_ARGS, **kw}
    fn = fn or K.mask_positions
    return fn(
        row_ptr,
        genes,
        values,
        n_genes,
        args["nonzero_prob"],
        args["zero_prob"],
        args["replace_prob"],
        args["random_prob"],
        seeds,
    )


def check_mask_invariants(row_ptr, genes, values, n_genes, out):
    visible, m_ptr, m_genes, m_input, m_token = out
    assert visible.dtype == np.bool_
    assert m_ptr.dtype == np.int64
    assert m_genes.dtype == np.int32
    assert m_input.dtype == np.float32
    assert m_token.dtype == np.bool_
    assert len(visible) == len(genes)
    assert len(m_ptr) == len(row_ptr)
    for i in range(len(row_ptr) - 1):
        g = genes[row_ptr[i] : row_ptr[i + 1]]
        v = values[row_ptr[i] : row_ptr[i + 1]]
        vis = visible[row_ptr[i] : row_ptr[i + 1]]
        mg = m_genes[m_ptr[i] : m_ptr[i + 1]]
        mi = m_input[m_ptr[i] : m_ptr[i + 1]]
        mt = m_token[m_ptr[i] : m_ptr[i + 1]]
        if len(g):
            assert vis.any(), "a non-empty row keeps at least one visible gene"
        assert np.all(np.diff(mg) > 0), "masked genes are sorted and distinct"
        assert np.all((mg >= 0) & (mg < n_genes))
        stored = np.isin(mg, g)
        # masked stored genes are exactly the invisible entries
        np.testing.assert_array_equal(np.sort(mg[stored]), g[~vis])
        # every other masked gene really is a zero of the row
        assert not np.isin(mg[~stored], g).any()
        np.testing.assert_array_equal(mi[mt], 0)
        own = np.zeros(len(mg), np.float32)
        own[stored] = v[np.searchsorted(g, mg[stored])]
        row_vals = np.concatenate([v.astype(np.float32), [np.float32(0)]])
        ok = mt | (mi == own) | np.isin(mi, row_vals)
        assert ok.all(), "decoder input is a mask token, the own value or a row value"


@PROPERTY
@given(
    case=ragged_case(max_genes=40),
    nonzero_prob=st.sampled_from([0.0, 0.3, 1.0]),
    zero_prob=st.sampled_from([0.0, 0.03, 0.6, 1.0]),
    seed=st.integers(-(2**63), 2**63 - 1),
)
def test_mask_invariants(case, nonzero_prob, zero_prob, seed):
    n_genes, row_ptr, genes, values = case
    n = len(row_ptr) - 1
    seeds = (np.arange(n, dtype=np.int64) * 7919 + seed % 1000).astype(np.int64)
    kw = {"nonzero_prob": nonzero_prob, "zero_prob": zero_prob}
    out = run_mask(row_ptr, genes, values, n_genes, seeds, fn=K.mask_positions_serial, **kw)
    check_mask_invariants(row_ptr, genes, values, n_genes, out)
    lens = np.diff(row_ptr)
    n_zero = n_genes - lens
    n_visible = np.diff(np.concatenate([[0], np.cumsum(out[0])])[row_ptr])
    n_masked_stored = lens - n_visible
    n_masked_zero = np.diff(out[1]) - n_masked_stored
    if nonzero_prob == 0.0:
        assert out[0].all()
    if nonzero_prob == 1.0:
        np.testing.assert_array_equal(n_masked_stored, np.maximum(lens - 1, 0))
    if zero_prob == 0.0:
        np.testing.assert_array_equal(n_masked_zero, 0)
    if zero_prob == 1.0:
        np.testing.assert_array_equal(n_masked_zero, n_zero)
    for a, b in zip(run_mask(row_ptr, genes, values, n_genes, seeds, **kw), out):
        np.testing.assert_array_equal(a, b)


def test_mask_rates_and_split():
    rng = np.random.default_rng(11)
    n_rows, n_genes = 400, 1000
    row_ptr, genes, values = random_ragged(rng, n_rows, n_genes, 50)
    seeds = np.arange(n_rows, dtype=np.int64)
    visible, m_ptr, m_genes, m_input, m_token = out = run_mask(
        row_ptr, genes, values, n_genes, seeds
    )
    check_mask_invariants(row_ptr, genes, values, n_genes, out)
    nnz = len(genes)
    masked_frac = 1 - visible.mean()
    assert abs(masked_frac - 0.3) < 5 * np.sqrt(0.21 / nnz)
    n_zero_total = n_rows * n_genes - nnz
    n_masked_zero = len(m_genes) - (nnz - visible.sum())
    sd = np.sqrt(n_zero_total * 0.03 * 0.97)
    assert abs(n_masked_zero - 0.03 * n_zero_total) < 5 * sd
    # 80/10/10 split over all masked positions; "random" and "unchanged" are told apart on
    # the masked zero genes, whose own value is 0 while any row value is > 0.
    M = len(m_genes)
    assert abs(m_token.mean() - 0.8) < 5 * np.sqrt(0.16 / M)
    row_of = np.repeat(np.arange(n_rows), np.diff(m_ptr))
    is_zero_gene = np.ones(M, bool)
    for i in range(n_rows):
        sl = slice(m_ptr[i], m_ptr[i + 1])
        is_zero_gene[sl] = ~np.isin(m_genes[sl], genes[row_ptr[i] : row_ptr[i + 1]])
    sel = is_zero_gene & ~m_token & (np.diff(row_ptr)[row_of] > 0)
    random_frac = (m_input[sel] != 0).mean()  # among non-token positions: 0.1 / 0.2
    assert abs(random_frac - 0.5) < 5 * np.sqrt(0.25 / sel.sum())
    assert abs(sel.sum() / is_zero_gene[np.diff(row_ptr)[row_of] > 0].sum() - 0.2) < 0.02


def test_mask_zero_genes_uniform():
    # One fixed row, many seeds: every zero gene must be picked equally often, in both the
    # sparse-draw and the complement regime of the bitmap sampler and in the rank sampler.
    stored = np.array([0, 3, 4, 10, 17, 18, 19], np.int32)
    n_genes, n_rows = 24, 6000
    row_ptr = np.arange(n_rows + 1, dtype=np.int64) * len(stored)
    genes = np.tile(stored, n_rows)
    values = np.ones(len(genes))
    zero_genes = np.setdiff1d(np.arange(n_genes), stored)
    for zero_prob in (0.2, 0.8):
        out = run_mask(
            row_ptr,
            genes,
            values,
            n_genes,
            np.arange(n_rows, dtype=np.int64),
            nonzero_prob=0.0,
            zero_prob=zero_prob,
        )
        freq = np.bincount(out[2], minlength=n_genes)
        assert freq[stored].sum() == 0
        expected = n_rows * zero_prob
        np.testing.assert_array_less(np.abs(freq[zero_genes] - expected), 5 * np.sqrt(expected))


def test_mask_large_vocabulary_uses_rank_sampler():
    n_genes = K._BITMAP_GENES_LIMIT + 12345
    stored = np.array([5, 7, n_genes - 2], np.int32)
    n_rows = 20
    row_ptr = np.arange(n_rows + 1, dtype=np.int64) * 3
    genes = np.tile(stored, n_rows)
    values = np.arange(1.0, 3 * n_rows + 1)
    out = run_mask(
        row_ptr, genes, values, n_genes, np.arange(n_rows, dtype=np.int64), zero_prob=2e-4
    )
    check_mask_invariants(row_ptr, genes, values, n_genes, out)
    n_masked_zero = len(out[2]) - (len(genes) - out[0].sum())
    expected = 2e-4 * n_rows * (n_genes - 3)
    assert abs(n_masked_zero - expected) < 5 * np.sqrt(expected)
    # near-complete selection in a tiny vocabulary goes through the complement branch
    small = (np.array([0, 2], np.int64), np.array([0, 1], np.int32), np.array([1.0, 2.0]), 6)
    out = run_mask(*small, np.zeros(1, np.int64), zero_prob=0.99)
    check_mask_invariants(*small, out)


def test_mask_unmasks_one_uniformly():
    n_rows = 4000
    row_ptr = np.arange(n_rows + 1, dtype=np.int64) * 4
    genes = np.tile(np.array([1, 2, 5, 6], np.int32), n_rows)
    values = np.tile([1.0, 2.0, 3.0, 4.0], n_rows)
    visible = run_mask(
        row_ptr, genes, values, 8, np.arange(n_rows, dtype=np.int64), nonzero_prob=1.0
    )[0].reshape(n_rows, 4)
    np.testing.assert_array_equal(visible.sum(1), 1)
    np.testing.assert_array_less(np.abs(visible.sum(0) - n_rows / 4), 5 * np.sqrt(n_rows * 3 / 16))


def test_mask_reproducible_row_independent_thread_independent():
    rng = np.random.default_rng(5)
    row_ptr, genes, values = random_ragged(rng, 40, 300, 30)
    seeds = rng.integers(-(2**63), 2**63 - 1, 40, dtype=np.int64)
    a = run_mask(row_ptr, genes, values, 300, seeds)
    b = run_mask(row_ptr, genes, values, 300, seeds)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = run_mask(row_ptr, genes, values, 300, seeds ^ 1)
    assert not np.array_equal(a[2], c[2])
    # seeds differing only above bit 32 must still give different draws
    d = run_mask(row_ptr, genes, values, 300, seeds + (1 << 40))
    assert not np.array_equal(a[2], d[2])

    def per_row(ptr, g, v, out):
        vis = split_rows(ptr, out[0])
        return [vr + mr for vr, mr in zip(vis, split_rows(out[1], out[2], out[3], out[4]))]

    # a subset in another order, with a repeat: each row's result is unchanged
    order = np.array([39, 3, 17, 3, 0, 22])
    rows_g = split_rows(row_ptr, genes, values)
    sub_ptr, sub_genes, sub_values = ragged_from_lists(
        [rows_g[i][0] for i in order], [rows_g[i][1] for i in order]
    )
    sub = run_mask(sub_ptr, sub_genes, sub_values, 300, seeds[order])
    full_rows = per_row(row_ptr, genes, values, a)
    assert_rows_equal(per_row(sub_ptr, sub_genes, sub_values, sub), [full_rows[i] for i in order])
    # thread count and serial twin
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        one = run_mask(row_ptr, genes, values, 300, seeds)
    finally:
        numba.set_num_threads(threads)
    ser = run_mask(row_ptr, genes, values, 300, seeds, fn=K.mask_positions_serial)
    for x, y, z in zip(a, one, ser):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)


def test_binomial_thin_row_independent():
    rng = np.random.default_rng(8)
    row_ptr, genes, counts = random_ragged(rng, 30, 200, 40, counts=True)
    seeds = rng.integers(0, 2**40, 30)
    rates = rng.uniform(0.1, 0.9, 30)
    full = K.binomial_thin(row_ptr, genes, counts, rates, seeds)
    order = np.array([29, 4, 4, 11])
    rows_g = split_rows(row_ptr, genes, counts)
    sub_ptr, sub_genes, sub_counts = ragged_from_lists(
        [rows_g[i][0] for i in order], [rows_g[i][1] for i in order]
    )
    sub = K.binomial_thin(sub_ptr, sub_genes, sub_counts, rates[order], seeds[order])
    full_rows = split_rows(full[0], full[1], full[2])
    assert_rows_equal(split_rows(sub[0], sub[1], sub[2]), [full_rows[i] for i in order])
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        one = K.binomial_thin(row_ptr, genes, counts, rates, seeds)
    finally:
        numba.set_num_threads(threads)
    for x, y in zip(full, one):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"nonzero_prob": 1.5}, r"\[0, 1\]"),
        ({"zero_prob": -0.1}, r"\[0, 1\]"),
        ({"replace_prob": 0.95, "random_prob": 0.1}, "sum"),
    ],
)
def test_mask_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        run_mask(
            np.array([0, 1], np.int64),
            np.array([0], np.int32),
            np.ones(1),
            4,
            np.zeros(1, np.int64),
            **kw,
        )


@pytest.mark.parametrize("genes", [[3, 1], [1, 1], [4], [-1]])
def test_mask_rejects_non_canonical_rows(genes):
    with pytest.raises(ValueError, match="strictly ascending"):
        run_mask(
            np.array([0, len(genes)], np.int64),
            np.array(genes, np.int32),
            np.ones(len(genes)),
            4,
            np.zeros(1, np.int64),
        )


def test_mask_empty_inputs():
    out = run_mask(
        np.zeros(1, np.int64), np.empty(0, np.int32), np.empty(0), 10, np.empty(0, np.int64)
    )
    assert [len(x) for x in out] == [0, 1, 0, 0, 0]
    # empty rows only: zero genes can still be masked; "random" inputs are 0
    out = run_mask(
        np.zeros(3, np.int64),
        np.empty(0, np.int32),
        np.empty(0),
        50,
        np.arange(2, dtype=np.int64),
        zero_prob=0.5,
        replace_prob=0.0,
        random_prob=1.0,
    )
    assert len(out[2]) > 0
    np.testing.assert_array_equal(out[3], 0)
    assert not out[4].any()


# ------------------------------------------------------------------------------------------
# lookup_values / ragged_to_padded
# ------------------------------------------------------------------------------------------


@PROPERTY
@given(case=ragged_case(), data=st.data())
def test_lookup_values(case, data):
    n_genes, row_ptr, genes, values = case
    n = len(row_ptr) - 1
    queries = [
        data.draw(st.lists(st.integers(0, n_genes), max_size=8)) for _ in range(n)
    ]  # any order, repeats, absent genes
    q_ptr = np.concatenate([[0], np.cumsum([len(q) for q in queries])]).astype(np.int64)
    q_genes = np.array([g for q in queries for g in q], np.int32)
    got = K.lookup_values(row_ptr, genes, values, q_ptr, q_genes)
    ref = []
    for i, q in enumerate(queries):
        table = dict(zip(genes[row_ptr[i] : row_ptr[i + 1]], values[row_ptr[i] : row_ptr[i + 1]]))
        ref.extend(table.get(g, 0.0) for g in q)
    np.testing.assert_array_equal(got, np.array(ref, np.float64))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(
        K.lookup_values_serial(row_ptr, genes, values, q_ptr, q_genes), got
    )


def test_lookup_values_row_mismatch():
    with pytest.raises(ValueError, match="same number of rows"):
        K.lookup_values(
            np.zeros(2, np.int64),
            np.empty(0, np.int32),
            np.empty(0),
            np.zeros(3, np.int64),
            np.empty(0, np.int32),
        )


@pytest.mark.parametrize(
    ("dtype", "fill"),
    [
        (np.int32, np.int32(-1)),
        (np.int64, np.int64(7)),
        (np.float32, np.float32(-0.5)),
        (np.float64, np.nan),
        (np.bool_, False),
    ],
)
def test_ragged_to_padded_dtypes(dtype, fill):
    row_ptr = np.array([0, 2, 2, 5], np.int64)
    values = np.array([1, 0, 1, 1, 0]).astype(dtype)
    padded, valid = K.ragged_to_padded(row_ptr, values, fill)
    assert padded.dtype == np.dtype(dtype)
    assert padded.shape == (3, 3)
    expected_valid = np.array([[1, 1, 0], [0, 0, 0], [1, 1, 1]], bool)
    np.testing.assert_array_equal(valid, expected_valid)
    np.testing.assert_array_equal(padded[valid], values)
    np.testing.assert_array_equal(padded[~valid], np.full((~valid).sum(), fill, dtype))
    padded, valid = K.ragged_to_padded(np.zeros(4, np.int64), np.empty(0, dtype), fill)
    assert padded.shape == valid.shape == (3, 0)
    assert padded.dtype == np.dtype(dtype)
    padded, valid = K.ragged_to_padded(np.zeros(1, np.int64), np.empty(0, dtype), fill)
    assert padded.shape == (0, 0)


# ------------------------------------------------------------------------------------------
# real cells, fork safety
# ------------------------------------------------------------------------------------------


def test_real_cells_gather_normalise_pack(pbmc):
    X, col_to_vocab, n_vocab = pbmc
    rows = np.random.default_rng(0).choice(X.shape[0], 256, replace=False).astype(np.int64)
    row_ptr, genes, counts = K.gather_csr_rows(X.indptr, X.indices, X.data, col_to_vocab, rows)
    totals = K.row_sums(row_ptr, counts)
    values = K.log_normalize(row_ptr, counts, totals, 1e4)
    # dense reference: in-vocabulary matrix by np.add.at over the columns, then numpy
    dense_raw = X[rows].toarray().astype(np.float64)
    dense = np.zeros((len(rows), n_vocab))
    mapped = col_to_vocab >= 0
    np.add.at(dense.T, col_to_vocab[mapped], dense_raw[:, mapped].T)
    ref_totals = dense.sum(1)
    ref_norm = np.log1p(dense / ref_totals[:, None] * 1e4)
    r, c = np.nonzero(dense)
    np.testing.assert_array_equal(row_ptr, np.r_[0, np.cumsum(np.bincount(r, minlength=len(rows)))])
    np.testing.assert_array_equal(genes, c)
    np.testing.assert_array_equal(counts, dense[r, c])
    np.testing.assert_array_equal(totals, ref_totals)
    np.testing.assert_allclose(values, ref_norm[r, c], rtol=1e-15, atol=0)
    log_t = np.log10(totals)
    args = (row_ptr, genes, values, log_t, log_t, n_vocab + 1, n_vocab + 2, n_vocab, 1000)
    for a, b in zip(K.pack_tokens(*args), ref_pack(*args)):
        np.testing.assert_array_equal(a, b)


def _run_kernels(serial):
    rng = np.random.default_rng(1)
    row_ptr, genes, counts = random_ragged(rng, 8, 100, 20, counts=True)
    seeds = np.arange(8, dtype=np.int64)
    suffix = "_serial" if serial else ""
    get = lambda name: getattr(K, name + suffix)  # noqa: E731
    # int64 indptr and indices with float64 data: a specialisation the other tests compile
    indices = genes.astype(np.int64)
    get("gather_csr_rows")(row_ptr, indices, counts, np.arange(100, dtype=np.int64), seeds)
    get("log_normalize")(row_ptr, counts, K.row_sums(row_ptr, counts), 1e4)
    get("pack_tokens")(row_ptr, genes, counts, np.ones(8), np.ones(8), 1, 2, 3, 5)
    get("binomial_thin")(row_ptr, genes, counts, np.full(8, 0.5), seeds)
    out = get("mask_positions")(row_ptr, genes, counts, 100, 0.3, 0.03, 0.8, 0.1, seeds)
    get("lookup_values")(row_ptr, genes, counts, out[1], out[2])


def _fork_child(queue):
    _run_kernels(serial=True)
    queue.put("ok")


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method is Linux-only here")
def test_serial_twins_are_fork_safe():
    # Run every parallel kernel in this process first, then the serial twins in a forked
    # child. With numba's OpenMP layer, a twin that were parallel (e.g. loaded from a cache
    # entry of its parallel sibling) would abort the child.
    _run_kernels(serial=True)  # compile before forking
    _run_kernels(serial=False)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=_fork_child, args=(queue,))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 0, f"forked child failed with exit code {proc.exitcode}"
    assert queue.get() == "ok"


def test_public_api_documented():
    for name in K.__all__:
        fn = getattr(K, name)
        assert (fn.__doc__ or "").strip(), name
