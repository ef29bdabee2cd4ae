"""No cell stops a run: invalid_cells="skip" in every embedding tool, impossible values refused."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import scxtrimo


@pytest.fixture
def with_empty(pbmc):
    """40 real PBMCs; cells 3 and 17 have no in-vocabulary counts, cell 25 has one count."""
    cells = pbmc[:40].copy()
    X = cells.X.tolil()
    X[3, :] = 0
    X[17, :] = 0
    X[25, :] = 0
    X[25, 0] = 1
    cells.X = X.tocsr()
    return cells


BAD = [3, 17, 25]


@pytest.fixture
def scxtrimo_log(caplog):
    logger = logging.getLogger("scxtrimo")
    logger.addHandler(caplog.handler)  # the package logger may not propagate
    yield caplog
    logger.removeHandler(caplog.handler)


def test_embed_skip_records_which_cells_and_warns_with_names(
    with_empty, tiny_model, scxtrimo_log, tmp_path
):
    names = list(with_empty.obs_names[BAD])
    with pytest.raises(ValueError, match="3 cells have fewer than 2 counts"):
        scxtrimo.tl.embed(with_empty, tiny_model)
    scxtrimo.tl.embed(with_empty, tiny_model, invalid_cells="skip")
    emb = with_empty.obsm["X_scxtrimo"]
    assert np.isnan(emb[BAD]).all()
    assert np.isfinite(np.delete(emb, BAD, axis=0)).all()
    info = with_empty.uns["scxtrimo"]["X_scxtrimo"]
    assert info["n_skipped_cells"] == 3
    assert list(info["skipped_cells"]) == names
    message = " ".join(r.getMessage() for r in scxtrimo_log.records)
    assert "Skipping 3 cells" in message
    assert all(repr(n) in message for n in names)
    # The record survives a round trip through h5ad.
    with_empty.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert list(back.uns["scxtrimo"]["X_scxtrimo"]["skipped_cells"]) == names


def test_nothing_skipped_is_recorded_as_empty(pbmc, tiny_model, tmp_path):
    cells = pbmc[:10].copy()
    scxtrimo.tl.embed(cells, tiny_model)
    info = cells.uns["scxtrimo"]["X_scxtrimo"]
    assert info["n_skipped_cells"] == 0
    assert len(info["skipped_cells"]) == 0
    cells.write_h5ad(tmp_path / "b.h5ad")


def test_transfer_and_annotate_skip(with_empty, pbmc_full, tiny_model):
    reference = pbmc_full[-60:].copy()
    scxtrimo.tl.transfer_labels(
        with_empty, reference, labels_key="cell_type", model=tiny_model, invalid_cells="skip"
    )
    info = with_empty.uns["scxtrimo"]["cell_type_transferred"]
    assert list(info["skipped_cells"]) == list(with_empty.obs_names[BAD])
    assert with_empty.obs["cell_type_transferred"].isna().to_numpy()[BAD].all()
    query = with_empty.copy()
    scxtrimo.tl.annotate(
        query, reference, labels_key="cell_type", model=tiny_model, invalid_cells="skip"
    )
    assert query.uns["scxtrimo"]["scxtrimo_label"]["n_skipped_cells"] == 3


def test_embed_to_store_skip_warns_with_names(with_empty, tiny_model, scxtrimo_log, tmp_path):
    out = scxtrimo.tl.embed_to_store(
        with_empty, tmp_path / "s.zarr", tiny_model, invalid_cells="skip", chunk_size=16
    )
    stored = ad.read_zarr(out)
    assert np.isnan(stored.obsm["X_scxtrimo"][BAD]).all()
    assert stored.uns["scxtrimo"]["X_scxtrimo"]["n_skipped_cells"] == 3
    message = " ".join(r.getMessage() for r in scxtrimo_log.records)
    assert repr(with_empty.obs_names[17]) in message


def test_boolean_matrix_is_refused_before_any_work(pbmc, tiny_model):
    cells = pbmc[:8].copy()
    cells.X = (cells.X > 0).astype(bool)
    with pytest.raises(ValueError, match="boolean"):
        scxtrimo.tl.embed(cells, tiny_model)
    with pytest.raises(ValueError, match="boolean"):
        scxtrimo.tl.embed(cells, tiny_model, invalid_cells="skip")  # not a per-cell problem
    assert "X_scxtrimo" not in cells.obsm


def test_impossibly_large_counts_are_refused(pbmc, tiny_model):
    cells = pbmc[:8].copy()
    X = sp.csr_matrix(cells.X, dtype=np.float64)
    X.data[5] = 3e9
    cells.X = X
    with pytest.raises(ValueError, match=rf"above 1e\+09.*{cells.obs_names[0]}"):
        scxtrimo.tl.embed(cells, tiny_model)
    X.data[5] = 1e9  # the limit itself is accepted
    cells.X = X
    scxtrimo.tl.embed(cells, tiny_model)
    assert np.isfinite(cells.obsm["X_scxtrimo"]).all()


@pytest.mark.parametrize(
    ("value", "match"), [(-1.0, "negative values"), (np.inf, "NaN or infinite")]
)
def test_negative_and_infinite_values_are_refused_under_skip_too(pbmc, tiny_model, value, match):
    cells = pbmc[:8].copy()
    X = sp.csr_matrix(cells.X, dtype=np.float32)
    X.data[2] = value
    cells.X = X
    with pytest.raises(ValueError, match=match):
        scxtrimo.tl.embed(cells, tiny_model, invalid_cells="skip")


def test_adapt_and_gene_modules_skip_by_default_and_raise_when_asked(pbmc, tiny_model):
    """The training and gene tools leave invalid cells out unless asked to refuse them."""
    cells = pbmc.copy()  # 120 cells: adapt needs 50 usable ones
    X = cells.X.tolil()
    X[5, :] = 0
    cells.X = X.tocsr()
    with pytest.raises(ValueError, match="fewer than 2 counts"):
        scxtrimo.tl.adapt(cells, tiny_model, invalid_cells="raise", max_steps=1)
    adapted = scxtrimo.tl.adapt(cells, tiny_model, max_steps=1, progress_bar=False)
    assert adapted.adaptation_["n_cells"] == cells.n_obs - 1
    genes = list(cells.var_names[np.argsort(-np.asarray(cells.X.sum(0)).ravel())[:12]])
    with pytest.raises(ValueError, match="fewer than 2 counts"):
        scxtrimo.tl.gene_modules(cells, tiny_model, genes=genes, invalid_cells="raise")
    scxtrimo.tl.gene_modules(cells, tiny_model, genes=genes, max_cells=20, progress_bar=False)
    assert cells.var["scxtrimo_module"].notna().sum() == 12
