"""Fine-tuning for annotation, tl.annotate, tl.transfer_labels and pl.confusion_matrix on real PBMCs."""

from pathlib import Path

import anndata as ad
import matplotlib
import mudata as md
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import scxtrimo
from _keys import assert_only_changed, full_snapshot
from scxtrimo.model import XTrimoGene
from scxtrimo.train import finetune_plan

# The Kang subsets cover 1,205 of the 19,264 vocabulary genes: the coverage warning is expected.
pytestmark = pytest.mark.filterwarnings("ignore::scxtrimo.data.LowVocabularyCoverageWarning")

matplotlib.use("Agg")

KANG = Path(__file__).parent / "data" / "kang2018_pbmc_subset.h5ad"
FAST = {
    "batch_size": 16,
    "max_genes": 128,
    "enable_progress_bar": False,
    "enable_checkpointing": False,
}


@pytest.fixture(scope="module")
def kang_full():
    return ad.read_h5ad(KANG)


@pytest.fixture
def kang(kang_full):
    return kang_full.copy()


def reference_query(kang):
    ref = kang[kang.obs["batch"] != "donor1488"].copy()
    query = kang[kang.obs["batch"] == "donor1488"].copy()
    return ref, query


class RecordTraining(Callback):
    """Records requires_grad and the training flag of every sub-module during training."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            module = pl_module.module
            self.grad = {n: p.requires_grad for n, p in module.named_parameters()}
            self.training = {n: m.training for n, m in module.named_modules()}
            self.batch_keys = set(batch)


@pytest.fixture(scope="module")
def finetuned(kang_full):
    """A tiny model fine-tuned (last layer) on two donors of real Kang PBMCs."""
    ref, _ = reference_query(kang_full.copy())
    XTrimoGene.setup_anndata(ref, labels_key="cell_type")
    model = XTrimoGene(ref, config="tiny", seed=0)
    model.train(max_epochs=2, finetune="last_layers", lr=3e-3, **FAST)
    return model


@pytest.mark.parametrize(
    "mode", ["head", "last_layers", pytest.param("full", marks=pytest.mark.slow)]
)
def test_finetune_modes_train_exactly_their_parameters(kang, mode):
    ref, _ = reference_query(kang)
    XTrimoGene.setup_anndata(ref, labels_key="cell_type")
    model = XTrimoGene(ref, config="tiny", seed=0)
    assert model.label_categories == list(ref.obs["cell_type"].cat.categories)
    assert model.module.classifier.out_features == 8
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    record = RecordTraining()
    model.train(max_epochs=1, finetune=mode, lr=1e-2, callbacks=[record], **FAST)

    depth = model.config.encoder_depth
    expected = {
        "head": lambda n: n.startswith("classifier."),
        "last_layers": lambda n: n.startswith(
            ("classifier.", "encoder.final_norm.", f"encoder.layers.{depth - 1}.")
        ),
        "full": lambda n: n.startswith(
            ("classifier.", "encoder.", "value_embedding.", "gene_embedding.")
        ),
    }[mode]
    assert record.grad == {n: expected(n) for n in record.grad}
    trainable, frozen = finetune_plan(model.module, mode)
    assert set(trainable) == {n for n, g in record.grad.items() if g}
    for name in frozen:  # frozen parts run without dropout
        assert not record.training[name]
    if mode == "head":  # the frozen encoder's embeddings are computed once
        assert "z" in record.batch_keys
        assert "gene_index" not in record.batch_keys
    else:
        assert {"gene_index", "value", "padding_mask", "labels"} <= record.batch_keys
        assert "masked_index" not in record.batch_keys
        assert record.training[f"encoder.layers.{depth - 1}"]

    after = model.module.state_dict()
    for name, value in before.items():
        if name in trainable:
            continue
        assert torch.equal(value, after[name]), f"{name} changed in mode {mode}"
    changed = {n for n in trainable if not torch.equal(before[n], after[n])}
    assert "classifier.weight" in changed
    if mode != "head":
        assert any(n.startswith(f"encoder.layers.{depth - 1}.") for n in changed)
    if mode == "full":
        assert any(n.startswith("encoder.layers.0.") for n in changed)
    # Training leaves every parameter trainable again (e.g. for further pretraining).
    assert all(p.requires_grad for p in model.module.parameters())
    hist = model.history
    for key in ("train_loss", "validation_loss", "train_accuracy", "validation_accuracy"):
        assert np.isfinite(hist[key].to_numpy()).all()
    assert model.classifier_["trained"]
    assert model.classifier_["finetune"] == mode


def test_finetuning_needs_labels_and_valid_layer_count(pbmc, kang):
    XTrimoGene.setup_anndata(pbmc)
    model = XTrimoGene(pbmc, config="tiny", seed=0)
    assert model.module.classifier is None
    with pytest.raises(ValueError, match="labels"):
        model.train(max_epochs=1, finetune="head", **FAST)
    ref, _ = reference_query(kang)
    XTrimoGene.setup_anndata(ref, labels_key="cell_type")
    model = XTrimoGene(ref, config="tiny", seed=0)
    with pytest.raises(ValueError, match="n_last_layers"):
        model.train(max_epochs=1, finetune="last_layers", n_last_layers=5, **FAST)
    with pytest.raises(ValueError, match="finetune must be"):
        model.train(max_epochs=1, finetune="everything", **FAST)
    partly = kang.copy()
    partly.obs["cell_type"] = partly.obs["cell_type"].astype(object)
    partly.obs.iloc[:3, partly.obs.columns.get_loc("cell_type")] = None
    with pytest.raises(ValueError, match="3 missing labels"):
        XTrimoGene.setup_anndata(partly, labels_key="cell_type")


def test_pretrained_model_gets_a_fresh_head_and_keeps_its_weights(kang, tiny_model, tmp_path):
    tiny_model.save(tmp_path / "pretrained")
    model = XTrimoGene.load(tmp_path / "pretrained")
    assert model.module.classifier is None
    ref, query = reference_query(kang)
    model.add_classifier(ref, labels_key="cell_type")
    assert model.adata is ref
    assert model.label_categories == list(ref.obs["cell_type"].cat.categories)
    pretrained = tiny_model.module.state_dict()
    for name, value in model.module.state_dict().items():
        if not name.startswith("classifier."):
            assert torch.equal(value, pretrained[name]), name
    with pytest.raises(ValueError, match="not been trained"):
        scxtrimo.tl.annotate(query, model)
    model.train(max_epochs=1, finetune="head", lr=1e-2, **FAST)
    scxtrimo.tl.annotate(query, model)
    assert set(query.obs["scxtrimo_label"].cat.categories) == set(model.label_categories)


def test_finetuned_model_save_load_round_trip(finetuned, kang, tmp_path):
    _, query = reference_query(kang)
    finetuned.save(tmp_path / "ft")
    loaded = XTrimoGene.load(tmp_path / "ft")
    classes = finetuned.label_categories
    assert loaded.label_categories == classes
    assert loaded.classifier_ == finetuned.classifier_
    a = finetuned.predict(query, soft=True)
    b = loaded.predict(query, soft=True)
    np.testing.assert_allclose(a, b, atol=1e-6)
    # Loading onto labelled data registers the labels, so fine-tuning can go on.
    ref, _ = reference_query(kang)
    attached = XTrimoGene.load(tmp_path / "ft", adata=ref)
    assert attached.label_categories == finetuned.label_categories
    attached.train(max_epochs=1, finetune="head", **FAST)
    # ... also when the new data hold only some of the classes, in another order.
    few = ref[ref.obs["cell_type"].isin(["NK cells", "B cells"])].copy()
    few.obs["cell_type"] = pd.Categorical(
        few.obs["cell_type"].astype(str), categories=["NK cells", "B cells"]
    )
    partial = XTrimoGene.load(tmp_path / "ft", adata=few)
    assert partial.label_categories == finetuned.label_categories
    partial.train(max_epochs=1, finetune="head", train_size=1.0, **FAST)
    # A query whose label column is incomplete loads fine (its labels are not registered).
    _, query = reference_query(kang)
    query.obs["cell_type"] = query.obs["cell_type"].astype(object)
    query.obs.iloc[0, query.obs.columns.get_loc("cell_type")] = None
    assert XTrimoGene.load(tmp_path / "ft", adata=query).label_categories == classes
    unknown = few.copy()
    unknown.obs["cell_type"] = pd.Categorical(["new type"] * unknown.n_obs)
    bad = XTrimoGene.load(tmp_path / "ft", adata=unknown)
    with pytest.raises(ValueError, match="not classes"):
        bad.train(max_epochs=1, finetune="head", **FAST)


def test_annotate_with_model_writes_only_documented_keys(finetuned, kang, tmp_path):
    _, query = reference_query(kang)
    query.layers["counts"] = query.X.copy()
    query.obsm["X_other"] = np.ones((query.n_obs, 2))
    query.uns["scxtrimo"] = {"X_scxtrimo": {"pooling": "all"}}
    before = full_snapshot(query)
    assert scxtrimo.tl.annotate(query, finetuned) is None
    assert_only_changed(
        before,
        query,
        obs={"scxtrimo_label", "scxtrimo_label_confidence"},
        obsm={"scxtrimo_label_probabilities"},
        uns_scxtrimo={"scxtrimo_label"},
    )
    probs = query.obsm["scxtrimo_label_probabilities"]
    classes = query.uns["scxtrimo"]["scxtrimo_label"]["classes"]
    assert classes == [str(c) for c in finetuned.label_categories]
    assert probs.shape == (query.n_obs, len(classes))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    labels = query.obs["scxtrimo_label"]
    assert isinstance(labels.dtype, pd.CategoricalDtype)
    assert list(labels.cat.categories) == finetuned.label_categories
    np.testing.assert_array_equal(labels.astype(str), np.asarray(classes)[probs.argmax(axis=1)])
    np.testing.assert_allclose(query.obs["scxtrimo_label_confidence"], probs.max(axis=1))
    assert query.uns["scxtrimo"]["scxtrimo_label"]["method"] == "classifier"
    assert query.uns["scxtrimo"]["scxtrimo_label"]["finetune"] == "last_layers"
    query.write_h5ad(tmp_path / "annotated.h5ad")
    back = ad.read_h5ad(tmp_path / "annotated.h5ad")
    assert list(back.uns["scxtrimo"]["scxtrimo_label"]["classes"]) == classes


def test_annotate_copy_mudata_and_skipped_cells(finetuned, kang):
    _, query = reference_query(kang)
    before = full_snapshot(query)
    out = scxtrimo.tl.annotate(query, finetuned, copy=True, key_added="ct")
    assert_only_changed(before, query)
    assert "ct" in out.obs
    assert "ct_probabilities" in out.obsm
    mdata = md.MuData({"rna": query.copy()})
    scxtrimo.tl.annotate(mdata, finetuned, mod="rna")
    pd.testing.assert_series_equal(
        mdata.mod["rna"].obs["scxtrimo_label"], out.obs["ct"], check_names=False
    )
    empty = query.copy()
    counts = empty.X.tolil()
    counts[0, :] = 0
    empty.X = counts.tocsr()
    with pytest.raises(ValueError, match="fewer than 2"):
        scxtrimo.tl.annotate(empty, finetuned)
    scxtrimo.tl.annotate(empty, finetuned, invalid_cells="skip")
    assert pd.isna(empty.obs["scxtrimo_label"].iloc[0])
    assert np.isnan(empty.obs["scxtrimo_label_confidence"].iloc[0])
    assert np.isnan(empty.obsm["scxtrimo_label_probabilities"][0]).all()
    assert empty.obs["scxtrimo_label"].iloc[1:].notna().all()


def test_transfer_labels_on_real_data(kang, tiny_model):
    ref, query = reference_query(kang)
    before_ref, before_query = full_snapshot(ref), full_snapshot(query)
    scxtrimo.tl.transfer_labels(query, ref, labels_key="cell_type", model=tiny_model, k=5)
    # No embedding is stored: only the documented keys appear, the reference is untouched.
    assert_only_changed(before_ref, ref)
    key = "cell_type_transferred"
    assert_only_changed(before_query, query, obs={key, f"{key}_uncertainty"}, uns_scxtrimo={key})
    assert set(query.obs[key].cat.categories) <= set(ref.obs["cell_type"].cat.categories)
    u = query.obs[f"{key}_uncertainty"].to_numpy()
    assert ((u >= 0) & (u < 1)).all()
    # Same result when both embeddings are given.
    scxtrimo.tl.embed(ref, tiny_model)
    scxtrimo.tl.embed(query, tiny_model)
    scxtrimo.tl.transfer_labels(query, ref, labels_key="cell_type", k=5, key_added="again")
    pd.testing.assert_series_equal(query.obs[key], query.obs["again"], check_names=False)
    np.testing.assert_allclose(query.obs[f"{key}_uncertainty"], query.obs["again_uncertainty"])
    assert query.uns["scxtrimo"]["again"]["use_rep"] == "X_scxtrimo"


def test_transfer_labels_votes(kang):
    ref, query = reference_query(kang)
    # An embedding that is the label itself: every query cell gets its own label, certainly.
    codes = {c: i for i, c in enumerate(ref.obs["cell_type"].cat.categories)}
    for data in (ref, query):
        onehot = np.eye(len(codes))[data.obs["cell_type"].map(codes).to_numpy(dtype=int)]
        data.obsm["X_truth"] = onehot + 0.01 * np.random.default_rng(0).random(onehot.shape)
    scxtrimo.tl.transfer_labels(
        query, ref, labels_key="cell_type", use_rep="X_truth", key_added="t"
    )
    np.testing.assert_array_equal(query.obs["t"].astype(str), query.obs["cell_type"].astype(str))
    np.testing.assert_allclose(query.obs["t_uncertainty"], 0.0, atol=1e-12)
    # Distance weighting: one very close neighbour outweighs two far ones.
    reference = np.array([[0.0], [10.0], [10.5]])
    classes, shares = scxtrimo.metrics.knn_vote(
        np.array([[0.1], [np.nan]]), reference, np.array(["a", "b", "b"]), k=3
    )
    assert classes == ["a", "b"]
    assert shares[0, 0] > 0.9
    assert np.isnan(shares[1]).all()
    _, uniform = scxtrimo.metrics.knn_vote(
        np.array([[0.1]]), reference, np.array(["a", "b", "b"]), k=3, weights="uniform"
    )
    np.testing.assert_allclose(uniform[0], [1 / 3, 2 / 3])
    # Reference cells without a label do not vote.
    _, shares = scxtrimo.metrics.knn_vote(
        np.array([[0.0]]), reference, pd.Series(["a", None, "b"]), k=3, weights="uniform"
    )
    np.testing.assert_allclose(shares[0], [0.5, 0.5])


def test_annotate_from_reference(kang):
    ref, query = reference_query(kang)
    codes = {c: i for i, c in enumerate(ref.obs["cell_type"].cat.categories)}
    for data in (ref, query):
        data.obsm["X_scxtrimo"] = np.eye(len(codes))[
            data.obs["cell_type"].map(codes).to_numpy(dtype=int)
        ]
    before = full_snapshot(query)
    scxtrimo.tl.annotate(query, ref, labels_key="cell_type", k=5)
    assert_only_changed(
        before,
        query,
        obs={"scxtrimo_label", "scxtrimo_label_confidence"},
        obsm={"scxtrimo_label_probabilities"},
        uns_scxtrimo={"scxtrimo_label"},
    )
    assert (query.obs["scxtrimo_label"].astype(str) == query.obs["cell_type"].astype(str)).all()
    np.testing.assert_allclose(query.obs["scxtrimo_label_confidence"], 1.0)
    assert query.uns["scxtrimo"]["scxtrimo_label"]["method"] == "knn"
    with pytest.raises(ValueError, match="labels_key"):
        scxtrimo.tl.annotate(query, ref)


def test_confusion_matrix_and_history_plots(finetuned, kang):
    _, query = reference_query(kang)
    scxtrimo.tl.annotate(query, finetuned)
    ax = scxtrimo.pl.confusion_matrix(query, "cell_type", "scxtrimo_label", show=False)
    values = ax.images[0].get_array()
    assert values.shape[0] == query.obs["cell_type"].nunique()
    np.testing.assert_allclose(np.asarray(values).sum(axis=1), 1.0)
    assert "accuracy" in ax.get_title()
    ax = scxtrimo.pl.training_history(finetuned, show=False)
    labels = {line.get_label() for a in ax.figure.axes for line in a.get_lines()}
    assert {"train_accuracy", "validation_accuracy", "train_loss"} <= labels
    matplotlib.pyplot.close("all")


def test_head_standardisation_is_an_exact_reparametrisation():
    from scxtrimo.train._finetune import _feature_scaling, _from_standardised, _to_standardised

    rng = np.random.default_rng(0)
    z = (5.0 + 1e-3 * rng.normal(size=(50, 12))).astype(np.float32)  # tiny spread, large mean
    head = torch.nn.Linear(12, 3).double()
    original = {k: v.clone() for k, v in head.state_dict().items()}
    mean, sd = _feature_scaling(z)
    raw = head(torch.from_numpy(z).double())
    _to_standardised(head, mean, sd)
    standardised = head(torch.from_numpy((z - mean) / sd))
    torch.testing.assert_close(standardised, raw)
    _from_standardised(head, mean, sd)
    for k, v in head.state_dict().items():
        torch.testing.assert_close(v, original[k])
