"""Official scFoundation parity through the public API: AnnData in the user's gene layout.

The fixture's input has shuffled gene columns, 20 genes outside the vocabulary and 300
vocabulary genes missing; the official script aligned it by name. Here the same counts go
through ``XTrimoGene.from_scfoundation`` + ``tl.embed`` / ``get_expression`` /
``get_gene_embeddings`` and the CLI, all 64 cells of different depths in shared batches.
"""

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scxtrimo
from scxtrimo._cli import main
from scxtrimo.model import XTrimoGene

FIXTURE = Path(__file__).parent / "data" / "parity_small"
CELL = {"atol": 1e-5, "rtol": 1e-4}
GENE = {"atol": 5e-5, "rtol": 1e-4}


@pytest.fixture(scope="module")
def parity():
    return dict(np.load(FIXTURE / "parity.npz", allow_pickle=False))


def _csr(p, name):
    return sp.csr_matrix(
        (p[f"{name}_data"], p[f"{name}_indices"], p[f"{name}_indptr"]),
        shape=tuple(p[f"{name}_shape"]),
    )


@pytest.fixture(scope="module")
def user_adata(parity):
    return ad.AnnData(
        X=_csr(parity, "input_user_counts"),
        obs=pd.DataFrame(index=parity["input_cell_ids"].astype(str)),
        var=pd.DataFrame(index=parity["input_user_gene_names"].astype(str)),
    )


@pytest.fixture(scope="module")
def models():
    return {
        key: XTrimoGene.from_scfoundation(FIXTURE / "models.ckpt", checkpoint=key)
        for key in ("cell", "rde", "gene")
    }


@pytest.mark.parametrize(
    ("key", "target_depth", "pooling", "expected"),
    [
        ("cell", None, "all", "out_cell_ce_all_t4_F"),
        ("cell", "t4", "max", "out_cell_ce_max_t4_F"),
        ("rde", "a5", "all", "out_cell_rde_all_a5_F"),
        ("cell", "fold:1", "all", "out_cell_ce_all_f1_F"),
        ("cell", "f2", "all", "out_cell_ce_all_f2_F"),
    ],
)
def test_cell_embeddings_match_official(
    parity, user_adata, models, key, target_depth, pooling, expected
):
    adata = user_adata.copy()
    scxtrimo.tl.embed(adata, models[key], target_depth=target_depth, pooling=pooling)
    np.testing.assert_allclose(adata.obsm["X_scxtrimo"], parity[expected], **CELL)
    overlap = adata.uns["scxtrimo"]["X_scxtrimo"]["gene_overlap"]
    assert overlap["n_vocabulary_genes_present"] == 19264 - 300
    assert overlap["n_matched_columns"] == adata.n_vars - 20


def test_log_normalised_input_modes(parity, models):
    lognorm = ad.AnnData(
        X=_csr(parity, "lognorm") if "lognorm_data" in parity else sp.csr_matrix(parity["lognorm"]),
        var=pd.DataFrame(index=parity["vocab_gene_names"].astype(str)),
    )
    lognorm.obs["total_counts"] = parity["aligned_total_counts"]
    with pytest.warns(UserWarning, match="sum of the given values"):
        quirk = models["cell"].get_latent_representation(lognorm, input_type="log1p")
    np.testing.assert_allclose(quirk, parity["out_cell_ce_all_t4_T"], **CELL)
    depth = models["cell"].get_latent_representation(
        lognorm, input_type="log1p", total_counts_key="total_counts"
    )
    np.testing.assert_allclose(depth, parity["out_cell_ce_all_t4_A"], **CELL)


@pytest.mark.slow
def test_bulk_mode_matches_official(parity, models):
    bulk = ad.AnnData(
        X=parity["bulk_input"].astype(np.float64),
        var=pd.DataFrame(index=parity["vocab_gene_names"].astype(str)),
    )
    out = models["cell"].get_latent_representation(bulk, input_type="bulk")
    np.testing.assert_allclose(out, parity["out_bulk_ce_all_F"], **CELL)


@pytest.mark.slow
def test_expression_and_gene_embeddings_match_official(parity, user_adata, models):
    model = models["gene"]
    expr = model.get_expression(
        user_adata, indices=parity["gexp_cells_idx"], target_depth="f1", batch_size=8
    )
    np.testing.assert_allclose(expr, parity["out_gene_expression_f1_F"], **GENE)

    cells = parity["gene_cells_idx"]
    symbols = parity["vocab_gene_names"].astype(str)[parity["gene_eval_gene_idx"]]
    per_cell = model.get_gene_embeddings(
        user_adata, indices=cells, genes=symbols, target_depth="f1", batch_size=4
    )
    np.testing.assert_allclose(per_cell, parity["out_gene_f1_F"], **GENE)
    batched = model.get_gene_embeddings(
        user_adata,
        indices=cells,
        genes=symbols,
        target_depth="f1",
        batch_size=4,
        key_stabilizer="batch",
    )
    np.testing.assert_allclose(batched, parity["out_gene_batch_f1_F"], **GENE)
    # "cell" results do not depend on the batch: one cell at a time gives the same numbers.
    alone = model.get_gene_embeddings(
        user_adata, indices=cells, genes=symbols, target_depth="f1", batch_size=1
    )
    np.testing.assert_allclose(alone, per_cell, atol=1e-5)


def test_cli_embeds_with_the_official_checkpoint(parity, user_adata, tmp_path):
    src = tmp_path / "in.h5ad"
    user_adata.write_h5ad(src)
    out = tmp_path / "out.h5ad"
    assert (
        main(["-q", "embed", str(src), "-o", str(out), "--model", str(FIXTURE / "models.ckpt")])
        == 0
    )
    np.testing.assert_allclose(
        ad.read_h5ad(out).obsm["X_scxtrimo"], parity["out_cell_ce_all_t4_F"], **CELL
    )


def test_loaded_checkpoint_round_trips_through_save(models, user_adata, tmp_path):
    models["rde"].save(tmp_path / "rde")
    again = XTrimoGene.load(tmp_path / "rde")
    assert again.default_target_depth_ == "t4"
    assert again.source_ == "scfoundation:rde"
    np.testing.assert_array_equal(
        again.get_latent_representation(user_adata),
        models["rde"].get_latent_representation(user_adata),
    )
