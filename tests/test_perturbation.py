"""scxtrimo.tl.predict_perturbation on real Kang 2018 IFN-β PBMCs (control vs stimulated)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scxtrimo
from _keys import assert_only_changed, full_snapshot
from scxtrimo.tl import _perturbation

KANG_IFNB = Path(__file__).parent / "data" / "kang2018_ifnb_subset.h5ad"
HELD_OUT = "CD4 T cells"
ARGS = {"condition_key": "condition", "control": "ctrl", "groupby": "cell_type"}
FAST = {"n_steps": 40}
# The Kang file has 1,267 genes: the model warns that it covers 6% of its vocabulary.
pytestmark = pytest.mark.filterwarnings("ignore::scxtrimo.data.LowVocabularyCoverageWarning")


@pytest.fixture(scope="module")
def kang_file():
    return ad.read_h5ad(KANG_IFNB)


@pytest.fixture
def kang(kang_file):
    """240 real PBMCs: 24 control and 24 stimulated cells of each of 5 types (a fresh copy)."""
    return kang_file.copy()


@pytest.fixture(scope="module")
def shipped_model():
    return scxtrimo.model.resolve_model(None)


@pytest.fixture(scope="module")
def kang_embedded(kang_file, shipped_model):
    """The Kang cells with the shipped model's embeddings of the controls in ``.obsm``."""
    adata = kang_file.copy()
    # Only control cells are read by the head: embedding just those halves the time.
    is_control = (adata.obs["condition"] == "ctrl").to_numpy()
    controls = adata[is_control].copy()
    scxtrimo.tl.embed(controls, shipped_model)
    embedding = np.full((adata.n_obs, controls.obsm["X_scxtrimo"].shape[1]), np.nan, np.float32)
    embedding[is_control] = controls.obsm["X_scxtrimo"]
    adata.obsm["X_scxtrimo"] = embedding
    return adata


def _held_out_rows(adata, held_out=HELD_OUT, condition="ctrl"):
    obs = adata.obs
    return np.flatnonzero(
        ((obs["cell_type"] == held_out) & (obs["condition"] == condition)).to_numpy()
    )


@pytest.mark.slow
def test_shapes_obs_order_and_record(kang, shipped_model, kang_embedded, tmp_path):
    pred = scxtrimo.tl.predict_perturbation(kang, shipped_model, held_out=HELD_OUT, **ARGS, **FAST)
    controls = kang.obs_names[_held_out_rows(kang)]
    assert pred.shape == (controls.size, kang.n_vars)
    assert pred.var_names.equals(kang.var_names)
    assert pred.X.dtype == np.float32
    assert np.isfinite(pred.X).all()
    assert (pred.X >= 0).all()
    assert list(pred.obs["source_cell"]) == list(controls)  # input order
    assert pred.obs_names.is_unique
    assert (pred.obs["condition"] == "stim").all()
    assert pred.obs["prediction"].all()
    assert (pred.obs["cell_type"] == HELD_OUT).all()
    assert (pred.obs["batch"].to_numpy() == kang.obs.loc[controls, "batch"].to_numpy()).all()
    info = pred.uns["scxtrimo_perturbation"]
    assert info["held_out"] == HELD_OUT
    assert info["conditions"] == ["stim"]
    assert HELD_OUT not in info["seen_groups"]["stim"]
    assert len(info["seen_groups"]["stim"]) == 4
    assert info["n_held_out_perturbed_cells_excluded"] == 24
    assert info["model"] == shipped_model.source_
    assert sum(info["mean_group_weights"]["stim"].values()) == pytest.approx(1.0)
    # The model's embedding of the control cells is what the head reads: the same predictions
    # from embeddings computed beforehand with the same model.
    again = scxtrimo.tl.predict_perturbation(kang_embedded, held_out=HELD_OUT, **ARGS, **FAST)
    np.testing.assert_allclose(again.X, pred.X, atol=1e-5)
    pred.write_h5ad(tmp_path / "predicted.h5ad")  # the record is h5ad-writable


@pytest.mark.slow
def test_prediction_moves_towards_the_true_response(kang_embedded):
    pred = scxtrimo.tl.predict_perturbation(kang_embedded, held_out=HELD_OUT, **ARGS)
    lognorm = _perturbation._log_normalize(kang_embedded.X, 1e4)
    ctrl = np.asarray(lognorm[_held_out_rows(kang_embedded)].mean(0)).ravel()
    true = np.asarray(lognorm[_held_out_rows(kang_embedded, condition="stim")].mean(0)).ravel()
    top = np.argsort(-np.abs(true - ctrl))[:20]
    predicted = pred.X.mean(0)
    assert ((predicted[top] - true[top]) ** 2).mean() < 0.5 * ((ctrl[top] - true[top]) ** 2).mean()
    assert (np.sign(predicted[top] - ctrl[top]) == np.sign(true[top] - ctrl[top])).mean() >= 0.9


def test_input_is_not_modified(kang_embedded):
    adata = kang_embedded.copy()
    before = full_snapshot(adata)
    scxtrimo.tl.predict_perturbation(adata, held_out=HELD_OUT, **ARGS, **FAST)
    assert_only_changed(before, adata)


@pytest.mark.slow
def test_same_seed_same_prediction(kang_embedded):
    def run(seed):
        return scxtrimo.tl.predict_perturbation(
            kang_embedded, held_out=HELD_OUT, cells_per_episode=8, random_state=seed, **ARGS, **FAST
        ).X

    first = run(0)
    np.testing.assert_array_equal(first, run(0))
    assert not np.array_equal(first, run(1))  # the episodes are sampled with the seed


@pytest.mark.slow
def test_no_leakage_from_held_out_perturbed_cells(kang, shipped_model):
    """Arbitrary values in the held-out type's stimulated cells leave the prediction bitwise
    unchanged (through the model: they are neither embedded nor averaged)."""
    reference = scxtrimo.tl.predict_perturbation(
        kang, shipped_model, held_out=HELD_OUT, **ARGS, **FAST
    )
    rng = np.random.default_rng(1)
    changed = kang.copy()
    counts = changed.X.toarray()
    rows = _held_out_rows(kang, condition="stim")
    counts[rows] = rng.poisson(5.0, size=(rows.size, kang.n_vars))
    changed.X = sp.csr_matrix(counts)
    changed.obs.loc[changed.obs_names[rows], "batch"] = "donor101"
    pred = scxtrimo.tl.predict_perturbation(
        changed, shipped_model, held_out=HELD_OUT, **ARGS, **FAST
    )
    np.testing.assert_array_equal(pred.X, reference.X)


@pytest.mark.slow
def test_the_leakage_check_is_sensitive(kang_embedded):
    """The same change in a seen type's stimulated cells does change the prediction."""
    reference = scxtrimo.tl.predict_perturbation(kang_embedded, held_out=HELD_OUT, **ARGS, **FAST)
    seen = kang_embedded.copy()
    counts = seen.X.toarray()
    rows = _held_out_rows(seen, "B cells", condition="stim")
    counts[rows] = np.random.default_rng(1).poisson(5.0, size=(rows.size, seen.n_vars))
    seen.X = sp.csr_matrix(counts)
    pred = scxtrimo.tl.predict_perturbation(seen, held_out=HELD_OUT, **ARGS, **FAST)
    assert not np.array_equal(pred.X, reference.X)


@pytest.mark.slow
def test_several_conditions(kang_embedded):
    adata = kang_embedded.copy()
    stim = np.flatnonzero((adata.obs["condition"] == "stim").to_numpy())
    labels = adata.obs["condition"].astype(str).to_numpy()
    labels[stim[::2]] = "stim_a"  # a synthetic second perturbation from real cells
    labels[stim[1::2]] = "stim_b"
    adata.obs["perturbation"] = pd.Categorical(labels)
    args = {**ARGS, "condition_key": "perturbation"}
    pred = scxtrimo.tl.predict_perturbation(adata, held_out=HELD_OUT, **args, **FAST)
    n = _held_out_rows(adata).size
    assert pred.n_obs == 2 * n
    assert list(pred.obs["perturbation"].cat.categories) == ["stim_a", "stim_b"]
    assert list(pred.obs["perturbation"]) == ["stim_a"] * n + ["stim_b"] * n
    assert list(pred.obs["source_cell"][:n]) == list(pred.obs["source_cell"][n:])
    assert not np.array_equal(pred.X[:n], pred.X[n:])
    info = pred.uns["scxtrimo_perturbation"]
    assert set(info["gate"]) == {"stim_a", "stim_b"}
    only_b = scxtrimo.tl.predict_perturbation(
        adata, held_out=HELD_OUT, conditions=["stim_b"], **args, **FAST
    )
    assert only_b.n_obs == n
    assert (only_b.obs["perturbation"] == "stim_b").all()


@pytest.mark.slow
def test_expression_representation_needs_no_model(kang, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(scxtrimo.model, "resolve_model", no_model)
    pred = scxtrimo.tl.predict_perturbation(
        kang, held_out="B cells", representation="expression", **ARGS, **FAST
    )
    assert pred.n_obs == _held_out_rows(kang, "B cells").size
    assert pred.uns["scxtrimo_perturbation"]["model"] is None


def _only_stim_for_b(adata):
    """B cells with stimulated cells only (no control cells to predict from)."""
    keep = ~((adata.obs["cell_type"] == "B cells") & (adata.obs["condition"] == "ctrl")).to_numpy()
    return adata[keep].copy()


@pytest.mark.parametrize(
    ("change", "kwargs", "error", "message"),
    [
        (None, {"condition_key": "treatment"}, KeyError, "condition_key='treatment'"),
        (None, {"groupby": "celltype"}, KeyError, "groupby='celltype'"),
        (None, {"control": "control"}, ValueError, "control='control' is not a value"),
        (None, {"held_out": "NK cells"}, ValueError, "has no control cells"),
        (_only_stim_for_b, {"held_out": "B cells"}, ValueError, "has no control cells"),
        ("ctrl_only", {}, ValueError, "only one condition"),
        (None, {"conditions": ["ctrl"]}, ValueError, "are not perturbed values"),
        (None, {"conditions": ["lps"]}, ValueError, "are not perturbed values"),
        (None, {"train_groups": [HELD_OUT, "B cells"]}, ValueError, "leak into the prediction"),
        (None, {"train_groups": ["B cells"]}, ValueError, "at least 2 are needed"),
        (None, {"representation": "pca"}, ValueError, "representation must be"),
    ],
)
def test_bad_input_fails_before_any_work(kang, monkeypatch, change, kwargs, error, message):
    def not_reached(*args, **kwargs):
        raise AssertionError("the input should have been rejected before any work")

    monkeypatch.setattr(_perturbation, "_log_normalize", not_reached)
    monkeypatch.setattr(scxtrimo.model, "resolve_model", not_reached)
    monkeypatch.setattr(_perturbation, "_train_head", not_reached)
    if change == "ctrl_only":
        kang = kang[(kang.obs["condition"] == "ctrl").to_numpy()].copy()
    elif change is not None:
        kang = change(kang)
    args = {**ARGS, "held_out": HELD_OUT, **kwargs}
    with pytest.raises(error, match=message):
        scxtrimo.tl.predict_perturbation(kang, **args)


def test_an_invalid_control_cell_is_refused_when_asked(kang, shipped_model):
    control = np.flatnonzero((kang.obs["condition"] == "ctrl").to_numpy())[0]
    X = sp.csr_matrix(kang.X).tolil()
    X[control, :] = 0
    kang.X = X.tocsr()
    with pytest.raises(ValueError, match="fewer than 2 counts"):
        scxtrimo.tl.predict_perturbation(
            kang, shipped_model, held_out=HELD_OUT, invalid_cells="raise", **ARGS, **FAST
        )
