"""Pretraining from row sources (TileDB-SOMA written offline from real cells, .zarr, shards).

A study read from a source is streamed in row chunks (statistics, gene bias, batches) and must
train exactly as the same cells in memory; checkpoints taken mid-epoch resume at the next batch.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from scxtrimo.data import ConcatSource, H5adSource, MaskingSpec, SomaSource
from scxtrimo.data._tokens import TokenIndex
from scxtrimo.model import XTrimoGene
from scxtrimo.train import PretrainingDataset, build_corpus, part_from_source
from scxtrimo.train._pretrain import corpus_gene_bias
from scxtrimo.train._source_corpus import SourceRows

tiledbsoma = pytest.importorskip("tiledbsoma")
pytest.importorskip("tiledbsoma.io")

TRAIN = {
    "batch_size": 8,
    "max_genes": 64,
    "seed": 5,
    "drop_last": True,
    "accelerator": "cpu",
    "logger": False,
    "enable_progress_bar": False,
}


def _model(adata):
    adata = adata.copy()
    XTrimoGene.setup_anndata(adata)
    return XTrimoGene(adata, config="tiny", seed=0)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _batch(corpus, cells, epoch=1):
    dataset = PretrainingDataset(
        corpus, TokenIndex(corpus.n_genes), MaskingSpec(), seed=3, max_genes=64
    )
    return dataset[(epoch, np.asarray(cells))]


def test_soma_part_equals_the_h5ad_part(soma, pbmc):
    uri, path = soma
    model = _model(pbmc)
    reference = build_corpus(model.module, [pbmc], max_genes=64)
    ref = reference.parts[0]
    cells = np.array([17, 3, 90, 41, 64, 8, 111, 0])  # unsorted, as a batch is
    expected = _batch(reference, cells)
    for entry in (uri, SomaSource(uri), str(path), H5adSource(path)):
        corpus = build_corpus(model.module, [entry], max_genes=64)
        part = corpus.parts[0]
        np.testing.assert_array_equal(part.cells, ref.cells)
        np.testing.assert_array_equal(part.n_tokens, ref.n_tokens)
        np.testing.assert_array_equal(part.col_to_vocab, ref.col_to_vocab)
        got = _batch(corpus, cells)
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
        np.testing.assert_array_equal(
            corpus_gene_bias(corpus, ref.cells, MaskingSpec()),
            corpus_gene_bias(reference, ref.cells, MaskingSpec()),
        )
    part = build_corpus(model.module, [uri], max_genes=64).parts[0]
    assert isinstance(part.matrix, SourceRows)
    # Picklable (ddp_spawn, DataLoader workers): the copy reopens the experiment.
    clone = pickle.loads(pickle.dumps(part.matrix))
    rows = np.array([2, 5, 77])
    np.testing.assert_array_equal(clone[rows].toarray(), pbmc.X[rows].toarray())
    np.testing.assert_array_equal(clone[10:20].toarray(), pbmc.X[10:20].toarray())


# A 6,000-gene shard: the coverage warning is expected.
@pytest.mark.filterwarnings("ignore::scxtrimo.data.LowVocabularyCoverageWarning")
def test_zarr_shards_and_concat_sources(pbmc, tmp_path):
    model = _model(pbmc)
    ref = build_corpus(model.module, [pbmc], max_genes=64).parts[0]
    pbmc.write_zarr(tmp_path / "all.zarr")
    part = build_corpus(model.module, [str(tmp_path / "all.zarr")], max_genes=64).parts[0]
    np.testing.assert_array_equal(part.n_tokens, ref.n_tokens)
    # Shards with the same genes are one study, read across the shard boundary...
    pbmc[:50].write_h5ad(tmp_path / "a.h5ad")
    pbmc[50:].write_h5ad(tmp_path / "b.h5ad")
    shards = [str(tmp_path / "a.h5ad"), str(tmp_path / "b.h5ad")]
    corpus = build_corpus(model.module, [shards], max_genes=64)
    assert len(corpus.parts) == 1
    np.testing.assert_array_equal(corpus.parts[0].n_tokens, ref.n_tokens)
    rows = np.array([3, 49, 50, 100])
    np.testing.assert_array_equal(corpus.parts[0].matrix[rows].toarray(), pbmc.X[rows].toarray())
    # ...shards with different genes are a study each.
    pbmc[50:, :6000].write_h5ad(tmp_path / "c.h5ad")
    mixed = ConcatSource([H5adSource(tmp_path / "a.h5ad"), H5adSource(tmp_path / "c.h5ad")])
    corpus = build_corpus(model.module, [mixed], max_genes=64)
    assert [p.matrix.shape for p in corpus.parts] == [(50, pbmc.n_vars), (70, 6000)]
    assert corpus.measured[1].sum() == 6000
    with pytest.raises(ValueError, match="different genes"):
        part_from_source(model.module, mixed, "mixed", max_genes=64)


def test_training_on_a_filtered_soma_source_and_an_anndata(soma, pbmc, pbmc_full):
    uri, _ = soma
    other = pbmc_full[~pbmc_full.obs_names.isin(pbmc.obs_names)][:40].copy()
    source = SomaSource(uri, obs_value_filter="cell_type in ['B', 'NK']")
    keep = pbmc.obs["cell_type"].isin(["B", "NK"]).to_numpy()
    assert source.shape[0] == keep.sum() >= 16
    model = _model(other)
    before = _weights(model)
    corpus = build_corpus(model.module, [source, other], max_genes=64)
    part = corpus.parts[0]
    assert part.matrix.shape[0] == keep.sum()  # only the filtered cells are rows
    np.testing.assert_array_equal(part.matrix[np.arange(5)].toarray(), pbmc.X[keep][:5].toarray())
    model.train(corpus=[source, other], max_steps=3, devices=1, enable_checkpointing=False, **TRAIN)
    assert _max_diff(before, _weights(model)) > 1e-4
    summary = model.training_args_["corpus"]
    assert summary[0]["name"].endswith("pbmc.soma)")
    assert [s["n_cells"] for s in summary] == [int(keep.sum()), other.n_obs]
    assert model.trainer.global_step == 3


@pytest.mark.slow
def test_soma_training_gives_the_same_weights_as_anndata(soma, pbmc):
    uri, _ = soma
    runs = {}
    for name, entry in (("anndata", pbmc), ("soma", uri)):
        model = _model(pbmc)
        start = _weights(model)
        model.train(corpus=[entry], max_steps=3, devices=1, enable_checkpointing=False, **TRAIN)
        runs[name] = _weights(model)
    assert _max_diff(start, runs["anndata"]) > 1e-4  # training moved the weights
    assert _max_diff(runs["soma"], runs["anndata"]) <= 1e-6


@pytest.mark.slow
def test_dataloader_workers_read_soma_and_zarr(soma, pbmc, tmp_path):
    # Forked workers would hang in TileDB; SOMA studies get spawned workers (zarr: forked).
    uri, _ = soma
    pbmc.write_zarr(tmp_path / "p.zarr")
    runs = {}
    zarr = str(tmp_path / "p.zarr")
    for name, entry, workers in (("main", uri, 0), ("soma", uri, 1), ("zarr", zarr, 1)):
        model = _model(pbmc)
        model.train(
            corpus=[entry],
            max_steps=2,
            devices=1,
            num_workers=workers,
            enable_checkpointing=False,
            **TRAIN,
        )
        runs[name] = _weights(model)
    assert _max_diff(runs["soma"], runs["main"]) <= 1e-6
    assert _max_diff(runs["zarr"], runs["main"]) <= 1e-6


def test_bad_entries_raise_before_training(soma, pbmc, tmp_path):
    uri, _ = soma
    model = _model(pbmc)
    before = _weights(model)
    missing = str(tmp_path / "missing.soma")
    with pytest.raises(FileNotFoundError, match=r"missing\.soma does not exist"):
        model.train(corpus=[pbmc, missing], max_steps=1, **TRAIN)
    with pytest.raises(FileNotFoundError, match="No TileDB-SOMA Experiment"):
        SomaSource(missing)
    with pytest.raises(ValueError, match=r"matches no cell of .*pbmc\.soma"):
        SomaSource(uri, obs_value_filter="cell_type == 'no such type'")
    (tmp_path / "neither").mkdir()
    with pytest.raises(ValueError, match=r"neither.*Cannot tell what"):
        model.train(corpus=[str(tmp_path / "neither")], max_steps=1, **TRAIN)
    # A study whose genes are not in the vocabulary.
    alien = pbmc.copy()
    alien.var_names = [f"NOT_A_GENE_{i}" for i in range(alien.n_vars)]
    alien.write_h5ad(tmp_path / "alien.h5ad")
    alien_uri = str(tmp_path / "alien.soma")
    tiledbsoma.io.from_h5ad(alien_uri, str(tmp_path / "alien.h5ad"), measurement_name="RNA")
    with pytest.raises(ValueError, match=r"entry .*alien\.soma.*match the"):
        model.train(corpus=[pbmc, alien_uri], max_steps=1, **TRAIN)
    # Non-count values, found by the streamed pass.
    scaled = pbmc.copy()
    scaled.X = scaled.X * 0.5
    scaled.write_zarr(tmp_path / "scaled.zarr")
    with pytest.raises(ValueError, match=r"scaled\.zarr.*not integers"):
        model.train(corpus=[str(tmp_path / "scaled.zarr")], max_steps=1, **TRAIN)
    assert not model.is_trained_
    assert _max_diff(before, _weights(model)) == 0


@pytest.mark.slow
def test_mid_epoch_checkpoint_resumes_at_the_next_batch(soma, pbmc, tmp_path, monkeypatch):
    import scvi

    # scvi-tools adds its own checkpoint callback, writing below its logging_dir.
    monkeypatch.setattr(scvi.settings, "logging_dir", tmp_path / "scvi_log")
    uri, _ = soma
    run = {**TRAIN, "train_size": 1.0, "max_steps": 4, "devices": 1, "corpus": [uri]}
    # 120 cells, 8 per batch: 15 batches per epoch, so step 2 is mid-epoch.
    uninterrupted = _model(pbmc)
    uninterrupted.train(enable_checkpointing=False, **run)
    expected = _weights(uninterrupted)

    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=2, save_top_k=-1
    )
    checkpointed = _model(pbmc)
    checkpointed.train(enable_checkpointing=True, callbacks=[ckpt], **run)
    assert (tmp_path / "ckpt" / "step=2.ckpt").exists()
    assert _max_diff(_weights(checkpointed), expected) <= 1e-6

    resumed = _model(pbmc)
    resumed.train(
        enable_checkpointing=False, ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"), **run
    )
    assert resumed.trainer.global_step == 4
    assert _max_diff(_weights(resumed), expected) <= 1e-6


@pytest.mark.slow
def test_two_processes_on_a_soma_corpus_take_the_same_steps_as_one(soma, pbmc, tmp_path):
    uri, _ = soma
    runs = {}
    for name, trainer in (
        ("one", {"devices": 1}),
        ("two", {"devices": 2, "strategy": "ddp_spawn"}),
    ):
        model = _model(pbmc)
        start = _weights(model)
        model.train(
            corpus=[uri],
            max_steps=3,
            enable_checkpointing=False,
            default_root_dir=str(tmp_path / name),
            **TRAIN,
            **trainer,
        )
        runs[name] = _weights(model)
    assert _max_diff(start, runs["one"]) > 1e-4
    assert _max_diff(runs["two"], runs["one"]) <= 5e-5
