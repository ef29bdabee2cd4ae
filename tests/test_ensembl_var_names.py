"""Ensembl IDs as var_names (CELLxGENE / Census style) and duplicated var_names, on real PBMCs."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

import scxtrimo
from scxtrimo.data import DuplicateGenesWarning, map_genes


def _versioned(adata):
    out = adata.copy()
    out.var["symbol"] = out.var_names.to_numpy()
    out.var_names = (out.var["gene_ids"].astype(str) + ".5").to_numpy()
    return out


@pytest.mark.slow
def test_versioned_ensembl_var_names_embed_like_symbols(pbmc, tiny_model, tmp_path):
    _check_like_symbols(pbmc, tiny_model, tmp_path)


@pytest.mark.slow
def test_versioned_ensembl_var_names_full_gene_set(shared_data, tiny_model, tmp_path):
    import anndata as ad

    path = shared_data / "pbmc4k_soupx_2170.h5ad"  # all 33,694 genes
    assert path.exists(), f"{path} is missing from the shared data folder"
    full = ad.read_h5ad(path)[:60].copy()
    assert full.n_vars == 33_694
    _check_like_symbols(full, tiny_model, tmp_path)


def _check_like_symbols(pbmc, tiny_model, tmp_path):
    by_id = _versioned(pbmc)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DuplicateGenesWarning)
        emb_id = tiny_model.get_latent_representation(by_id)  # no extra argument
    # The same genes as the symbol AnnData matched through its Ensembl column ...
    emb_ref = tiny_model.get_latent_representation(pbmc, gene_ids_key="gene_ids")
    np.testing.assert_allclose(emb_id, emb_ref, atol=1e-5)
    # ... and as plain symbols, once the genes whose symbol was made unique (PIK3R3.1: a
    # second Ensembl ID of one symbol, unmatched by symbol, matched by ID) are left out.
    differ = map_genes(pbmc.var).col_to_vocab != map_genes(by_id.var).col_to_vocab
    assert differ.sum() < 50  # 22 of 33,694 in the full 10x gene table, 0 in the shipped subset
    keep = ~differ
    np.testing.assert_allclose(
        tiny_model.get_latent_representation(by_id[:, keep].copy()),
        tiny_model.get_latent_representation(pbmc[:, keep].copy()),
        atol=1e-5,
    )
    # tl.embed and the chunked store take them as they are, too.
    scxtrimo.tl.embed(by_id, tiny_model)
    np.testing.assert_allclose(by_id.obsm["X_scxtrimo"], emb_id, atol=1e-5)
    path = tmp_path / "ids.h5ad"
    by_id.write_h5ad(path)
    out = scxtrimo.tl.embed_to_store(path, tmp_path / "ids.zarr", tiny_model, chunk_size=64)
    import anndata as ad

    np.testing.assert_allclose(ad.read_zarr(out).obsm["X_scxtrimo"], emb_id, atol=1e-5)


# The duplicated var_names under test: anndata's warning about them is expected.
@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@pytest.mark.slow
def test_duplicated_var_names_warn_and_are_summed(pbmc, tiny_model):
    genes = ["CD74", "LYZ", "B2M"]
    cols = [pbmc.var_names.get_loc(g) for g in genes]
    X = pbmc.X.tocsc().astype(np.int64)
    # Split the counts of three genes into two columns of the same name.
    half = X[:, cols].copy()
    half.data = half.data // 2
    rest = X[:, cols] - half
    dup = pbmc.copy()
    extra = pbmc[:, cols].copy()
    import anndata as ad

    dup = ad.concat([dup, extra], axis=1, merge="same")
    Xd = sp.hstack([X, half]).tolil()
    Xd[:, cols] = rest
    dup.X = sp.csr_matrix(Xd)
    assert dup.var_names.duplicated().sum() == 3
    with pytest.warns(DuplicateGenesWarning, match=r"3 var_names occur more than once.*summed"):
        emb = tiny_model.get_latent_representation(dup)
    np.testing.assert_allclose(emb, tiny_model.get_latent_representation(pbmc), atol=1e-5)
    with pytest.warns(DuplicateGenesWarning, match="only the first column"):
        first = map_genes(dup.var, duplicates="first")
    assert (first.col_to_vocab[pbmc.n_vars :] == -1).all()
    with pytest.raises(ValueError, match="more than one column"):
        map_genes(dup.var, duplicates="error")
