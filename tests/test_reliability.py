"""Interrupted training, out-of-memory retries, and hypothesis fuzzing of the whole path."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import scxtrimo
from scxtrimo.data import load_vocabulary
from scxtrimo.model import XTrimoGene

TRAIN = {"batch_size": 8, "max_genes": 128, "enable_progress_bar": False}


class _Crash(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


def _fresh(pbmc):
    data = pbmc[:24].copy()
    XTrimoGene.setup_anndata(data)
    return XTrimoGene(data, config="tiny", seed=0)


@pytest.mark.slow
def test_training_resumes_from_checkpoint_to_the_same_state(pbmc, tmp_path, monkeypatch):
    import scvi

    # scvi-tools' own checkpoint callback writes below its logging_dir (./scvi_log by default).
    monkeypatch.setattr(scvi.settings, "logging_dir", tmp_path / "scvi_log")
    uninterrupted = _fresh(pbmc)
    uninterrupted.train(max_epochs=2, enable_checkpointing=False, **TRAIN)

    crashed = _fresh(pbmc)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train(max_epochs=2, callbacks=[ckpt, _Crash()], enable_checkpointing=True, **TRAIN)
    assert (tmp_path / "last.ckpt").exists()

    resumed = _fresh(pbmc)
    resumed.train(
        max_epochs=2, ckpt_path=str(tmp_path / "last.ckpt"), enable_checkpointing=False, **TRAIN
    )
    a, b = uninterrupted.module.state_dict(), resumed.module.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_out_of_memory_batches_are_retried_in_halves(pbmc, tiny_model, monkeypatch):
    expected = tiny_model.get_latent_representation(pbmc[:20].copy())
    real_encode = tiny_model.module.encode
    sizes = []

    def picky_encode(gene_index, value, padding_mask):
        sizes.append(gene_index.shape[0])
        if gene_index.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_encode(gene_index, value, padding_mask)

    monkeypatch.setattr(tiny_model.module, "encode", picky_encode)
    out = tiny_model.get_latent_representation(pbmc[:20].copy(), batch_size=16)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert max(sizes) > 3  # a batch too large was tried, then split down to <= 3 cells
    assert sizes[-1] <= 3


def test_other_runtime_errors_are_not_swallowed(pbmc, tiny_model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(tiny_model.module, "encode", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        tiny_model.get_latent_representation(pbmc[:4].copy())


VOCAB = load_vocabulary().symbols


@st.composite
def random_anndata(draw):
    n_obs = draw(st.integers(1, 12))
    n_genes = draw(st.integers(3, 40))
    genes = draw(
        st.lists(
            st.sampled_from(list(VOCAB[:500])), min_size=n_genes, max_size=n_genes, unique=True
        )
    )
    density = draw(st.floats(0.05, 0.9))
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from([np.int32, np.int64, np.float32, np.float64]))
    layout = draw(st.sampled_from(["csr", "csc", "dense"]))
    rng = np.random.default_rng(seed)
    X = (rng.random((n_obs, n_genes)) < density) * rng.poisson(3.0, (n_obs, n_genes))
    X[:, 0] = np.maximum(X[:, 0], 2)  # every cell embeddable: >= 2 in-vocabulary counts
    X = X.astype(dtype)
    matrix = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[layout](X)
    return ad.AnnData(X=matrix, var=pd.DataFrame(index=genes)), X


# Fuzzed data of 3 to 40 genes: the coverage warning is expected.
@pytest.mark.filterwarnings("ignore::scxtrimo.data.LowVocabularyCoverageWarning")
@pytest.mark.slow
@given(random_anndata())
def test_embed_fuzz_matches_dense_reference_layout(tiny_model, case):
    adata, dense = case
    scxtrimo.tl.embed(adata, tiny_model, max_tokens=64)
    emb = adata.obsm["X_scxtrimo"]
    assert emb.shape == (adata.n_obs, 4 * tiny_model.config.encoder_dim)
    assert np.isfinite(emb).all()
    # the same cells as CSR, one at a time, give the same rows (batch independence)
    single = ad.AnnData(X=sp.csr_matrix(dense[:1]), var=adata.var.copy())
    np.testing.assert_allclose(tiny_model.get_latent_representation(single), emb[:1], atol=1e-5)
