"""Streaming and batch planning of inference batches."""

from __future__ import annotations

import numpy as np

from scxtrimo.data import InputSpec, map_genes, scan_cells
from scxtrimo.data._loading import iter_inference_batches, plan_batches
from scxtrimo.data._matrix import iter_row_chunks
from scxtrimo.data._tokens import TokenIndex


class CountingDense:
    """A dense matrix that records which rows are read (stands in for a backed dataset)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.reads: list[tuple[int, int]] = []

    def __getitem__(self, key):
        rows = key[0] if isinstance(key, tuple) else key
        if isinstance(rows, slice):
            self.reads.append((rows.start, rows.stop))
        return self.array[key]


def test_row_chunks_skip_chunks_without_wanted_rows():
    array = np.arange(50, dtype=np.float32).reshape(25, 2)
    wanted = np.zeros(25, dtype=bool)
    wanted[[3, 21]] = True
    starts = [start for start, _ in iter_row_chunks(array, 5, wanted)]
    assert starts == [0, 20]
    assert [start for start, _ in iter_row_chunks(array, 5)] == [0, 5, 10, 15, 20]


def test_scan_cells_reads_only_chunks_of_requested_rows(pbmc):
    dense = np.asarray(pbmc.X[:60].todense())
    mapping = map_genes(pbmc.var)
    matrix = CountingDense(dense)
    stats = scan_cells(matrix, mapping.col_to_vocab, chunk_size=20, rows=np.array([45]))
    full = scan_cells(dense, mapping.col_to_vocab, chunk_size=20)
    assert matrix.reads == [(40, 60)]
    np.testing.assert_array_equal(stats.n_tokens[40:], full.n_tokens[40:])
    assert not stats.n_tokens[:40].any()


def test_batches_are_planned_on_capped_lengths(pbmc):
    mapping = map_genes(pbmc.var)
    stats = scan_cells(pbmc.X, mapping.col_to_vocab)
    index = TokenIndex(19264)
    budget = 4096

    def widths(max_genes):
        spec = InputSpec(max_genes=max_genes)
        batches = list(
            iter_inference_batches(
                pbmc.X, mapping.col_to_vocab, stats.n_tokens, spec, index, max_tokens=budget
            )
        )
        assert sorted(np.concatenate([b.cells for b in batches])) == list(range(pbmc.n_obs))
        return [b.tokens["gene_index"].shape for b in batches]

    capped, uncapped = widths(128), widths(None)
    # Capped cells are 130 tokens wide, so a batch holds budget // 130 of them.
    assert all(width == 130 and n * width <= budget for n, width in capped)
    assert len(capped) == len(plan_batches(np.minimum(stats.n_tokens, 128), max_tokens=budget))
    assert len(capped) < len(uncapped)


def test_plan_batches_bounds_tokens_and_padding():
    rng = np.random.default_rng(0)
    # Few cells of very different depths (shallow and deep mixed), the case that padded most.
    n_tokens = np.concatenate([rng.integers(20, 180, 100), rng.integers(2000, 4000, 28)])
    batches = plan_batches(n_tokens, max_tokens=8192)
    assert sorted(np.concatenate(batches)) == list(range(len(n_tokens)))
    for batch in batches:
        lengths = n_tokens[batch] + 2
        padded = len(batch) * lengths.max()
        assert len(batch) == 1 or padded <= 8192
        assert len(batch) == 1 or padded <= 1.25 * lengths.sum()
    loose = plan_batches(n_tokens, max_tokens=8192, max_padding=100.0)
    worst = max(len(b) * (n_tokens[b] + 2).max() / (n_tokens[b] + 2).sum() for b in loose)
    assert worst > 1.25  # without the cap this data does pad more
    assert len(plan_batches(n_tokens, batch_size=4)) >= len(n_tokens) // 4
