"""Row sources: cells x genes matrices read by rows, from files too large to load.

A *row source* is anything with a gene table, a cell table and a ``read_rows`` method that
returns the raw counts of some rows as CSR (:class:`RowSource`). The implementations here read
``.h5ad`` files (backed, through h5py), AnnData ``.zarr`` stores, TileDB-SOMA experiments (a
local path or a URI, optionally filtered on ``obs``; in ``data/_soma``) and in-memory AnnData
objects; a :class:`ConcatSource` reads several sources (e.g. ``.h5ad`` shards with different
gene sets) as one stream of rows. Sources hold no open file handle when pickled, so they can be
sent to other processes (``ddp_spawn``, DataLoader workers) and reopen their files there.

Memory: ``obs`` and ``var`` are held in memory (one row per cell / gene); the matrix never is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ._matrix import as_row_accessible, is_backed_sparse
from ._rows import as_csr, check_rows, file_size, fingerprint_of
from ._soma import SomaSource

__all__ = [
    "AnnDataSource",
    "ConcatSource",
    "H5adSource",
    "RowSource",
    "ZarrSource",
    "open_source",
]


@runtime_checkable
class RowSource(Protocol):
    """What scxtrimo needs from a cells x genes matrix that is read by rows.

    Attributes
    ----------
    name
        A short description for error messages (e.g. the path).
    var
        The gene table; its index are the gene names as in the source (symbols or Ensembl
        IDs, mapped to the vocabulary by :func:`~scxtrimo.data.map_genes`).
    obs
        The cell table, one row per cell of the source (after any filter), in stream order.
    """

    name: str
    var: pd.DataFrame
    obs: pd.DataFrame

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_obs, n_vars)``."""
        ...

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """Raw counts of ``rows`` (sorted ``int64`` positions in ``0..n_obs-1``), as CSR."""
        ...


def _read_matrix_rows(matrix: Any, rows: np.ndarray) -> sp.csr_matrix:
    """Rows of an in-memory, h5py, zarr or anndata-backed matrix (sorted positions)."""
    if rows.size == 0:
        return sp.csr_matrix((0, matrix.shape[1]), dtype=np.float32)
    start, stop = int(rows[0]), int(rows[-1]) + 1
    if stop - start == rows.size:  # contiguous: a slice is much cheaper than fancy indexing
        return as_csr(matrix[start:stop])
    if sp.issparse(matrix) or is_backed_sparse(matrix):
        return as_csr(matrix[rows])
    # h5py / zarr dense arrays: read the covering slice when it is small, else row by row.
    if stop - start <= 4 * rows.size:
        return as_csr(np.asarray(matrix[start:stop])[rows - start])
    return as_csr(np.stack([np.asarray(matrix[int(r)]) for r in rows]))


class AnnDataFileSource:
    """Base of the on-disk AnnData readers (:class:`H5adSource`, :class:`ZarrSource`): lazily
    opened, read by rows, picklable (each worker or rank reopens the file).
    """

    kind = "file"

    def __init__(self, path: str | os.PathLike, layer: str | None = None) -> None:
        from anndata.io import read_elem

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"Input {str(self.path)!r} does not exist.")
        self.name = str(self.path)
        self.layer = layer
        self._root = None
        self._matrix = None
        root = self._open_root()
        try:
            self.obs = read_elem(root["obs"])
            self.var = read_elem(root["var"])
            matrix = self._matrix_of(root)
            self._shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        finally:
            self._close()

    # -- to be provided by subclasses
    def _open_root(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _close(self) -> None:
        self._root = None
        self._matrix = None

    def _matrix_of(self, root: Any) -> Any:
        from anndata.io import sparse_dataset

        if self.layer is None:
            if "X" not in root:
                raise ValueError(f"{self.name} has no X; pass layer=<name of the counts layer>.")
            elem = root["X"]
        else:
            if "layers" not in root or self.layer not in root["layers"]:
                layers = list(root["layers"].keys()) if "layers" in root else []
                raise KeyError(
                    f"Layer {self.layer!r} not found in {self.name}; layers: {layers or 'none'}."
                )
            elem = root["layers"][self.layer]
        encoding = elem.attrs.get("encoding-type", "array")
        if encoding in ("csr_matrix", "csc_matrix"):
            matrix = sparse_dataset(elem)
            return as_row_accessible(matrix)  # refuses CSC with an explanation
        return elem

    def _get_matrix(self) -> Any:
        if self._matrix is None:
            self._root = self._open_root()
            self._matrix = self._matrix_of(self._root)
        return self._matrix

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_obs, n_vars)``."""
        return self._shape

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """Raw values of ``rows`` (sorted positions) as CSR."""
        rows = check_rows(rows, self._shape[0], self.name)
        return _read_matrix_rows(self._get_matrix(), rows)

    def fingerprint(self) -> dict:
        """What identifies this input (for resumable runs)."""
        return {
            "kind": self.kind,
            "path": str(self.path.resolve()),
            "layer": self.layer,
            "shape": list(self.shape),
            "size_bytes": file_size(self.path),
        }

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_root"] = None
        state["_matrix"] = None
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, shape={self.shape})"


class H5adSource(AnnDataFileSource):
    """An ``.h5ad`` file read by rows through h5py (the matrix stays on disk).

    Parameters
    ----------
    path
        The ``.h5ad`` file; ``X`` (or ``layer``) must be CSR or dense (CSC cannot be read by
        rows and is refused with an explanation).
    layer
        Layer with the raw counts; ``None`` reads ``X``.
    """

    kind = "h5ad"

    def _open_root(self) -> Any:
        import h5py

        if self._root is None:
            self._root = h5py.File(self.path, "r")
        return self._root

    def _close(self) -> None:
        if self._root is not None:
            self._root.close()
        super()._close()


class ZarrSource(AnnDataFileSource):
    """An AnnData ``.zarr`` store (as written by ``AnnData.write_zarr``) read by rows.

    Parameters
    ----------
    path
        The ``.zarr`` directory.
    layer
        Layer with the raw counts; ``None`` reads ``X``.
    """

    kind = "zarr"

    def _open_root(self) -> Any:
        import zarr

        if self._root is None:
            self._root = zarr.open_group(str(self.path), mode="r")
        return self._root


class AnnDataSource:
    """An AnnData in memory or opened backed, as a row source.

    Parameters
    ----------
    adata
        The AnnData; not copied.
    layer
        Layer with the raw counts; ``None`` reads ``X``.
    name
        For error messages.
    """

    kind = "anndata"

    def __init__(self, adata: AnnData, layer: str | None = None, name: str = "AnnData") -> None:
        from ._matrix import get_matrix

        self.adata = adata
        self.layer = layer
        self.name = name
        self.matrix = as_row_accessible(get_matrix(adata, layer))
        self.obs = adata.obs
        self.var = adata.var

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_obs, n_vars)``."""
        return (int(self.adata.n_obs), int(self.adata.n_vars))

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """Raw values of ``rows`` (sorted positions) as CSR."""
        rows = check_rows(rows, self.shape[0], self.name)
        return _read_matrix_rows(self.matrix, rows)

    def fingerprint(self) -> dict:
        """What identifies this input (for resumable runs)."""
        filename = getattr(self.adata, "filename", None)
        return {
            "kind": self.kind,
            "path": None if filename is None else str(Path(filename).resolve()),
            "layer": self.layer,
            "shape": list(self.shape),
        }

    def __repr__(self) -> str:
        return f"AnnDataSource(shape={self.shape})"


class ConcatSource:
    """Several row sources read as one stream of rows (e.g. ``.h5ad`` shards).

    The sources may have different genes: each keeps its own ``var`` and is mapped to the
    vocabulary on its own; ``var`` is the first source's. Rows are numbered
    consecutively, source after source.

    Parameters
    ----------
    sources
        The row sources, in stream order.
    """

    kind = "concat"

    def __init__(self, sources: Sequence[RowSource]) -> None:
        if len(sources) == 0:
            raise ValueError("ConcatSource needs at least one source.")
        self.sources = list(sources)
        self.name = " + ".join(s.name for s in self.sources)
        self.offsets = np.cumsum([0, *(s.shape[0] for s in self.sources)]).astype(np.int64)
        self.var = self.sources[0].var
        self.obs = pd.concat([s.obs for s in self.sources], axis=0, join="outer")

    @property
    def shape(self) -> tuple[int, int]:
        """``(total n_obs, n_vars of the first source)``."""
        return (int(self.offsets[-1]), self.sources[0].shape[1])

    def pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """``(source, local start, local stop)`` covering the global rows ``start:stop``."""
        out = []
        for i in range(len(self.sources)):
            lo, hi = max(start, self.offsets[i]), min(stop, self.offsets[i + 1])
            if lo < hi:
                out.append((i, int(lo - self.offsets[i]), int(hi - self.offsets[i])))
        return out

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """Rows of one source only (the sources' gene axes differ): see :meth:`pieces`."""
        rows = check_rows(rows, self.shape[0], self.name)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        if rows.size and which[0] != which[-1]:
            raise ValueError(
                "ConcatSource.read_rows cannot stack rows of sources with different genes; "
                "read each source through .pieces()."
            )
        i = int(which[0]) if rows.size else 0
        return self.sources[i].read_rows(rows - self.offsets[i])

    def fingerprint(self) -> dict:
        """What identifies this input (for resumable runs)."""
        return {"kind": self.kind, "sources": [fingerprint_of(s) for s in self.sources]}

    def __repr__(self) -> str:
        return f"ConcatSource({len(self.sources)} sources, shape={self.shape})"


def _is_soma_uri(text: str) -> bool:
    if "://" in text and not text.startswith("file://"):
        return True
    path = Path(text.removeprefix("file://"))
    # A SOMA experiment on disk is a TileDB group folder (with __group / __tiledb_group.tdb).
    return path.is_dir() and ((path / "__group").exists() or (path / "__tiledb_group.tdb").exists())


def open_source(obj: Any, *, layer: str | None = None, **soma_kwargs: Any) -> RowSource:
    """A row source for ``obj``.

    Parameters
    ----------
    obj
        An AnnData (in memory or backed); an opened ``tiledbsoma.Experiment``; a path to an ``.h5ad`` file or an AnnData ``.zarr``
        store; a local path or URI of a TileDB-SOMA experiment; a row source (returned as is);
        or a list of any of these, read one after the other as one stream
        (:class:`ConcatSource`).
    layer
        Layer with raw counts for AnnData inputs (``None``: ``X``).
    **soma_kwargs
        Passed to :class:`SomaSource` (``measurement_name``, ``X_name``,
        ``obs_value_filter``...).

    Raises
    ------
    FileNotFoundError
        If a path or URI does not exist.
    ValueError
        If the kind of input cannot be recognised.
    """
    if isinstance(obj, AnnData):
        return AnnDataSource(obj, layer=layer)

    if type(obj).__name__ == "Experiment" and type(obj).__module__.startswith("tiledbsoma"):
        return SomaSource(obj, **soma_kwargs)
    if isinstance(obj, list | tuple):
        if len(obj) == 1:
            return open_source(obj[0], layer=layer, **soma_kwargs)
        return ConcatSource([open_source(o, layer=layer, **soma_kwargs) for o in obj])
    if isinstance(obj, str | os.PathLike):
        text = os.fspath(obj)
        if _is_soma_uri(text):
            return SomaSource(text, **soma_kwargs)
        path = Path(text)
        if soma_kwargs:
            raise ValueError(
                f"{sorted(soma_kwargs)} only apply to TileDB-SOMA experiments, and {text!r} is "
                "not one."
            )
        if not path.exists():
            raise FileNotFoundError(f"Input {text!r} does not exist.")
        if path.suffix == ".h5ad" or path.is_file():
            return H5adSource(path, layer=layer)
        if path.suffix == ".zarr" or (path / ".zgroup").exists() or (path / "zarr.json").exists():
            return ZarrSource(path, layer=layer)
        raise ValueError(
            f"Cannot tell what {text!r} is: expected an .h5ad file, an AnnData .zarr store or a "
            "TileDB-SOMA experiment."
        )
    if all(hasattr(obj, a) for a in ("read_rows", "obs", "var", "shape")):
        return obj
    raise TypeError(
        "Expected an AnnData, a path or URI, a list of them or a row source; got "
        f"{type(obj).__name__}."
    )
