"""tl.enhance on real PBMCs: layer contents, gene mapping, subsets, chunking, invalid cells."""

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scxtrimo
from _keys import assert_only_changed, full_snapshot


@pytest.fixture
def cells(pbmc):
    """8 real PBMCs plus a column that is not a gene of the vocabulary."""
    small = pbmc[:8].copy()
    extra = ad.AnnData(
        X=sp.csr_matrix(np.ones((small.n_obs, 1), dtype=small.X.dtype)),
        obs=small.obs[[]],
        var=pd.DataFrame(index=["NOT_A_GENE_1"]),
    )
    out = ad.concat([small, extra], axis=1, merge="first")
    out.obs = small.obs.copy()
    return out


def test_enhance_writes_only_documented_keys(cells, tiny_model):
    cells.layers["counts"] = cells.X.copy()
    before = full_snapshot(cells)
    assert scxtrimo.tl.enhance(cells, tiny_model) is None
    assert_only_changed(
        before, cells, layers={"scxtrimo_enhanced"}, uns_scxtrimo={"scxtrimo_enhanced"}
    )
    layer = cells.layers["scxtrimo_enhanced"]
    assert layer.shape == cells.shape
    assert layer.dtype == np.float32
    outside = cells.var_names.get_loc("NOT_A_GENE_1")
    assert np.isnan(layer[:, outside]).all()  # not predicted: NaN, never 0
    inside = np.delete(np.arange(cells.n_vars), outside)
    assert np.isfinite(layer[:, inside]).all()
    info = cells.uns["scxtrimo"]["scxtrimo_enhanced"]
    assert info["target_depth"] == "f10"
    assert info["n_genes_filled"] == cells.n_vars - 1
    assert info["genes_outside_vocabulary"] == []


@pytest.mark.slow
def test_enhanced_values_are_the_decoder_predictions_in_column_order(cells, tiny_model):
    genes = ["LYZ", "CD3E", "MS4A1", "NKG7", "NOT_A_GENE_1"]
    scxtrimo.tl.enhance(cells, tiny_model, genes=genes, target_depth="fold:4", batch_size=3)
    layer = cells.layers["scxtrimo_enhanced"]
    cols = cells.var_names.get_indexer(genes)
    filled = np.flatnonzero(np.isfinite(layer).any(axis=0))
    np.testing.assert_array_equal(filled, np.sort(cols[:4]))
    expected = tiny_model.get_expression(cells, genes=genes[:4], target_depth="fold:4")
    np.testing.assert_allclose(layer[:, cols[:4]], expected, atol=1e-5)
    info = cells.uns["scxtrimo"]["scxtrimo_enhanced"]
    assert info["genes_outside_vocabulary"] == ["NOT_A_GENE_1"]
    assert sorted(info["genes"]) == sorted(genes[:4])
    # Chunk size and the gene subset change nothing.
    scxtrimo.tl.enhance(cells, tiny_model, target_depth="fold:4", batch_size=8, key_added="all")
    np.testing.assert_allclose(cells.layers["all"][:, cols[:4]], expected, atol=1e-5)
    # A deeper target changes the prediction.
    scxtrimo.tl.enhance(cells, tiny_model, genes=genes[:4], target_depth="fold:1", key_added="f1")
    assert not np.allclose(cells.layers["f1"][:, cols[:4]], expected)
    with pytest.raises(KeyError, match="not in var_names"):
        scxtrimo.tl.enhance(cells, tiny_model, genes=["CD3E", "NO_SUCH"])


def test_enhance_invalid_cells_copy_mudata_backed(cells, tiny_model, tmp_path):
    counts = cells.X.tolil()
    counts[2, :] = 0
    cells.X = counts.tocsr()
    with pytest.raises(ValueError, match="fewer than 2"):
        scxtrimo.tl.enhance(cells, tiny_model, genes=["CD3E"])
    before = full_snapshot(cells)
    out = scxtrimo.tl.enhance(cells, tiny_model, genes=["CD3E"], invalid_cells="skip", copy=True)
    assert_only_changed(before, cells)
    col = cells.var_names.get_loc("CD3E")
    values = out.layers["scxtrimo_enhanced"][:, col]
    assert np.isnan(values[2])
    assert np.isfinite(np.delete(values, 2)).all()
    assert out.uns["scxtrimo"]["scxtrimo_enhanced"]["n_skipped_cells"] == 1
    mdata = md.MuData({"rna": out.copy()})
    scxtrimo.tl.enhance(mdata, tiny_model, genes=["CD3E"], invalid_cells="skip", key_added="m")
    np.testing.assert_allclose(mdata.mod["rna"].layers["m"][:, col], values, equal_nan=True)
    cells.write_h5ad(tmp_path / "c.h5ad")
    backed = ad.read_h5ad(tmp_path / "c.h5ad", backed="r")
    with pytest.raises(ValueError, match="backed"):
        scxtrimo.tl.enhance(backed, tiny_model)
    backed.file.close()
