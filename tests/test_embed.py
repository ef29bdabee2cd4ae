"""tl.embed and get_latent_representation on real PBMCs: outputs, invariances, input formats."""

import copy

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scxtrimo


def snapshot(adata):
    return {
        "X": adata.X.copy(),
        "layers": {k: v.copy() for k, v in adata.layers.items()},
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "obsm": {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        "uns": copy.deepcopy(dict(adata.uns)),
    }


def assert_same_matrix(a, b):
    if sp.issparse(a) or sp.issparse(b):
        assert sp.issparse(a)
        assert sp.issparse(b)
        assert a.format == b.format
        assert a.dtype == b.dtype
        assert (a != b).nnz == 0
    else:
        np.testing.assert_array_equal(a, b)


def assert_unchanged(before, adata, *, new_obsm=(), new_uns=()):
    assert_same_matrix(before["X"], adata.X)
    assert set(before["layers"]) == set(adata.layers)
    for k in before["layers"]:
        assert_same_matrix(before["layers"][k], adata.layers[k])
    pd.testing.assert_frame_equal(before["obs"], adata.obs)
    pd.testing.assert_frame_equal(before["var"], adata.var)
    assert set(adata.obsm) == set(before["obsm"]) | set(new_obsm)
    for k, v in before["obsm"].items():
        np.testing.assert_array_equal(v, adata.obsm[k])
    assert set(adata.uns) == set(before["uns"]) | set(new_uns)
    for k, v in before["uns"].items():
        assert repr(v) == repr(adata.uns[k])


def test_embed_writes_only_documented_keys(pbmc, tiny_model):
    pbmc.layers["counts"] = pbmc.X.copy()
    pbmc.obsm["X_other"] = np.ones((pbmc.n_obs, 2))
    before = snapshot(pbmc)
    assert scxtrimo.tl.embed(pbmc, tiny_model) is None
    assert_unchanged(before, pbmc, new_obsm={"X_scxtrimo"}, new_uns={"scxtrimo"})
    emb = pbmc.obsm["X_scxtrimo"]
    assert emb.shape == (pbmc.n_obs, 4 * tiny_model.config.encoder_dim)
    assert emb.dtype == np.float32
    assert np.isfinite(emb).all()
    info = pbmc.uns["scxtrimo"]["X_scxtrimo"]
    assert info["pooling"] == "all"
    assert info["scxtrimo_version"] == scxtrimo.__version__
    assert info["gene_overlap"]["n_vocabulary_genes_present"] == pbmc.n_vars
    assert info["target_depth"] == "f1"


def test_copy_returns_new_object_and_leaves_input(pbmc, tiny_model):
    before = snapshot(pbmc)
    out = scxtrimo.tl.embed(pbmc, tiny_model, copy=True, key_added="X_t")
    assert out is not pbmc
    assert "X_t" in out.obsm
    assert_unchanged(before, pbmc)


@pytest.mark.slow
def test_embedding_is_batch_and_order_independent(pbmc, tiny_model):
    full = tiny_model.get_latent_representation(pbmc)
    one = tiny_model.get_latent_representation(pbmc, batch_size=1)
    np.testing.assert_allclose(full, one, atol=1e-5, rtol=0)
    subset = np.array([7, 3, 99, 42, 0])
    sub = tiny_model.get_latent_representation(pbmc[subset].copy())
    np.testing.assert_allclose(sub, full[subset], atol=1e-5, rtol=0)
    perm = np.random.default_rng(1).permutation(pbmc.n_obs)
    shuffled = tiny_model.get_latent_representation(pbmc[perm].copy(), max_tokens=3000)
    np.testing.assert_allclose(shuffled, full[perm], atol=1e-5, rtol=0)
    by_index = tiny_model.get_latent_representation(pbmc, indices=subset)
    np.testing.assert_allclose(by_index, full[subset], atol=1e-5, rtol=0)
    repeated = tiny_model.get_latent_representation(pbmc, indices=[42, 3, 42])
    np.testing.assert_allclose(repeated, full[[42, 3, 42]], atol=1e-5, rtol=0)


def test_pooling_modes(pbmc, tiny_model):
    d = tiny_model.config.encoder_dim
    full = tiny_model.get_latent_representation(pbmc[:10].copy(), pooling="all")
    mx = tiny_model.get_latent_representation(pbmc[:10].copy(), pooling="max")
    mean = tiny_model.get_latent_representation(pbmc[:10].copy(), pooling="mean")
    assert mx.shape == mean.shape == (10, d)
    # "max" covers all tokens incl. T and S: the max of the S, T and gene-max blocks.
    np.testing.assert_allclose(
        mx, np.maximum.reduce([full[:, :d], full[:, d : 2 * d], full[:, 2 * d : 3 * d]]), atol=1e-6
    )
    np.testing.assert_allclose(mean, full[:, 3 * d :], atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        tiny_model.get_latent_representation(pbmc[:10].copy(), pooling="cls")


@pytest.mark.parametrize(
    "convert",
    [
        lambda X: X.toarray(),
        lambda X: X.tocsc(),
        lambda X: sp.csr_array(X),
        lambda X: X.toarray().astype(np.float16),
        lambda X: X.astype(np.float64),
        lambda X: X.astype(np.int64),
    ],
    ids=["dense", "csc", "csr_array", "dense-float16", "float64", "int64"],
)
def test_matrix_formats_give_identical_embeddings(pbmc, tiny_model, convert):
    small = pbmc[:30].copy()
    ref = tiny_model.get_latent_representation(small)
    other = ad.AnnData(X=convert(small.X), obs=small.obs.copy(), var=small.var.copy())
    np.testing.assert_allclose(tiny_model.get_latent_representation(other), ref, atol=1e-6)


@pytest.mark.slow
def test_views_and_backed_files(pbmc, tiny_model, tmp_path):
    ref = tiny_model.get_latent_representation(pbmc)
    view = pbmc[10:40]
    assert view.is_view
    np.testing.assert_allclose(tiny_model.get_latent_representation(view), ref[10:40], atol=1e-6)
    path = tmp_path / "pbmc.h5ad"
    pbmc.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    scxtrimo.tl.embed(backed, tiny_model)
    np.testing.assert_allclose(backed.obsm["X_scxtrimo"], ref, atol=1e-6)
    backed.file.close()


def test_target_depth_changes_only_what_it_should(pbmc, tiny_model):
    cells = pbmc[:8].copy()
    a = tiny_model.get_latent_representation(cells, target_depth="fold:1")
    b = tiny_model.get_latent_representation(cells, target_depth="f1")
    c = tiny_model.get_latent_representation(cells, target_depth=5.0)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_log1p_input_with_total_counts_matches_counts(pbmc, tiny_model):
    import scanpy as sc

    counts = pbmc[:20].copy()
    ref = tiny_model.get_latent_representation(counts)
    norm = counts.copy()
    norm.obs["n_counts"] = np.asarray(norm.X.sum(axis=1)).ravel()
    norm.X = norm.X.astype(np.float64)
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    out = tiny_model.get_latent_representation(
        norm, input_type="log1p", total_counts_key="n_counts"
    )
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_log1p_without_totals_warns(pbmc, tiny_model):
    import scanpy as sc

    norm = pbmc[:5].copy()
    norm.X = norm.X.astype(np.float32)
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    with pytest.warns(UserWarning, match="sum of the given values"):
        tiny_model.get_latent_representation(norm, input_type="log1p")


def test_counts_declared_as_log1p_are_refused(pbmc, tiny_model):
    with pytest.raises(ValueError, match="look like raw counts"):
        tiny_model.get_latent_representation(pbmc[:5].copy(), input_type="log1p")


def test_normalised_data_declared_as_counts_is_refused(pbmc, tiny_model):
    bad = pbmc[:5].copy()
    bad.X = bad.X.astype(np.float32) / 3.0
    with pytest.raises(ValueError, match=r"not integers.*input_type='log1p'"):
        tiny_model.get_latent_representation(bad)


def test_negative_and_nan_values_are_refused(pbmc, tiny_model):
    neg = pbmc[:5].copy()
    neg.X = neg.X.astype(np.float32)
    neg.X.data[0] = -1
    with pytest.raises(ValueError, match=r"negative values.*sc\.pp\.scale"):
        tiny_model.get_latent_representation(neg)
    nan = pbmc[:5].copy()
    nan.X = nan.X.astype(np.float32)
    nan.X.data[3] = np.nan
    with pytest.raises(ValueError, match=f"NaN or infinite.*{nan.obs_names[0]}"):
        tiny_model.get_latent_representation(nan)


def test_cells_without_counts_raise_or_are_skipped(pbmc, tiny_model):
    cells = pbmc[:6].copy()
    X = cells.X.tolil()
    X[2, :] = 0
    X[4, :] = 0
    X[4, 0] = 1
    cells.X = X.tocsr()
    with pytest.raises(
        ValueError, match=rf"2 cells have fewer than 2 counts.*{cells.obs_names[2]}"
    ):
        scxtrimo.tl.embed(cells, tiny_model)
    scxtrimo.tl.embed(cells, tiny_model, invalid_cells="skip")
    emb = cells.obsm["X_scxtrimo"]
    assert np.isnan(emb[[2, 4]]).all()
    assert np.isfinite(emb[[0, 1, 3, 5]]).all()
    assert cells.uns["scxtrimo"]["X_scxtrimo"]["n_skipped_cells"] == 2
    some = tiny_model.get_latent_representation(cells, indices=[4, 5], invalid_cells="skip")
    assert np.isnan(some[0]).all()
    np.testing.assert_allclose(some[1], emb[5], atol=1e-5, rtol=0)


def test_empty_and_missing_inputs_are_refused(pbmc, tiny_model):
    with pytest.raises(ValueError, match="no cells"):
        tiny_model.get_latent_representation(pbmc[:0].copy())
    with pytest.raises(KeyError, match="Layer 'counts' not found"):
        tiny_model.get_latent_representation(pbmc[:3].copy(), layer="counts")


def test_mudata_rna_modality(pbmc, tiny_model):
    rna = pbmc[:40].copy()
    protein = ad.AnnData(
        X=np.random.default_rng(0).poisson(5, (30, 4)).astype(np.float32),
        obs=pd.DataFrame(index=rna.obs_names[5:35]),
    )
    mdata = md.MuData({"rna": rna, "prot": protein})
    scxtrimo.tl.embed(mdata, tiny_model, mod="rna")
    ref = tiny_model.get_latent_representation(rna)
    np.testing.assert_allclose(mdata["rna"].obsm["X_scxtrimo"], ref, atol=1e-6)
    joint = mdata.obsm["X_scxtrimo"]
    assert joint.shape[0] == mdata.n_obs
    rows = [mdata.obs_names.get_loc(n) for n in rna.obs_names]
    np.testing.assert_allclose(joint[rows], ref, atol=1e-6)
    with pytest.raises(KeyError, match="modalities"):
        scxtrimo.tl.embed(mdata, tiny_model, mod="atac")


def test_model_argument_resolution(pbmc, tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    a = scxtrimo.tl.embed(pbmc[:5].copy(), tmp_path / "m", copy=True).obsm["X_scxtrimo"]
    b = tiny_model.get_latent_representation(pbmc[:5].copy())
    np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scxtrimo.tl.embed(pbmc[:5].copy(), tmp_path / "nope")
    with pytest.raises(TypeError, match="model must be"):
        scxtrimo.tl.embed(pbmc[:5].copy(), 42)


def test_other_gene_sets_work_and_a_gene_subset_warns(pbmc, tiny_model):
    from scxtrimo.data import LowVocabularyCoverageWarning

    subset = pbmc[:10, :2000].copy()  # e.g. data with other genes than the training data
    with pytest.warns(LowVocabularyCoverageWarning, match="2,000 of the 19,264"):
        emb = tiny_model.get_latent_representation(subset)
    assert np.isfinite(emb).all()
    # the same counts with the missing genes as explicit zero columns give the same result
    padded = ad.AnnData(
        X=sp.hstack([subset.X, sp.csr_matrix((10, 50), dtype=subset.X.dtype)]).tocsr(),
        var=pd.DataFrame(index=[*subset.var_names, *pbmc.var_names[5000:5050]]),
    )
    with pytest.warns(LowVocabularyCoverageWarning):
        np.testing.assert_allclose(tiny_model.get_latent_representation(padded), emb, atol=1e-6)


# The duplicated var_names under test: anndata's and scxtrimo's warnings about them are expected.
@pytest.mark.filterwarnings("ignore::scxtrimo.data.DuplicateGenesWarning")
@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_duplicate_gene_names_are_summed(pbmc, tiny_model):
    cells = pbmc[:8].copy()
    names = list(cells.var_names)
    split = cells.X.copy().astype(np.int64)
    halves = split[:, :1].copy()
    halves.data = halves.data // 2
    doubled = ad.AnnData(
        X=sp.hstack(
            [split - sp.hstack([halves, sp.csr_matrix((8, split.shape[1] - 1))]), halves]
        ).tocsr(),
        var=pd.DataFrame(index=[*names, names[0]]),
    )
    np.testing.assert_allclose(
        tiny_model.get_latent_representation(doubled),
        tiny_model.get_latent_representation(cells),
        atol=1e-6,
    )
