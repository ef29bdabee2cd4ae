"""Resumable, chunked embedding into .zarr / .h5ad (tl.embed_to_store, scxtrimo embed --out)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import scxtrimo
from _stop import stopped_after_chunks
from scxtrimo._cli import main
from scxtrimo.data import ConcatSource, H5adSource, ZarrSource, open_source
from scxtrimo.inference import EmbeddingStore as _Store
from scxtrimo.model import XTrimoGene

ATOL = 1e-5


@pytest.fixture
def cells(pbmc):
    """120 real PBMCs, written once as .h5ad."""
    return pbmc


@pytest.fixture
def h5ad(cells, tmp_path):
    path = tmp_path / "in.h5ad"
    cells.write_h5ad(path)
    return path


@pytest.fixture
def reference(cells, tiny_model):
    return tiny_model.get_latent_representation(cells)


def _markers(path: Path, key: str = "X_scxtrimo") -> dict[int, dict]:
    return _Store(path, key).done_chunks()


@pytest.mark.slow
def test_zarr_and_h5ad_outputs_equal_embed(h5ad, cells, tiny_model, reference, tmp_path):
    expected = scxtrimo.tl.embed(cells, tiny_model, copy=True).obsm["X_scxtrimo"]
    np.testing.assert_allclose(expected, reference, atol=ATOL)
    out = scxtrimo.tl.embed_to_store(h5ad, tmp_path / "e.zarr", tiny_model, chunk_size=32)
    store = ad.read_zarr(out)
    assert list(store.obs_names) == list(cells.obs_names)  # input order
    assert (store.obs["cell_type"] == cells.obs["cell_type"]).all()
    np.testing.assert_allclose(store.obsm["X_scxtrimo"], expected, atol=ATOL)
    report = store.uns["scxtrimo"]["X_scxtrimo"]
    assert report["pooling"] == "all"
    assert report["chunk_size"] == 32
    assert json.loads(report["fingerprint"])["model"]["weights_sha256"]
    chunks = list(scxtrimo.inference.iter_embedding_store(out))
    assert [len(c) for c in chunks] == [32, 32, 32, 24]
    np.testing.assert_allclose(np.concatenate(chunks), expected, atol=ATOL)

    h5 = scxtrimo.tl.embed_to_store(h5ad, tmp_path / "e.h5ad", tiny_model, chunk_size=50)
    result = ad.read_h5ad(h5)
    assert (result.X != cells.X).nnz == 0  # a copy of the input plus the embedding
    np.testing.assert_allclose(result.obsm["X_scxtrimo"], expected, atol=ATOL)
    assert not list(tmp_path.glob(".*"))  # no temporary file or work store left behind
    slim = scxtrimo.tl.embed_to_store(
        h5ad, tmp_path / "slim.h5ad", tiny_model, chunk_size=50, copy_input=False
    )
    slim = ad.read_h5ad(slim)
    assert slim.n_vars == 0
    np.testing.assert_allclose(slim.obsm["X_scxtrimo"], expected, atol=ATOL)


@pytest.mark.slow
def test_resumed_after_stop_equals_uninterrupted(h5ad, tiny_model, reference, tmp_path):
    out = tmp_path / "e.zarr"
    with stopped_after_chunks(2):
        scxtrimo.tl.embed_to_store(h5ad, out, tiny_model, chunk_size=25)
    first = _markers(out)
    assert sorted(first) == [0, 1]
    with pytest.raises(ValueError, match="not complete"):
        scxtrimo.inference.iter_embedding_store(out)
    with pytest.raises(FileExistsError, match="resume"):
        scxtrimo.tl.embed_to_store(h5ad, out, tiny_model, chunk_size=25)
    scxtrimo.tl.embed_to_store(h5ad, out, tiny_model, resume=True)  # chunk size from the store
    after = _markers(out)
    assert sorted(after) == [0, 1, 2, 3, 4]
    assert all(after[k] == first[k] for k in first)  # finished chunks were not recomputed
    assert after[2]["run"] != first[0]["run"]
    np.testing.assert_allclose(ad.read_zarr(out).obsm["X_scxtrimo"], reference, atol=ATOL)
    # Resuming a complete store does nothing.
    scxtrimo.tl.embed_to_store(h5ad, out, tiny_model, resume=True)
    assert _markers(out) == after


@pytest.mark.slow
def test_killed_cli_run_resumes(h5ad, tiny_model, reference, tmp_path):
    """A real SIGKILL in the middle of a run of the command, then --resume."""
    model_dir = tmp_path / "tiny"
    tiny_model.save(model_dir)
    out = tmp_path / "out.h5ad"
    cmd = [sys.executable, "-m", "scxtrimo", "-q", "embed", str(h5ad), "--out", str(out)]
    cmd += ["--model", str(model_dir), "--chunk-size", "30"]
    env = {**os.environ, "SCXTRIMO_TEST_KILL_AFTER_CHUNKS": "2"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()  # the .h5ad only appears when complete
    work = tmp_path / ".out.h5ad.scxtrimo.zarr"
    assert sorted(_markers(work)) == [0, 1]
    with pytest.raises(SystemExit, match="--resume"):
        main(["-q", "embed", str(h5ad), "--out", str(out), "--model", str(model_dir)])
    assert (
        main(["-q", "embed", str(h5ad), "--out", str(out), "--model", str(model_dir), "--resume"])
        == 0
    )
    assert not work.exists()
    np.testing.assert_allclose(ad.read_h5ad(out).obsm["X_scxtrimo"], reference, atol=ATOL)


@pytest.mark.slow
def test_resume_refuses_other_model_input_or_parameters(h5ad, cells, tiny_model, tmp_path):
    out = tmp_path / "e.zarr"
    with stopped_after_chunks(1):
        scxtrimo.tl.embed_to_store(h5ad, out, tiny_model, chunk_size=40)
    other_model = XTrimoGene(None, config="tiny", seed=1)
    with pytest.raises(ValueError, match="different model"):
        scxtrimo.tl.embed_to_store(h5ad, out, other_model, resume=True)
    other_input = tmp_path / "other.h5ad"
    cells[::-1].copy().write_h5ad(other_input)
    with pytest.raises(ValueError, match="different input"):
        scxtrimo.tl.embed_to_store(other_input, out, tiny_model, resume=True)
    with pytest.raises(ValueError, match="different params"):
        scxtrimo.tl.embed_to_store(h5ad, out, tiny_model, resume=True, pooling="mean")
    with pytest.raises(ValueError, match="chunk_size"):
        scxtrimo.tl.embed_to_store(h5ad, out, tiny_model, resume=True, chunk_size=20)
    assert sorted(_markers(out)) == [0]  # nothing was touched
    scxtrimo.tl.embed_to_store(h5ad, out, other_model, overwrite=True, chunk_size=60)
    assert sorted(_markers(out)) == [0, 1]


def test_refuses_more_devices_than_exist(h5ad, tiny_model, tmp_path):
    before = h5ad.read_bytes()
    with pytest.raises(ValueError, match="must not be the input"):
        scxtrimo.tl.embed_to_store(h5ad, h5ad, tiny_model, overwrite=True)
    assert h5ad.read_bytes() == before
    out = tmp_path / "e.zarr"
    with pytest.raises(ValueError, match="CPU cores"):
        scxtrimo.tl.embed_to_store(h5ad, out, tiny_model, devices=10_000, accelerator="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        scxtrimo.tl.embed_to_store(h5ad, out, tiny_model, devices=2, accelerator="gpu")
    assert not out.exists()


@pytest.mark.slow
def test_shards_with_different_gene_sets(cells, tiny_model, tmp_path):
    rng = np.random.default_rng(1)
    first = cells[:50].copy()
    keep = np.sort(rng.choice(cells.n_vars, int(cells.n_vars * 0.8), replace=False))
    second = cells[50:, keep].copy()  # fewer genes ...
    second = second[:, rng.permutation(second.n_vars)].copy()  # ... in another order
    paths = [tmp_path / "a.h5ad", tmp_path / "b.h5ad"]
    first.write_h5ad(paths[0])
    second.write_h5ad(paths[1])
    expected = np.concatenate([tiny_model.get_latent_representation(a) for a in (first, second)])
    out = scxtrimo.tl.embed_to_store(paths, tmp_path / "e.zarr", tiny_model, chunk_size=32)
    store = ad.read_zarr(out)  # chunk 1 spans both shards
    assert list(store.obs_names) == list(cells.obs_names)
    np.testing.assert_allclose(store.obsm["X_scxtrimo"], expected, atol=ATOL)
    report = store.uns["scxtrimo"]["X_scxtrimo"]
    assert report["n_sources"] == 2
    assert len(report["gene_overlap_per_source"]) == 2
    source = open_source(paths)
    assert isinstance(source, ConcatSource)
    assert source.pieces(40, 70) == [(0, 40, 50), (1, 0, 20)]


@pytest.mark.slow
def test_zarr_input_and_sources(cells, h5ad, tiny_model, reference, tmp_path):
    path = tmp_path / "in.zarr"
    cells.write_zarr(path)
    source = open_source(path)
    assert isinstance(source, ZarrSource)
    rows = np.array([3, 7, 8, 100])
    expected = cells.X[rows].toarray()
    np.testing.assert_array_equal(source.read_rows(rows).toarray(), expected)
    np.testing.assert_array_equal(H5adSource(h5ad).read_rows(rows).toarray(), expected)
    np.testing.assert_array_equal(open_source(cells).read_rows(rows).toarray(), expected)
    out = scxtrimo.tl.embed_to_store(path, tmp_path / "e.zarr", tiny_model, chunk_size=64)
    np.testing.assert_allclose(ad.read_zarr(out).obsm["X_scxtrimo"], reference, atol=ATOL)


@pytest.mark.slow
def test_cli_zarr_output_and_invalid_cells(cells, tiny_model, tmp_path):
    cells = cells.copy()
    X = cells.X.tolil()
    X[5] = 0  # a cell the model cannot embed
    cells.X = X.tocsr()
    path = tmp_path / "in.h5ad"
    cells.write_h5ad(path)
    model_dir = tmp_path / "tiny"
    tiny_model.save(model_dir)
    out = tmp_path / "e.zarr"
    args = ["-q", "embed", str(path), "--out", str(out), "--model", str(model_dir)]
    with pytest.raises(ValueError, match="fewer than 2 counts"):
        main([*args, "--chunk-size", "64"])
    assert main([*args, "--chunk-size", "64", "--skip-invalid-cells", "--overwrite"]) == 0
    store = ad.read_zarr(out)
    emb = store.obsm["X_scxtrimo"]
    assert np.isnan(emb[5]).all()
    assert not np.isnan(np.delete(emb, 5, axis=0)).any()
    assert store.uns["scxtrimo"]["X_scxtrimo"]["n_skipped_cells"] == 1
    assert main([*args, "--skip-invalid-cells", "--resume"]) == 0  # complete: nothing to do
