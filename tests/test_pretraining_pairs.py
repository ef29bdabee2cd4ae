"""Pretraining with neighbour pairs: the neighbour table, paired batches, the joint cell head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scxtrimo.model import XTrimoGene
from scxtrimo.train import LengthBucketBatchSampler, PretrainingObjective, corpus_neighbours
from scxtrimo.train import _datamodule as datamodule_mod
from scxtrimo.train._pretrain import build_corpus

pytestmark = pytest.mark.filterwarnings("ignore::scxtrimo.data.LowVocabularyCoverageWarning")


@pytest.fixture
def two_studies(pbmc_full):
    """Real PBMCs as two studies of 80 and 60 cells, with the same genes."""
    return pbmc_full[:80].copy(), pbmc_full[80:140].copy()


def _train_on_pairs(model, studies, tmp_path, **options) -> None:
    """A few CPU steps of neighbour-pair pretraining of a tiny model on ``studies``."""
    model.train(
        corpus=list(studies),
        batch_size=8,
        max_genes=64,
        positives="neighbours",
        n_neighbors=5,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        **options,
    )


def test_neighbours_stay_in_their_study_and_skip_held_out_cells(two_studies):
    XTrimoGene.setup_anndata(two_studies[0])
    model = XTrimoGene(two_studies[0], config="tiny", seed=0)
    corpus = build_corpus(model.module, list(two_studies), max_genes=64)
    train = np.setdiff1d(np.arange(corpus.n_cells), [3, 90])  # two held-out cells
    table = corpus_neighbours(corpus, train, n_neighbors=5)
    assert table.shape == (140, 5)
    assert (table[[3, 90]] == -1).all()  # held-out cells have no row...
    assert not np.isin(table, [3, 90]).any()  # ...and are nobody's neighbour
    rows = table[train]
    assert (rows >= 0).all()
    assert (rows != train[:, None]).all()  # a cell is not its own partner
    np.testing.assert_array_equal(corpus.part_of(rows), corpus.part_of(train)[:, None] + 0 * rows)


def test_neighbours_are_near_in_expression(pbmc_full):
    """The partners of a cell share its annotated type far more often than chance."""
    adata = pbmc_full[:300].copy()
    XTrimoGene.setup_anndata(adata)
    model = XTrimoGene(adata, config="tiny", seed=0)
    corpus = build_corpus(model.module, [adata], max_genes=64)
    table = corpus_neighbours(corpus, np.arange(300), n_neighbors=10)
    labels = adata.obs["cell_type"].to_numpy()
    same = (labels[table] == labels[:, None]).mean()
    chance = (adata.obs["cell_type"].value_counts(normalize=True) ** 2).sum()
    # 300 cells: 0.73 of partners share the type (CD4/CD8 T cells are the usual confusion),
    # against 0.2 by chance.
    assert same > 0.65
    assert same > chance + 0.3


def test_paired_batches_are_anchors_then_their_partners(monkeypatch):
    rng = np.random.default_rng(0)
    n = 60
    groups = np.repeat([0, 1], [40, 20])
    partners = np.stack([(np.arange(n) + 1) % n, (np.arange(n) + 2) % n], axis=1)
    partners[39] = [38, 37]  # keep every partner inside its study
    partners[59] = [58, 57]
    partners[38] = [37, 36]
    partners[58] = [57, 56]
    sampler = LengthBucketBatchSampler(
        np.arange(n), rng.integers(5, 50, n), 8, groups=groups, partners=partners, seed=1
    )
    batches = sampler.global_batches()
    anchors = np.concatenate([b[: len(b) // 2] for b in batches])
    np.testing.assert_array_equal(np.sort(anchors), np.arange(n))  # each cell anchors once
    for batch in batches:
        a, p = batch[: len(batch) // 2], batch[len(batch) // 2 :]
        assert len(a) == len(p) <= 4
        assert all(q in partners[c] for c, q in zip(a, p))
        assert len(np.unique(groups[batch])) == 1  # still study-pure
    for rank in range(2):  # under two ranks, each rank's halves stay aligned
        monkeypatch.setattr(datamodule_mod, "distributed_rank_and_world", lambda r=rank: (r, 2))
        for (_, local), full in zip(sampler, [b for b in batches if len(b) // 2 >= 2]):
            a, p = local[: len(local) // 2], local[len(local) // 2 :]
            half = len(full) // 2
            np.testing.assert_array_equal(a, full[:half][rank::2])
            np.testing.assert_array_equal(p, full[half:][rank::2])
    with pytest.raises(ValueError, match="batch_size >= 4"):
        LengthBucketBatchSampler(np.arange(n), np.ones(n), 2, partners=partners)


def test_objective_refuses_unknown_positives_and_a_head_without_pairs():
    with pytest.raises(ValueError, match="'views' or 'neighbours'"):
        PretrainingObjective(positives="labels")
    with pytest.raises(ValueError, match="cell_head_dim needs"):
        PretrainingObjective(cell_head_dim=16)
    with pytest.raises(ValueError, match="regression_every > 1 interleaves"):
        PretrainingObjective(regression_every=2)  # views: every step needs the decoder
    with pytest.raises(ValueError, match="regression_every must be >= 1"):
        PretrainingObjective(positives="neighbours", regression_every=0)


@pytest.mark.slow
def test_regression_every_skips_the_decoder_between_regression_steps(two_studies, tmp_path):
    full, other = two_studies
    XTrimoGene.setup_anndata(full)
    model = XTrimoGene(full, config="tiny", seed=0)
    module = model.module
    calls = []
    decode = module.masked_expression

    def counted(*args, **kwargs):
        calls.append(module.training)
        return decode(*args, **kwargs)

    module.masked_expression = counted
    decoder_before = {k: v.clone() for k, v in module.decoder.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    _train_on_pairs(
        model, (full, other), tmp_path, max_steps=5, regression_every=2, seed=0, limit_val_batches=0
    )
    assert calls == [True, True, True]  # steps 0, 2 and 4 decode; 1 and 3 do not
    assert model.training_args_["regression_every"] == 2
    assert np.isfinite(model.history_["contrastive_loss_train"].to_numpy()).all()
    changed = [
        k
        for k, v in module.decoder.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, decoder_before[k])
    ]
    assert changed  # trained on the regression steps
    assert any(
        not torch.equal(v, encoder_before[k]) for k, v in module.encoder.state_dict().items()
    )


@pytest.mark.slow
def test_pretraining_with_pairs_trains_a_cell_head_that_is_saved(two_studies, tmp_path):
    full, other = two_studies
    before = full.copy()
    XTrimoGene.setup_anndata(full)
    model = XTrimoGene(full, config="tiny", seed=0)
    _train_on_pairs(model, (full, other), tmp_path, max_steps=4, cell_head_dim=16, seed=2)
    assert model.training_args_["positives"] == "neighbours"
    assert np.isfinite(model.history_["contrastive_loss_train"].to_numpy()).all()
    head = model.module.cell_head
    assert head is not None
    assert not torch.equal(head.scale, torch.ones_like(head.scale))  # standardised
    z = model.get_latent_representation(full)
    assert z.shape == (full.n_obs, 16)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    model.save(tmp_path / "m")
    again = XTrimoGene.load(tmp_path / "m")
    np.testing.assert_allclose(again.get_latent_representation(full), z, atol=1e-6)
    assert (before.X != full.X).nnz == 0
