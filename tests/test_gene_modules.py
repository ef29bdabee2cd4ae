"""Gene embeddings (table and context), gene modules and their heatmap on real PBMCs."""

import matplotlib
import numpy as np
import pandas as pd
import pytest

import scxtrimo
from _keys import assert_only_changed, full_snapshot
from scxtrimo.data import load_vocabulary

matplotlib.use("Agg")

MARKERS = ["CD3D", "CD3E", "MS4A1", "CD79A", "LYZ", "S100A8", "NKG7", "GNLY"]


def vocab_rows(names):
    symbols = load_vocabulary().symbols
    return symbols.get_indexer(names)


def test_gene_embeddings_table(pbmc, tiny_model):
    pbmc.var_names = [*pbmc.var_names[:-1], "NOT_A_GENE_1"]
    before = full_snapshot(pbmc)
    assert scxtrimo.tl.gene_embeddings(pbmc, tiny_model) is None
    key = "scxtrimo_gene_embedding"
    assert_only_changed(before, pbmc, varm={key}, uns_scxtrimo={key})
    emb = pbmc.varm[key]
    assert emb.shape == (pbmc.n_vars, tiny_model.config.encoder_dim)
    assert np.isnan(emb[-1]).all()
    table = tiny_model.get_gene_embeddings()
    np.testing.assert_array_equal(emb[pbmc.var_names.get_indexer(MARKERS)], table.loc[MARKERS])
    assert pbmc.uns["scxtrimo"][key]["n_genes_embedded"] == pbmc.n_vars - 1


def test_context_gene_embeddings_are_streamed_means(pbmc, tiny_model):
    cells = pbmc[:12].copy()
    cells.obs["group"] = pd.Categorical(["a"] * 5 + ["b"] * 7)
    before = full_snapshot(cells)
    key = "scxtrimo_context_gene_embedding"
    scxtrimo.tl.context_gene_embeddings(
        cells, tiny_model, genes=MARKERS, groupby="group", max_cells=None, batch_size=5
    )
    assert_only_changed(before, cells, varm={key}, uns_scxtrimo={key})
    out = cells.varm[key]
    d = tiny_model.config.decoder_dim
    assert out.shape == (cells.n_vars, 2, d)
    cols = cells.var_names.get_indexer(MARKERS)
    assert np.isnan(np.delete(out, cols, axis=0)).all()
    per_cell = tiny_model.get_gene_embeddings(cells, genes=MARKERS)  # [cells, genes, d]
    np.testing.assert_allclose(out[cols, 0], per_cell[:5].mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(out[cols, 1], per_cell[5:].mean(axis=0), atol=1e-5)
    info = cells.uns["scxtrimo"][key]
    assert info["groups"] == ["a", "b"]
    assert info["n_cells"] == [5, 7]
    # Without groups: the mean over all (here at most 4 per group, sampled) cells.
    scxtrimo.tl.context_gene_embeddings(
        cells, tiny_model, genes=MARKERS[:3], key_added="ctx", max_cells=4
    )
    assert cells.varm["ctx"].shape == (cells.n_vars, d)
    assert cells.uns["scxtrimo"]["ctx"]["n_cells"] == [4]
    assert np.isfinite(cells.varm["ctx"][cols[:3]]).all()


def test_cluster_genes_recovers_separated_groups():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    truth = np.repeat([0, 1, 2], [30, 20, 10])
    emb = centres[truth] + rng.normal(size=(60, 16))
    for kwargs in ({"method": "hierarchical", "n_modules": 3}, {"method": "leiden"}):
        found = scxtrimo.tl.cluster_genes(emb, **kwargs)
        # Same partition, and modules are numbered by size.
        assert pd.crosstab(found, truth).gt(0).sum(axis=1).eq(1).all()
        np.testing.assert_array_equal(found, truth)


@pytest.mark.parametrize(
    "kwargs",
    [{"use": "table"}, {"use": "table", "n_modules": 4}, {"use": "context", "max_cells": 6}],
    ids=["table-leiden", "table-hierarchical", "context-leiden"],
)
def test_gene_modules_write_only_documented_keys(pbmc, tiny_model, kwargs):
    key = "scxtrimo_module"
    pbmc.var["highly_variable"] = False
    hvg = pbmc.var_names[np.argsort(-np.asarray((pbmc.X > 0).sum(axis=0)).ravel())[:150]]
    pbmc.var.loc[hvg, "highly_variable"] = True
    before = full_snapshot(pbmc)
    scxtrimo.tl.gene_modules(pbmc, tiny_model, **kwargs)
    assert_only_changed(before, pbmc, var={key}, uns_scxtrimo={key})
    modules = pbmc.var[key]
    assert isinstance(modules.dtype, pd.CategoricalDtype)
    assert modules.notna().sum() == 150  # the highly variable genes, all in the vocabulary
    assert modules[~pbmc.var["highly_variable"]].isna().all()
    info = pbmc.uns["scxtrimo"][key]
    sizes = modules.value_counts().reindex(modules.cat.categories).to_numpy()
    np.testing.assert_array_equal(sizes, info["module_sizes"])
    assert (np.diff(sizes) <= 0).all()  # "0" is the largest
    if "n_modules" in kwargs:
        assert info["method"] == "hierarchical"
        assert len(modules.cat.categories) == 4
    assert info["embedding"].shape[0] == len(info["genes"]) == 150
    np.testing.assert_allclose(np.linalg.norm(info["embedding"], axis=1), 1.0, atol=1e-5)
    ax = scxtrimo.pl.gene_module_heatmap(pbmc, key, max_genes_per_module=10, show=False)
    n = ax.images[0].get_array().shape[0]
    assert n <= 10 * len(modules.cat.categories)
    np.testing.assert_allclose(np.diag(np.asarray(ax.images[0].get_array())), 1.0, atol=1e-5)
    matplotlib.pyplot.close("all")


def test_gene_modules_gene_choice_and_errors(pbmc, tiny_model):
    scxtrimo.tl.gene_modules(pbmc, tiny_model, use="table", n_top_genes=100, key_added="m")
    assert pbmc.var["m"].notna().sum() == 100
    scxtrimo.tl.gene_modules(pbmc, tiny_model, genes=MARKERS, use="table", n_modules=2)
    assert set(pbmc.var_names[pbmc.var["scxtrimo_module"].notna()]) == set(MARKERS)
    with pytest.raises(ValueError, match="use must be"):
        scxtrimo.tl.gene_modules(pbmc, tiny_model, use="both")
    with pytest.raises(KeyError, match="not in var_names"):
        scxtrimo.tl.gene_modules(pbmc, tiny_model, genes=["CD3E", "NO_SUCH"], use="table")
    with pytest.raises(KeyError, match="gene_modules"):
        scxtrimo.pl.gene_module_heatmap(pbmc, "absent")
    assert (vocab_rows(MARKERS) >= 0).all()
