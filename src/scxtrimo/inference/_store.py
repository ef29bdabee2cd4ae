"""The embedding store on disk: its zarr layout, the fingerprints that guard a resume, chunk commits.

Store layout (an AnnData zarr store; ``anndata.read_zarr(out)`` reads it):

- ``obs``: the cells, in input order; ``var``: empty (no genes);
- ``obsm/<key_added>``: float32, cells x width, zarr chunks of ``chunk_size`` rows (NaN where
  a chunk is not finished, or a cell was skipped);
- ``uns/scxtrimo/<key_added>``: the run's parameters, written when the run completes;
- ``obsm/<key_added>/.scxtrimo/``: ``fingerprint.json`` (model and input), ``done/<chunk>``
  markers and ``complete`` (hidden from zarr and anndata).

A chunk is committed by moving its ``done/<chunk>`` marker into place; a run is finished by
the ``complete`` marker. ``iter_embedding_store`` reads a finished store back in chunks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch

from scxtrimo.data._rows import fingerprint_of
from scxtrimo.data._sources import ConcatSource, RowSource

from ._io import atomic_write

if TYPE_CHECKING:
    from scxtrimo.module import XTrimoGeneModule

logger = logging.getLogger("scxtrimo")

STORE_FORMAT = "scxtrimo-embedding-store"
STORE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------


def _hash_names(names: Sequence[str] | pd.Index, step: int = 1_000_000) -> str:
    h = hashlib.sha256()
    names = pd.Index(names).astype(str)
    for start in range(0, len(names), step):
        h.update("\n".join(names[start : start + step]).encode())
        h.update(b"\n")
    return h.hexdigest()


def model_fingerprint(module: XTrimoGeneModule, source: str | None = None) -> dict:
    """What identifies a module's embeddings: a SHA-256 of its weights, and its configuration.

    ``source`` is where the weights came from (the model's ``source_``), recorded as is.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().to("cpu").contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {
        "weights_sha256": h.hexdigest(),
        "config": json.loads(json.dumps(module.config.to_dict(), default=str)),
        "source": source,
    }


def leaf_sources(source: RowSource) -> list[RowSource]:
    """The sources of a concatenation (shards), or the one source."""
    return list(source.sources) if isinstance(source, ConcatSource) else [source]


def input_fingerprint(source: RowSource) -> dict:
    """What identifies an input: its kind, paths, shapes, sizes and hashes of its names."""
    leaves = leaf_sources(source)
    return {
        "sources": [fingerprint_of(s) for s in leaves],
        "obs_names_sha256": _hash_names(source.obs.index),
        "var_names_sha256": [_hash_names(s.var.index) for s in leaves],
        "n_obs": int(source.shape[0]),
    }


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()), sync=True)


class EmbeddingStore:
    """The zarr embedding store at ``path`` for ``obsm[key]``, written by chunks and resumable.

    An AnnData zarr store: ``obs`` (the cells in input order), ``obsm[key]`` (float32, cells x
    width, zarr chunks of ``chunk_size`` rows, NaN until written) and, when the run is finished,
    ``uns["scxtrimo"][key]``. Beside the array, hidden from zarr and anndata, a
    ``.scxtrimo`` folder holds the fingerprint that guards a resume, one marker per committed
    chunk (moved into place: the commit) and the ``complete`` marker.

    Parameters
    ----------
    path
        The ``.zarr`` folder.
    key
        The ``obsm`` key of the embeddings.
    """

    #: What a fingerprint's ``format`` and ``version`` say of a store of this layout.
    FORMAT: ClassVar[str] = STORE_FORMAT
    VERSION: ClassVar[int] = STORE_VERSION

    def __init__(self, path: Path, key: str) -> None:
        self.path = Path(path)
        self.key = key
        self._array = None

    @property
    def array_path(self) -> Path:
        """The zarr array ``obsm/<key>``."""
        return self.path / "obsm" / self.key

    @property
    def meta_dir(self) -> Path:
        """The hidden ``.scxtrimo`` folder of the run's markers."""
        return self.array_path / ".scxtrimo"

    @property
    def done_dir(self) -> Path:
        """The folder of the committed chunks' markers."""
        return self.meta_dir / "done"

    @property
    def fingerprint_file(self) -> Path:
        """The run's fingerprint (model, input, parameters)."""
        return self.meta_dir / "fingerprint.json"

    @property
    def complete_file(self) -> Path:
        """The marker of a finished run."""
        return self.meta_dir / "complete"

    def is_store(self) -> bool:
        """Whether ``path`` holds an embedding store for ``key``."""
        return self.fingerprint_file.is_file()

    def is_complete(self) -> bool:
        """Whether the run that writes the store has finished."""
        return self.complete_file.is_file()

    def read_fingerprint(self) -> dict:
        """The fingerprint the store was created with."""
        return json.loads(self.fingerprint_file.read_text())

    def create(self, obs: pd.DataFrame, width: int, chunk_size: int, fingerprint: dict) -> None:
        """Create the whole store in a temporary folder, then rename it into place."""
        import anndata as ad
        import zarr
        from anndata.io import write_elem

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(
            tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        )
        try:
            fmt = ad.settings.zarr_write_format
            root = zarr.open_group(str(tmp), mode="w", zarr_format=fmt)
            root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
            obs = obs.copy()
            obs.index = pd.Index(obs.index.astype(str), name=None)
            try:
                write_elem(root, "obs", obs)
            except Exception as err:
                logger.warning(
                    "obs columns could not be written (%s); writing obs names only.", err
                )
                if "obs" in root:
                    del root["obs"]
                write_elem(root, "obs", pd.DataFrame(index=obs.index))
            write_elem(root, "var", pd.DataFrame(index=pd.Index([], dtype=str)))
            write_elem(root, "uns", {})
            obsm = root.create_group("obsm")
            obsm.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
            n = len(obs)
            arr = obsm.create_array(
                self.key,
                shape=(n, width),
                chunks=(max(1, min(chunk_size, n)), width),
                dtype="float32",
                fill_value=np.nan,
            )
            arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
            meta = tmp / "obsm" / self.key / ".scxtrimo"
            (meta / "done").mkdir(parents=True)
            (meta / "fingerprint.json").write_text(json.dumps(fingerprint, indent=1))
            os.replace(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def array(self):
        """The zarr array of the embeddings, opened for writing (once)."""
        import zarr

        if self._array is None:
            self._array = zarr.open_array(str(self.array_path), mode="r+")
        return self._array

    def done_chunks(self) -> dict[int, dict]:
        """The committed chunks: chunk id -> what its marker records (rows, run, rank)."""
        out = {}
        for name in os.listdir(self.done_dir):
            if name.isdigit():
                try:
                    out[int(name)] = json.loads((self.done_dir / name).read_text())
                except (OSError, ValueError):  # pragma: no cover - a marker is written atomically
                    continue
        return out

    def write_chunk(self, k: int, start: int, emb: np.ndarray, info: dict) -> None:
        """Write the rows of chunk ``k``, then commit it (marker moved into place)."""
        self.array()[start : start + emb.shape[0]] = emb
        info = {**info, "n_rows": int(emb.shape[0]), "committed_at": time.time()}
        _atomic_write_text(self.done_dir / f"{k:09d}", json.dumps(info))

    def finish(self, report: dict) -> None:
        """Write the run's ``report`` to ``uns["scxtrimo"][key]``, then mark the store complete."""
        import zarr
        from anndata.io import write_elem

        root = zarr.open_group(str(self.path), mode="r+")
        uns = {"scxtrimo": {self.key: report}}
        if "uns" in root:
            del root["uns"]
        write_elem(root, "uns", uns)
        _atomic_write_text(self.complete_file, json.dumps({"finished": time.time()}))

    def remove(self) -> None:
        """Delete the store."""
        shutil.rmtree(self.path, ignore_errors=True)

    def write_h5ad(self, out: Path, report: dict, copy_from: Path | None = None) -> None:
        """Write the finished store as the ``.h5ad`` file ``out`` (a temporary file, a rename).

        ``copy_from``: an ``.h5ad`` input to copy byte for byte and add the embedding to;
        ``None`` writes ``obs`` and the embedding only.
        """
        write_h5ad(self, Path(out), report, copy_from)

    @staticmethod
    def fingerprint_differences(found: dict, expected: dict) -> list[str]:
        """The dotted keys at which a store's fingerprint and a run's differ (none: resumable)."""
        return diff_keys(found, expected)


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys at which two nested dicts differ (a resume's fingerprint check)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


# ---------------------------------------------------------------------------------------------
# Reading a finished store, h5ad output
# ---------------------------------------------------------------------------------------------


def write_h5ad(store: EmbeddingStore, out: Path, report: dict, copy_from: Path | None) -> None:
    """Write ``out`` from the finished store through a temporary file and a rename."""
    import anndata as ad
    import h5py
    import zarr
    from anndata.io import read_elem, write_elem

    root = zarr.open_group(str(store.path), mode="r")
    arr = root["obsm"][store.key]
    n, width = arr.shape
    step = arr.chunks[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if copy_from is not None:
            shutil.copyfile(copy_from, tmp)  # byte copy: X is never loaded into memory
        else:
            ad.AnnData(obs=read_elem(root["obs"])).write_h5ad(tmp)
        with h5py.File(tmp, "r+") as f:
            obsm = f.require_group("obsm")
            if "encoding-type" not in obsm.attrs:
                obsm.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
            if store.key in obsm:
                del obsm[store.key]
            ds = obsm.create_dataset(
                store.key, shape=(n, width), dtype="float32", chunks=(max(1, min(step, n)), width)
            )
            ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
            for start in range(0, n, step):  # one chunk in memory at a time
                ds[start : start + step] = arr[start : start + step]
            uns = f.require_group("uns")
            existing = dict(read_elem(uns["scxtrimo"])) if "scxtrimo" in uns else {}
            existing[store.key] = report
            if "scxtrimo" in uns:
                del uns["scxtrimo"]
            write_elem(uns, "scxtrimo", existing)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def iter_embedding_store(path: str | os.PathLike, key: str = "X_scxtrimo") -> Iterator[np.ndarray]:
    """Iterate over the embedding rows of a finished ``.zarr`` store, one chunk at a time.

    For stores too large to load; ``anndata.read_zarr(path).obsm[key]`` loads it whole.

    Parameters
    ----------
    path
        A store written by :func:`~scxtrimo.tl.embed_to_store`.
    key
        The ``obsm`` key.

    Raises
    ------
    ValueError
        If the store is not complete (resume the run first).
    """
    import zarr

    store = EmbeddingStore(Path(path), key)
    if not store.is_store():
        raise ValueError(f"{path} is not an scxtrimo embedding store for obsm[{key!r}].")
    if not store.is_complete():
        raise ValueError(
            f"{path} is not complete; finish it with embed_to_store(..., resume=True)."
        )
    arr = zarr.open_group(str(path), mode="r")["obsm"][key]
    step = arr.chunks[0]
    return (np.asarray(arr[s : s + step]) for s in range(0, arr.shape[0], step))
