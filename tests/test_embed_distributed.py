"""Multi-process embedding: Lightning DDP prediction (CPU, gloo) with a writer into the store."""

import json

import anndata as ad
import numpy as np
import pytest

import scxtrimo
from scxtrimo.inference import EmbeddingStore as _Store


@pytest.mark.slow
def test_two_processes_equal_one(pbmc, tiny_model, tmp_path):
    cells = pbmc[:80].copy()
    path = tmp_path / "in.h5ad"
    cells.write_h5ad(path)
    one = scxtrimo.tl.embed_to_store(path, tmp_path / "one.zarr", tiny_model, chunk_size=20)
    two = scxtrimo.tl.embed_to_store(
        path,
        tmp_path / "two.zarr",
        tiny_model,
        chunk_size=20,
        devices=2,
        accelerator="cpu",
        strategy="ddp_spawn",
    )
    a, b = ad.read_zarr(one), ad.read_zarr(two)
    assert list(b.obs_names) == list(cells.obs_names)  # rows in input order
    np.testing.assert_allclose(b.obsm["X_scxtrimo"], a.obsm["X_scxtrimo"], atol=1e-5)
    done = _Store(two, "X_scxtrimo").done_chunks()
    assert {k: d["rank"] for k, d in done.items()} == {0: 0, 1: 1, 2: 0, 3: 1}  # both worked
    assert json.loads(b.uns["scxtrimo"]["X_scxtrimo"]["fingerprint"])["chunk_size"] == 20


@pytest.mark.slow
def test_distributed_resume_computes_only_missing_chunks(pbmc, tiny_model, tmp_path):
    from _stop import stopped_after_chunks

    cells = pbmc[:60].copy()
    path = tmp_path / "in.h5ad"
    cells.write_h5ad(path)
    out = tmp_path / "e.zarr"
    with stopped_after_chunks(2):
        scxtrimo.tl.embed_to_store(path, out, tiny_model, chunk_size=20)
    first = _Store(out, "X_scxtrimo").done_chunks()
    # One chunk is missing for two processes: rank 1 gets none (and must not fail).
    scxtrimo.tl.embed_to_store(
        path, out, tiny_model, resume=True, devices=2, accelerator="cpu", strategy="ddp_spawn"
    )
    done = _Store(out, "X_scxtrimo").done_chunks()
    assert (done[0], done[1]) == (first[0], first[1])  # finished chunks were not recomputed
    assert done[2]["rank"] == 0
    expected = tiny_model.get_latent_representation(cells)
    np.testing.assert_allclose(ad.read_zarr(out).obsm["X_scxtrimo"], expected, atol=1e-5)
