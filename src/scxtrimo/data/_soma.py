"""TileDB-SOMA experiments (local or cloud, optionally filtered on ``obs``) as a row source."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._rows import check_rows

__all__ = ["SomaSource"]


class SomaSource:
    """Cells of a TileDB-SOMA experiment, read by rows in bounded chunks.

    Needs the optional ``tiledbsoma`` package (``pip install 'scxtrimo[soma]'``).

    Parameters
    ----------
    uri
        Local path or URI (``s3://…``, ``tiledb://…``) of a SOMA ``Experiment``, or an opened
        ``tiledbsoma.Experiment`` (e.g. ``census["census_data"]["homo_sapiens"]``).
    measurement_name
        The measurement holding the gene expression (``"RNA"``).
    X_name
        The ``X`` layer with raw counts: ``"raw"`` (CELLxGENE Census) or ``"data"`` (what
        ``tiledbsoma.io.from_h5ad`` writes); ``None`` takes ``"raw"`` if present, else
        ``"data"``, else the only layer.
    obs_value_filter
        A SOMA value filter on ``obs`` (e.g. ``"tissue_general == 'blood' and is_primary_data
        == True"``); ``None`` keeps every cell. A filter that matches no cell is an error.
    obs_column_names
        ``obs`` columns to read (default all).
    var_index
        ``var`` column used as the gene names: ``None`` picks ``"feature_name"`` (symbols) or
        ``"var_id"``/``"feature_id"``, whichever exists, in that order.
    context
        A ``tiledbsoma.SOMATileDBContext`` (e.g. with credentials for cloud URIs).

    Notes
    -----
    Rows are cells in ``soma_joinid`` order of the filtered ``obs``; columns are all ``var``
    rows in ``soma_joinid`` order. The other ``var`` columns (``feature_id`` with Ensembl IDs
    in the Census) stay in ``var``, so ``gene_ids_key="feature_id"`` maps by Ensembl ID.
    """

    kind = "soma"

    def __init__(
        self,
        uri: str,
        *,
        measurement_name: str = "RNA",
        X_name: str | None = None,
        obs_value_filter: str | None = None,
        obs_column_names: Sequence[str] | None = None,
        var_index: str | None = None,
        context: Any = None,
    ) -> None:
        try:
            import tiledbsoma
        except ImportError as err:  # pragma: no cover - optional dependency
            raise ImportError(
                "Reading TileDB-SOMA needs the tiledbsoma package: pip install 'scxtrimo[soma]'."
            ) from err
        if isinstance(uri, tiledbsoma.Experiment):  # an opened Experiment (e.g. the Census)
            context = uri.context if context is None else context
            uri = uri.uri
        self.uri = str(uri)
        self.name = self.uri
        self.measurement_name = measurement_name
        self.obs_value_filter = obs_value_filter
        self.context = context
        self._exp = None
        self._X = None
        try:
            exists = tiledbsoma.Experiment.exists(self.uri, context=context)
        except Exception:
            exists = False
        if not exists:
            raise FileNotFoundError(
                f"No TileDB-SOMA Experiment at {self.uri!r} (the path or URI does not exist or is "
                "not an Experiment). For the CELLxGENE Census, use "
                "cellxgene_census.open_soma() and pass census['census_data']['homo_sapiens']."
            )
        with tiledbsoma.Experiment.open(self.uri, context=context) as exp:
            if measurement_name not in exp.ms:
                raise KeyError(
                    f"Measurement {measurement_name!r} not in {self.uri}; measurements: "
                    f"{list(exp.ms.keys())}."
                )
            ms = exp.ms[measurement_name]
            layers = list(ms.X.keys())
            if X_name is None:
                X_name = next((n for n in ("raw", "data") if n in layers), None)
                if X_name is None and len(layers) == 1:
                    X_name = layers[0]
                if X_name is None:
                    raise ValueError(f"{self.uri}: pass X_name=, one of {layers}.")
            if X_name not in layers:
                raise KeyError(f"X layer {X_name!r} not in {self.uri}; X layers: {layers}.")
            self.X_name = X_name
            columns = None if obs_column_names is None else ["soma_joinid", *obs_column_names]
            try:
                obs = (
                    exp.obs.read(column_names=columns, value_filter=obs_value_filter)
                    .concat()
                    .to_pandas()
                )
            except Exception as err:
                raise ValueError(
                    f"obs_value_filter={obs_value_filter!r} could not be applied to the obs of "
                    f"{self.uri}: {err}"
                ) from err
            if len(obs) == 0:
                raise ValueError(
                    f"obs_value_filter={obs_value_filter!r} matches no cell of {self.uri}; check "
                    f"the column names and values (obs columns: {list(exp.obs.keys())})."
                )
            obs = obs.sort_values("soma_joinid", kind="stable")
            var = ms.var.read().concat().to_pandas().sort_values("soma_joinid", kind="stable")
            self.n_var_total = int(ms.X[X_name].shape[1])
        self.obs_joinids = obs["soma_joinid"].to_numpy(dtype=np.int64)
        self.var_joinids = var["soma_joinid"].to_numpy(dtype=np.int64)
        obs_index = "obs_id" if "obs_id" in obs.columns else "soma_joinid"
        self.obs = obs.set_index(obs.pop(obs_index).astype(str).rename(None))
        if var_index is None:
            var_index = next(
                (c for c in ("feature_name", "var_id", "feature_id") if c in var.columns),
                "soma_joinid",
            )
        if var_index not in var.columns:
            raise KeyError(f"var_index={var_index!r} is not a var column: {list(var.columns)}.")
        index = var[var_index].astype(str).rename(None)
        self.var_index = var_index
        self.var = var.drop(columns=[var_index]).set_index(pd.Index(index))
        # var joinid -> column position (joinids are usually 0..n-1, but need not be).
        self._var_position = np.full(
            max(self.n_var_total, self.var_joinids.max() + 1), -1, np.int64
        )
        self._var_position[self.var_joinids] = np.arange(len(self.var_joinids))

    def _open_X(self) -> Any:
        if self._X is None:
            import tiledbsoma

            self._exp = tiledbsoma.Experiment.open(self.uri, context=self.context)
            self._X = self._exp.ms[self.measurement_name].X[self.X_name]
        return self._X

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_obs, n_vars)`` after the obs filter."""
        return (len(self.obs_joinids), len(self.var_joinids))

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """Raw counts of ``rows`` (sorted positions into the filtered cells) as CSR."""
        rows = check_rows(rows, self.shape[0], self.name)
        n_vars = self.shape[1]
        if rows.size == 0:
            return sp.csr_matrix((0, n_vars), dtype=np.float32)
        joinids = self.obs_joinids[rows]
        lo, hi = int(joinids[0]), int(joinids[-1])
        # Consecutive joinids (the usual case for a chunk): one range read, not point reads.
        coords = slice(lo, hi) if hi - lo + 1 == joinids.size else joinids
        table = self._open_X().read(coords=(coords,)).tables().concat()
        dim0 = table["soma_dim_0"].to_numpy()
        dim1 = table["soma_dim_1"].to_numpy()
        data = table["soma_data"].to_numpy()
        local = np.searchsorted(joinids, dim0)  # joinids sorted: rows are sorted positions
        cols = self._var_position[dim1]
        keep = cols >= 0
        block = sp.csr_matrix((data[keep], (local[keep], cols[keep])), shape=(rows.size, n_vars))
        block.sum_duplicates()
        if block.dtype == np.float16:
            block = block.astype(np.float32)
        return block

    def fingerprint(self) -> dict:
        """What identifies this input (for resumable runs)."""
        return {
            "kind": self.kind,
            "uri": self.uri,
            "measurement_name": self.measurement_name,
            "X_name": self.X_name,
            "obs_value_filter": self.obs_value_filter,
            "shape": list(self.shape),
        }

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_exp"] = None
        state["_X"] = None
        return state

    def __repr__(self) -> str:
        return f"SomaSource({self.uri!r}, shape={self.shape})"
