"""XTrimoGene: setup, training through Lightning, determinism, save/load safety."""

import json
import os

import numpy as np
import pytest
import torch

from scxtrimo.model import XTrimoGene

TRAIN = {
    "batch_size": 16,
    "max_genes": 256,
    "enable_progress_bar": False,
    "enable_checkpointing": False,
}


@pytest.fixture
def train_data(pbmc):
    data = pbmc[:48].copy()
    XTrimoGene.setup_anndata(data, labels_key="cell_type")
    return data


def test_setup_anndata_validates_before_registering(pbmc):
    with pytest.raises(KeyError, match="labels_key='celltype'"):
        XTrimoGene.setup_anndata(pbmc, labels_key="celltype")
    bad = pbmc.copy()
    bad.X = bad.X.astype(np.float32) * 0.5
    with pytest.raises(ValueError, match="not integers"):
        XTrimoGene.setup_anndata(bad)
    with pytest.raises(ValueError, match="only used with input_type='log1p'"):
        XTrimoGene.setup_anndata(pbmc, total_counts_key="cluster")


@pytest.mark.slow
def test_training_smoke_and_history(train_data):
    model = XTrimoGene(train_data, config="tiny", seed=0)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    model.train(max_epochs=2, **TRAIN)
    assert model.is_trained
    hist = model.history
    for key in ("train_loss", "validation_loss", "masked_mse_nonzero_train"):
        assert key in hist
        assert len(hist[key]) == 2
        assert np.isfinite(hist[key].to_numpy()).all()
    changed = [k for k, v in model.module.state_dict().items() if not torch.equal(v, before[k])]
    assert any("encoder" in k for k in changed)
    emb = model.get_latent_representation()
    assert emb.shape == (train_data.n_obs, 4 * model.config.encoder_dim)


@pytest.mark.slow
def test_same_seed_same_training(pbmc):
    def run():
        data = pbmc[:32].copy()
        XTrimoGene.setup_anndata(data)
        model = XTrimoGene(data, config="tiny", seed=3)
        model.train(max_epochs=1, seed=5, **TRAIN)
        return model.module.state_dict(), model.history["train_loss"].to_numpy()

    (a, la), (b, lb) = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(la, lb)


def test_nonfinite_loss_stops_with_step(train_data):
    model = XTrimoGene(train_data, config="tiny", seed=0)
    with torch.no_grad():
        model.module.gene_embedding_table().fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="global step 0"):
        model.train(max_epochs=1, **TRAIN)


@pytest.mark.slow
def test_save_load_round_trip(train_data, tmp_path):
    model = XTrimoGene(train_data, config="tiny", seed=1)
    model.train(max_epochs=1, **TRAIN)
    model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["scxtrimo_version"]
    assert meta["config"]["encoder_dim"] == model.config.encoder_dim
    loaded = XTrimoGene.load(tmp_path / "m")
    np.testing.assert_array_equal(
        loaded.get_latent_representation(train_data), model.get_latent_representation()
    )
    assert "train_loss" in loaded.history
    # Inference uses the pretraining cap by default, also after loading.
    assert model.default_max_genes == loaded.default_max_genes == 256
    np.testing.assert_array_equal(
        model.get_latent_representation(max_genes=256), model.get_latent_representation()
    )
    deep = train_data.X.getnnz(axis=1) > 300
    assert deep.any()
    uncapped = model.get_latent_representation(max_genes="all")
    assert not np.allclose(uncapped[deep], model.get_latent_representation()[deep])
    with pytest.raises(ValueError, match="positive integer, None or 'all'"):
        model.get_latent_representation(max_genes=0)
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "m")
    attached = XTrimoGene.load(tmp_path / "m", adata=train_data.copy())
    attached.train(max_epochs=1, **TRAIN)  # continue pretraining a loaded model


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_hostile_weights_are_refused_and_run_nothing(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    marker = tmp_path / "pwned"
    state = dict(tiny_model.module.state_dict())
    state["evil"] = _Payload(str(marker))
    torch.save(state, tmp_path / "m" / "model.pt")
    with pytest.raises(ValueError, match="Refused to load"):
        XTrimoGene.load(tmp_path / "m")
    assert not marker.exists()


def test_damaged_model_files(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    weights = tmp_path / "m" / "model.pt"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or not a PyTorch file"):
        XTrimoGene.load(tmp_path / "m")
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        XTrimoGene.load(tmp_path / "m")
    meta = tmp_path / "m" / "model.json"
    meta.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        XTrimoGene.load(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not a model saved by scxtrimo"):
        XTrimoGene.load(tmp_path / "elsewhere")


def test_weights_of_another_configuration_are_refused(tmp_path):
    XTrimoGene(None, config="tiny").save(tmp_path / "a")
    other = XTrimoGene(None, config="tiny", encoder_dim=16, encoder_ff_dim=32)
    torch.save(other.module.state_dict(), tmp_path / "a" / "model.pt")
    with pytest.raises(ValueError, match="wrong shapes"):
        XTrimoGene.load(tmp_path / "a")


def test_saved_metadata_version_is_checked(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    meta_path = tmp_path / "m" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format version 99"):
        XTrimoGene.load(tmp_path / "m")


def test_gene_embeddings_dataframe(tiny_model):
    genes = tiny_model.get_gene_embeddings()
    assert genes.shape == (19264, tiny_model.config.encoder_dim)
    assert genes.index[0] == "A1BG"


@pytest.mark.slow
def test_gene_bias_starts_at_expected_masked_values(pbmc):
    from scxtrimo.data import MaskingSpec, map_genes
    from scxtrimo.train import expected_masked_values

    data = pbmc[:40].copy()
    XTrimoGene.setup_anndata(data)
    mapping = map_genes(data.var)
    cells = np.arange(0, 40, 2)
    spec = MaskingSpec()
    start = expected_masked_values(data.X, mapping.col_to_vocab, cells, 19264, spec)
    # Plain reference: dense per-gene statistics over the chosen cells.
    dense = np.asarray(data.X[cells].todense(), dtype=np.float64)
    cols = np.flatnonzero(mapping.col_to_vocab >= 0)
    totals = dense[:, cols].sum(axis=1, keepdims=True)
    norm = np.log1p(dense[:, cols] / totals * 1e4)
    n_detected = (dense[:, cols] > 0).sum(axis=0)
    weight = spec.nonzero_prob * n_detected + spec.zero_prob * (len(cells) - n_detected)
    expected = spec.nonzero_prob * norm.sum(axis=0) / weight
    np.testing.assert_allclose(start[mapping.col_to_vocab[cols]], expected, rtol=1e-5)
    assert start.shape == (19266,)
    assert start[-2:].tolist() == [0.0, 0.0]

    # A fresh model starts from its training cells' values (lr=0: nothing moves after that).
    model = XTrimoGene(data, config="tiny", seed=0)
    model.train(max_epochs=1, lr=0.0, **TRAIN)
    train_start = expected_masked_values(
        data.X, mapping.col_to_vocab, np.asarray(model.train_indices), 19264, spec
    )
    np.testing.assert_allclose(model.module.expression_bias.detach().numpy(), train_start)
    # Training moves it; continued pretraining keeps the learned bias as its start.
    model.train(max_epochs=1, **TRAIN)
    learned = model.module.expression_bias.detach().clone()
    assert not np.allclose(learned.numpy(), train_start)
    model.train(max_epochs=1, lr=0.0, **TRAIN)
    torch.testing.assert_close(model.module.expression_bias.detach(), learned)
