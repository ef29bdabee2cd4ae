"""TileDB-SOMA input: an experiment written offline from real cells (tiledbsoma.io.from_h5ad)."""

import anndata as ad
import numpy as np
import pytest

import scxtrimo
from scxtrimo._cli import main
from scxtrimo.data import RowSource, SomaSource, open_source

tiledbsoma = pytest.importorskip("tiledbsoma")
pytest.importorskip("tiledbsoma.io")


def test_soma_source_reads_the_h5ad_rows(soma, pbmc):
    uri, _ = soma
    source = open_source(uri)
    assert isinstance(source, SomaSource)
    assert isinstance(source, RowSource)
    assert source.shape == pbmc.shape
    assert source.X_name == "data"
    assert list(source.obs.index) == list(pbmc.obs_names)
    assert list(source.var.index) == list(pbmc.var_names)
    for rows in (np.arange(10, 40), np.array([0, 3, 50, 119])):
        np.testing.assert_array_equal(source.read_rows(rows).toarray(), pbmc.X[rows].toarray())
    with tiledbsoma.Experiment.open(uri) as exp:  # an opened Experiment works too
        assert SomaSource(exp).shape == pbmc.shape


@pytest.mark.slow
def test_embedding_from_soma_equals_h5ad(soma, pbmc, tiny_model, tmp_path):
    uri, path = soma
    from_h5ad = scxtrimo.tl.embed_to_store(path, tmp_path / "a.zarr", tiny_model, chunk_size=50)
    from_soma = scxtrimo.tl.embed_to_store(uri, tmp_path / "b.zarr", tiny_model, chunk_size=50)
    a, b = ad.read_zarr(from_h5ad), ad.read_zarr(from_soma)
    assert list(b.obs_names) == list(pbmc.obs_names)
    np.testing.assert_allclose(b.obsm["X_scxtrimo"], a.obsm["X_scxtrimo"], atol=1e-5)


def test_soma_filter_and_cli(soma, pbmc, tiny_model, tmp_path):
    uri, _ = soma
    model_dir = tmp_path / "tiny"
    tiny_model.save(model_dir)
    out = tmp_path / "b.zarr"
    args = ["-q", "embed", uri, "--out", str(out), "--model", str(model_dir)]
    assert main([*args, "--obs-filter", "cell_type == 'B'", "--chunk-size", "16"]) == 0
    keep = (pbmc.obs["cell_type"] == "B").to_numpy()
    result = ad.read_zarr(out)
    assert list(result.obs_names) == list(pbmc.obs_names[keep])
    expected = tiny_model.get_latent_representation(pbmc[keep].copy())
    np.testing.assert_allclose(result.obsm["X_scxtrimo"], expected, atol=1e-5)
    with pytest.raises(ValueError, match="different input"):  # another filter, another input
        main([*args, "--obs-filter", "cell_type == 'NK'", "--resume"])


def test_soma_errors_before_work(soma, tiny_model, tmp_path):
    uri, _ = soma
    with pytest.raises(ValueError, match="matches no cell"):
        SomaSource(uri, obs_value_filter="cell_type == 'no such type'")
    with pytest.raises(ValueError, match="could not be applied"):
        SomaSource(uri, obs_value_filter="no_such_column == 1")
    with pytest.raises(FileNotFoundError, match="No TileDB-SOMA Experiment"):
        SomaSource(str(tmp_path / "missing.soma"))
    with pytest.raises(KeyError, match="Measurement"):
        SomaSource(uri, measurement_name="ATAC")
    out = tmp_path / "e.zarr"
    with pytest.raises(ValueError, match="matches no cell"):
        scxtrimo.tl.embed_to_store(
            uri, out, tiny_model, obs_value_filter="cell_type == 'no such type'"
        )
    assert not out.exists()
