"""Pretraining corpus parts read from row sources (SOMA, .zarr, .h5ad, shards) in row chunks."""

from __future__ import annotations

import copy
import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from scxtrimo.data._sources import RowSource
from scxtrimo.data._validation import invalid_cells as find_invalid_cells
from scxtrimo.data._validation import invalid_cells_message, scan_cells
from scxtrimo.data._vocabulary import load_vocabulary, log_overlap, map_genes
from scxtrimo.inference import InputSettings

from ._corpus import CorpusPart

if TYPE_CHECKING:
    from scxtrimo.module import XTrimoGeneModule

logger = logging.getLogger("scxtrimo")

#: Rows per chunk of the statistics pass (one chunk of the source is in memory at a time).
DEFAULT_CHUNK_SIZE = 4096


def _leaves(source: Any) -> list[Any]:
    """The sources a (possibly nested) :class:`~scxtrimo.data.ConcatSource` reads, in order."""
    inner = getattr(source, "sources", None)
    if inner is None or not hasattr(source, "pieces"):
        return [source]
    return [leaf for s in inner for leaf in _leaves(s)]


class SourceRows:
    """A row source seen as a read-only cells x genes matrix, read by rows as CSR.

    What :class:`~scxtrimo.train.PretrainingDataset`, :func:`~scxtrimo.data.scan_cells` and
    :func:`~scxtrimo.train.expected_masked_values` need from a matrix: ``shape`` and
    ``[rows]`` for sorted, unique integer rows or a ``start:stop`` slice. The rows of a
    :class:`~scxtrimo.data.ConcatSource` with the same genes in every source are read across
    its sources.

    The source passed is never read itself: each process reads a copy of it made without its
    open handles (a source's ``__getstate__`` drops them), so the adapter can be pickled to
    ``ddp_spawn`` ranks and used in forked DataLoader workers, each opening its own files.

    Parameters
    ----------
    source
        A :class:`~scxtrimo.data.RowSource` (:class:`~scxtrimo.data.SomaSource`,
        :class:`~scxtrimo.data.ZarrSource`, :class:`~scxtrimo.data.H5adSource`,
        :class:`~scxtrimo.data.AnnDataSource`, :class:`~scxtrimo.data.ConcatSource`...).
    """

    def __init__(self, source: RowSource) -> None:
        self.source = source
        self.name = str(source.name)
        self._leaves = _leaves(source)
        n_vars = {int(leaf.shape[1]) for leaf in self._leaves}
        if len(n_vars) != 1:
            raise ValueError(
                f"{self.name}: the sources of a ConcatSource have different numbers of genes "
                f"({sorted(n_vars)}); give each one as its own corpus entry."
            )
        sizes = [int(leaf.shape[0]) for leaf in self._leaves]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.shape = (int(self.offsets[-1]), n_vars.pop())
        self._readers: list[Any] | None = None
        self._pid: int | None = None
        self._inherited: list[Any] = []

    def _reader(self, i: int) -> Any:
        if self._pid != os.getpid():
            if self._readers is not None:
                # Handles a forked worker inherited from its parent: keep them referenced and
                # unused (closing them here could disturb the parent's), open our own.
                self._inherited.append(self._readers)
            self._readers = [copy.copy(leaf) for leaf in self._leaves]
            self._pid = os.getpid()
        return self._readers[i]

    def _positions(self, key: Any) -> np.ndarray:
        n = self.shape[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise IndexError(f"{self.name}: only contiguous row slices can be read.")
            return np.arange(start, stop, dtype=np.int64)
        if isinstance(key, int | np.integer):
            return np.array([int(key)], dtype=np.int64)
        rows = np.asarray(key)
        if rows.dtype == bool:
            return np.flatnonzero(rows).astype(np.int64)
        return rows.astype(np.int64, copy=False)

    def __getitem__(self, key: Any) -> sp.csr_matrix:
        """Rows ``key`` (sorted, unique positions or a ``start:stop`` slice) as CSR."""
        if isinstance(key, tuple):
            raise IndexError(f"{self.name}: select rows only (rows are read with all genes).")
        rows = self._positions(key)
        if rows.size and (rows[0] < 0 or rows[-1] >= self.shape[0]):
            raise IndexError(f"{self.name}: rows must be in [0, {self.shape[0]}).")
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        if rows.size == 0 or which[0] == which[-1]:
            i = int(which[0]) if rows.size else 0
            return self._reader(i).read_rows(rows - self.offsets[i])
        # Rows of several sources with the same genes (sorted rows: one run per source).
        cuts = np.flatnonzero(np.diff(which)) + 1
        blocks = [
            self._reader(int(w[0])).read_rows(r - self.offsets[int(w[0])])
            for r, w in zip(np.split(rows, cuts), np.split(which, cuts))
        ]
        return sp.vstack(blocks, format="csr")

    def close(self) -> None:
        """Drop this process's open copies of the source (they reopen on the next read)."""
        if self._pid == os.getpid():
            self._readers = None
            self._pid = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_readers"] = None
        state["_pid"] = None
        state["_inherited"] = []
        return state

    def __repr__(self) -> str:
        return f"SourceRows({self.name!r}, shape={self.shape})"


def same_genes(sources: list[Any]) -> bool:
    """Whether every source has the same ``var`` (genes and columns, in order)."""
    first = sources[0].var
    return all(s.var is first or s.var.equals(first) for s in sources[1:])


def part_from_source(
    module: XTrimoGeneModule,
    source: RowSource,
    name: str,
    *,
    input_settings: InputSettings | None = None,
    max_genes: int | None,
    invalid_cells: str = "skip",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> CorpusPart:
    """One study of a pretraining corpus read from a row source, checked before training.

    The source's ``var`` is mapped onto the module's vocabulary as
    :func:`~scxtrimo.inference.prepare_input` maps an AnnData (the settings'
    ``gene_symbols_key`` / ``gene_ids_key``; Ensembl IDs as gene names are matched by ID). One
    streamed pass over the source, ``chunk_size`` rows at a time, checks the values (raw
    counts) and counts each cell's in-vocabulary counts and non-zero genes
    (:func:`~scxtrimo.data.scan_cells`); memory is one chunk plus a few numbers per cell.

    Parameters
    ----------
    module
        The network to pretrain (``model.module``); its vocabulary maps the genes.
    source
        A :class:`~scxtrimo.data.RowSource`: e.g. :class:`~scxtrimo.data.SomaSource` (with its
        ``obs_value_filter``), :class:`~scxtrimo.data.ZarrSource`,
        :class:`~scxtrimo.data.H5adSource`, or a :class:`~scxtrimo.data.ConcatSource` whose
        sources all have the same ``var``. Not changed: every process reads a copy of it made
        without its open handles.
    name
        What the user passed, for messages.
    input_settings
        How the model reads its data (raw counts; gene keys); ``None``: the defaults.
    max_genes
        Gene-token cap of the run; applied when batches are built, accepted here to match
        :func:`~scxtrimo.train.build_corpus`.
    invalid_cells
        Cells with fewer than 2 in-vocabulary counts are ``"skip"``-ped or ``"raise"``.
    chunk_size
        Rows read at a time by the statistics pass.

    Returns
    -------
    The study, whose ``matrix`` is a ``SourceRows`` over ``source``.

    Raises
    ------
    ValueError
        If the source has no cell or gene, its genes do not match the vocabulary, its values
        are not raw counts, or no cell is valid; the message starts with ``name``.
    """
    del max_genes  # the cap is applied per batch by PretrainingDataset
    if invalid_cells not in ("raise", "skip"):
        raise ValueError(f"invalid_cells must be 'raise' or 'skip', not {invalid_cells!r}.")
    settings = input_settings or InputSettings()
    if settings.input_type != "counts":
        raise ValueError("Pretraining needs raw counts; set the model up with input_type='counts'.")
    vocab = load_vocabulary()
    if module.config.n_genes != vocab.n_genes:
        raise ValueError(
            f"This model has {module.config.n_genes} genes but the vocabulary has "
            f"{vocab.n_genes}; only models on the scFoundation vocabulary can read row sources."
        )
    leaves = _leaves(source)
    if not same_genes(leaves):
        raise ValueError(
            f"Pretraining corpus entry {name}: its sources have different genes; build_corpus "
            "takes each of them as a study of its own."
        )
    matrix = SourceRows(source)
    n_obs, n_vars = matrix.shape
    if n_obs == 0 or n_vars == 0:
        raise ValueError(
            f"Pretraining corpus entry {name} is empty ({n_obs} cells x {n_vars} genes)."
        )
    var = leaves[0].var
    try:
        mapping = map_genes(
            var,
            gene_symbols_key=settings.gene_symbols_key,
            gene_ids_key=settings.gene_ids_key,
        )
        stats = scan_cells(
            matrix,
            mapping.col_to_vocab,
            input_type="counts",
            obs_names=source.obs.index,
            var_names=var.index,
            chunk_size=chunk_size,
        )
    except (ValueError, KeyError) as err:
        message = err.args[0] if err.args else str(err)
        raise ValueError(f"Pretraining corpus entry {name}: {message}") from err
    finally:
        matrix.close()
    log_overlap(mapping, stats.count_fraction, stacklevel=3)
    cells = np.arange(n_obs, dtype=np.int64)
    bad = find_invalid_cells(stats, "counts")
    if bad.size and invalid_cells == "raise":
        raise ValueError(
            f"Pretraining corpus entry {name}: "
            + invalid_cells_message(bad, source.obs.index, stats)
        )
    if bad.size:
        logger.warning(
            "%s: skipping %d cells with fewer than 2 in-vocabulary counts.", name, bad.size
        )
        cells = np.setdiff1d(cells, bad)
    if cells.size == 0:
        raise ValueError(f"Pretraining corpus entry {name} has no cell the model can use.")
    return CorpusPart(name, matrix, mapping.col_to_vocab, cells, stats.n_tokens)


def parts_from_source(
    module: XTrimoGeneModule,
    source: RowSource,
    name: str,
    *,
    input_settings: InputSettings | None = None,
    max_genes: int | None,
    invalid_cells: str = "skip",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[CorpusPart]:
    """The studies of one corpus entry that is a row source.

    A :class:`~scxtrimo.data.ConcatSource` whose sources have different genes gives one study
    per source (named ``"<name> [i: <source name>]"``); any other source gives one study
    (:func:`part_from_source`).
    """
    leaves = _leaves(source)
    kwargs = {
        "input_settings": input_settings,
        "max_genes": max_genes,
        "invalid_cells": invalid_cells,
        "chunk_size": chunk_size,
    }
    if same_genes(leaves):
        return [part_from_source(module, source, name, **kwargs)]
    return [
        part_from_source(module, leaf, f"{name} [{i}: {leaf.name}]", **kwargs)
        for i, leaf in enumerate(leaves)
    ]


def _wrap(err: Exception, name: str) -> Exception:
    message = err.args[0] if err.args else str(err)
    kind = FileNotFoundError if isinstance(err, FileNotFoundError) else ValueError
    return kind(f"Pretraining corpus entry {name}: {message}")


def as_row_source(entry: Any, name: str, *, layer: str | None = None) -> RowSource | None:
    """The row source a corpus entry is read through, or ``None`` for AnnData and ``.h5ad`` files.

    Row sources are returned as they are; an opened ``tiledbsoma.Experiment``, the path or URI
    of a TileDB-SOMA experiment, an AnnData ``.zarr`` store or a list of such inputs (shards,
    read one after the other) are opened with :func:`~scxtrimo.data.open_source` (``layer``
    applies to AnnData stores). AnnData objects and ``.h5ad`` files keep the AnnData path of
    :func:`~scxtrimo.train.build_corpus`.

    Raises
    ------
    FileNotFoundError
        If a local path does not exist or no SOMA experiment is at a URI (naming ``name``).
    ValueError
        If the input cannot be opened (e.g. a directory that is neither a SOMA experiment nor a
        ``.zarr`` store, a missing layer or measurement).
    """
    from anndata import AnnData

    from scxtrimo.data import open_source

    if isinstance(entry, AnnData):
        return None
    if isinstance(entry, RowSource):
        return entry
    is_experiment = type(entry).__name__ == "Experiment" and type(entry).__module__.startswith(
        "tiledbsoma"
    )
    if isinstance(entry, str | os.PathLike):
        text = os.fspath(entry)
        if "://" not in text or text.startswith("file://"):
            local = text.removeprefix("file://")
            if not os.path.exists(local):
                raise FileNotFoundError(
                    f"Pretraining corpus entry {name} does not exist (expected an .h5ad file, an "
                    "AnnData .zarr store or a TileDB-SOMA experiment)."
                )
            if os.path.isfile(local):
                return None  # an .h5ad file: read backed as an AnnData
    elif not is_experiment and not isinstance(entry, list | tuple):
        return None  # refused by build_corpus with the list of what a corpus holds
    try:
        return open_source(entry, layer=layer)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        raise _wrap(err, name) from err


def worker_start_method(dataset: Any, num_workers: int) -> str | None:
    """``"spawn"`` for DataLoader workers of a study read from TileDB-SOMA, else ``None``.

    ``None`` keeps PyTorch's default (fork on Linux), and is the only choice without workers.

    TileDB's thread pools do not survive ``fork``: a forked DataLoader worker that opens a SOMA
    experiment hangs. Spawned workers start clean and reopen the experiment (the adapter is
    picklable); ``.h5ad`` and ``.zarr`` sources work in forked workers.
    """
    if num_workers <= 0:
        return None
    for matrix in getattr(dataset, "matrices", []):
        if isinstance(matrix, SourceRows) and any(
            getattr(leaf, "kind", None) == "soma" for leaf in matrix._leaves
        ):
            return "spawn"
    return None
