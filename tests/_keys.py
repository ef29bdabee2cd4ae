"""Check that a tool changed only the keys it documents (all slots of an AnnData)."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import scipy.sparse as sp

SLOTS = ("obs", "var", "obsm", "varm", "layers", "obsp", "varp", "uns")


def full_snapshot(adata):
    """Deep copy of every slot of ``adata``."""
    return {
        "X": adata.X.copy(),
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "obsm": {k: copy.deepcopy(v) for k, v in adata.obsm.items()},
        "varm": {k: copy.deepcopy(v) for k, v in adata.varm.items()},
        "layers": {k: v.copy() for k, v in adata.layers.items()},
        "obsp": {k: v.copy() for k, v in adata.obsp.items()},
        "varp": {k: v.copy() for k, v in adata.varp.items()},
        "uns": copy.deepcopy(dict(adata.uns)),
        "obs_names": adata.obs_names.copy(),
        "var_names": adata.var_names.copy(),
    }


def _same(a, b):
    if sp.issparse(a) or sp.issparse(b):
        assert sp.issparse(a)
        assert sp.issparse(b)
        assert (a != b).nnz == 0
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b)
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def assert_only_changed(before, adata, **added):
    """``adata`` equals ``before`` except for the new keys ``added[slot]`` (iterables of keys).

    ``uns`` keys are compared at the top level, except ``"scxtrimo"``, whose sub-keys are
    checked (``uns_scxtrimo=...``) so that earlier tool records are left alone.
    """
    _same(before["X"], adata.X)
    assert before["obs_names"].equals(adata.obs_names)
    assert before["var_names"].equals(adata.var_names)
    for slot in ("obs", "var"):
        new = set(added.get(slot, ()))
        frame = getattr(adata, slot)
        assert set(frame.columns) == set(before[slot].columns) | new, slot
        pd.testing.assert_frame_equal(frame[list(before[slot].columns)], before[slot])
    for slot in ("obsm", "varm", "layers", "obsp", "varp"):
        new = set(added.get(slot, ()))
        mapping = getattr(adata, slot)
        assert set(mapping.keys()) == set(before[slot]) | new, slot
        for key, value in before[slot].items():
            if key not in new:
                _same(value, mapping[key])
    new_uns = set(added.get("uns", ()))
    allowed = set(before["uns"]) | new_uns | ({"scxtrimo"} if added.get("uns_scxtrimo") else set())
    assert set(adata.uns) == allowed
    for key, value in before["uns"].items():
        if key == "scxtrimo":
            continue
        assert repr(value) == repr(adata.uns[key])
    old_records = before["uns"].get("scxtrimo", {})
    new_records = set(added.get("uns_scxtrimo", ()))
    records = adata.uns.get("scxtrimo", {})
    assert set(records) == set(old_records) | new_records
    for key, value in old_records.items():
        if key not in new_records:
            assert repr(value) == repr(records[key])
