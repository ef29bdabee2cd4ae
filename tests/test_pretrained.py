"""The pretrained model shipped inside the package (the default of ``tl.embed``)."""

from __future__ import annotations

import json
from importlib.resources import files

import numpy as np
import pytest
import torch

import scxtrimo
from scxtrimo.model import resolve_model
from scxtrimo.model._pretrained import default_model_available


@pytest.fixture(scope="module")
def shipped():
    return resolve_model(None)


def test_shipped_model_is_there_and_described(shipped):
    assert default_model_available()
    meta = json.loads((files("scxtrimo") / "_resources" / "pretrained" / "model.json").read_text())
    assert meta["source"] == "scxtrimo-default"
    assert meta["shipped_default"]["weights_dtype"] == "float16"
    # Trained on a cell's 128 highest genes, shipped to embed with 256 (docs: evaluation).
    assert meta["training_args"]["max_genes"] == 128
    assert meta["training_args"]["regression_every"] == 2
    assert shipped.is_trained
    assert shipped.default_max_genes == 256
    assert shipped.module.cell_head is None  # the head trained with the encoder is not shipped
    assert shipped.classifier_ is None  # pretrained only: no untrained head shipped
    assert all(p.dtype == torch.float32 for p in shipped.module.parameters())


def test_embed_uses_shipped_model_by_default(pbmc, shipped):
    adata = pbmc[:40].copy()
    before = adata.X.copy()
    scxtrimo.tl.embed(adata)
    emb = adata.obsm["X_scxtrimo"]
    assert emb.shape == (40, 4 * shipped.config.encoder_dim)
    assert np.isfinite(emb).all()
    assert adata.uns["scxtrimo"]["X_scxtrimo"]["model"] == "scxtrimo-default"
    assert adata.uns["scxtrimo"]["X_scxtrimo"]["max_genes"] == 256
    assert (adata.X - before).nnz == 0
    np.testing.assert_allclose(emb, shipped.get_latent_representation(adata), atol=1e-6)


@pytest.mark.slow
def test_shipped_model_embedding_is_not_collapsed(pbmc_full, shipped):
    """Regression guard: a collapsed pretraining (the first recipe) scored 0.45 here."""
    labelled = (pbmc_full.obs["cell_type"] != "?").to_numpy()
    emb = shipped.get_latent_representation(pbmc_full[labelled].copy())
    labels = pbmc_full.obs["cell_type"].to_numpy()[labelled]
    assert emb.std(axis=0).mean() > 1e-2
    assert scxtrimo.metrics.knn_accuracy(emb, labels, k=15)["accuracy"] > 0.65
