"""Mechanics of the default pretraining recipe on real cells: read-depth pairs, two views,
unmeasured genes, study-pure global batches split across ranks, corpus checks, determinism."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scxtrimo.data import MaskingSpec
from scxtrimo.data._tokens import TokenIndex
from scxtrimo.model import XTrimoGene
from scxtrimo.train import LengthBucketBatchSampler, info_nce
from scxtrimo.train import _datamodule as datamodule_mod
from scxtrimo.train._datamodule import PretrainingDataset
from scxtrimo.train._pretrain import DEFAULT_VIEW_MASKING, build_corpus

# The two_studies fixture's 400-gene panel study: the coverage warning is expected.
pytestmark = pytest.mark.filterwarnings("ignore::scxtrimo.data.LowVocabularyCoverageWarning")

N_GENES = 19264


@pytest.fixture
def two_studies(pbmc):
    """Real PBMCs as two studies: the full gene set, and a 400-gene panel of other cells."""
    full = pbmc[:60].copy()
    rng = np.random.default_rng(1)
    expressed = np.flatnonzero(np.asarray(pbmc.X[60:].sum(axis=0)).ravel() > 0)
    panel_genes = np.sort(rng.choice(expressed, 400, replace=False))
    panel = pbmc[60:, panel_genes].copy()
    return full, panel


@pytest.fixture
def model(two_studies):
    full, _ = two_studies
    XTrimoGene.setup_anndata(full)
    return XTrimoGene(full, config="tiny", seed=0)


def _dataset(model, studies, **kwargs):
    corpus = build_corpus(model.module, studies, max_genes=64)
    return corpus, PretrainingDataset(
        corpus, TokenIndex(N_GENES), MaskingSpec(downsample_prob=1.0), max_genes=64, **kwargs
    )


def test_depth_pairs_keep_s_below_t(model, two_studies):
    corpus, dataset = _dataset(model, list(two_studies))
    batch = dataset[(0, corpus.cells[:20])]
    t, s = batch["value"][:, 0], batch["value"][:, 1]
    assert torch.all(s <= t + 1e-6)
    assert torch.any(s < t - 0.1)  # down-sampled cells really are shallower
    # The targets are the full-depth cell's values, not the thinned input's.
    full = corpus.parts[0]
    totals = np.asarray(full.matrix[corpus.cells[:20]].sum(axis=1)).ravel()
    np.testing.assert_allclose(t.numpy(), np.log10(totals), rtol=1e-5)


def test_unmeasured_genes_carry_no_loss_and_are_not_zeros(model, two_studies):
    corpus, dataset = _dataset(model, list(two_studies))
    panel_cells = corpus.cells[corpus.part_of(corpus.cells) == 1][:16]
    batch = dataset[(0, panel_cells)]
    measured = corpus.measured[1]
    assert measured.sum() == 400 - (corpus.parts[1].col_to_vocab < 0).sum()
    used = ~batch["masked_pad"].numpy()
    genes = batch["masked_index"].numpy()[used]
    assert used.any()
    assert measured[genes].all()  # every scored slot is a gene the study measured
    # The decoder is told which genes are unknown: the batch carries the study's gene set.
    np.testing.assert_array_equal(batch["measured"].numpy()[:N_GENES], measured)
    # Unknown genes get the mask embedding, so predictions at them differ from "zero".
    module = model.module.eval()
    with torch.no_grad():
        h = module.encode(batch["gene_index"], batch["value"], batch["padding_mask"])
        unknown = torch.from_numpy(np.flatnonzero(~measured)[:5])
        args = (h, batch["gene_index"], batch["padding_mask"])
        as_zero = module.expression(*args, genes=unknown)
        as_unknown = module.expression(*args, genes=unknown, measured=batch["measured"])
    assert not torch.allclose(as_zero, as_unknown)


def test_masked_slots_only_at_measured_genes_change_the_loss(model, two_studies):
    """Changing a study's data at a gene it did not measure cannot change the loss."""
    corpus, dataset = _dataset(model, [two_studies[1]])
    batch = dataset[(0, corpus.cells[:8])]
    module = model.module.eval()
    with torch.no_grad():
        _, _, out = module(batch, loss_kwargs={"cell_mean": True})
        poisoned = dict(batch)
        target = batch["target_value"].clone()
        target[batch["masked_pad"]] = 1e6  # unused slots, incl. unmeasured genes
        poisoned["target_value"] = target
        _, _, out2 = module(poisoned, loss_kwargs={"cell_mean": True})
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out2.loss)


def test_views_differ_and_second_view_has_t_equal_s(model, two_studies):
    corpus, dataset = _dataset(model, list(two_studies), view_masking=DEFAULT_VIEW_MASKING)
    cells = corpus.cells[:12]
    batch = dataset[(0, cells)]
    v1 = (batch["gene_index"], batch["value"])
    v2 = (batch["view2_gene_index"], batch["view2_value"])
    assert v1[0].shape[0] == v2[0].shape[0] == 12
    torch.testing.assert_close(v2[1][:, 0], v2[1][:, 1])  # T = S in the contrastive view
    differs = [
        not torch.equal(v1[0][i], v2[0][i]) or not torch.equal(v1[1][i], v2[1][i])
        for i in range(12)
    ]
    assert all(differs)


def test_batches_are_deterministic_from_the_seed(model, two_studies):
    corpus, dataset = _dataset(model, list(two_studies), view_masking=DEFAULT_VIEW_MASKING)
    cells = corpus.cells[5:15]
    a, b = dataset[(3, cells)], dataset[(3, cells)]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    c = dataset[(4, cells)]
    assert not torch.equal(a["masked_index"], c["masked_index"])  # the epoch changes masks
    # A cell's draws do not depend on its batch.
    single = dataset[(3, cells[:1])]
    np.testing.assert_array_equal(
        np.sort(single["masked_index"][0][~single["masked_pad"][0]].numpy()),
        np.sort(a["masked_index"][0][~a["masked_pad"][0]].numpy()),
    )


def test_sampler_batches_never_mix_studies_and_split_evenly_across_ranks(monkeypatch):
    rng = np.random.default_rng(0)
    groups = np.repeat([0, 1, 2], [50, 37, 13])
    n_tokens = rng.integers(10, 500, size=100)
    sampler = LengthBucketBatchSampler(
        np.arange(100), n_tokens, 8, groups=groups, seed=3, drop_last=True
    )
    sampler.set_epoch(2)
    global_batches = sampler.global_batches()
    for batch in global_batches:
        assert len(np.unique(groups[batch])) == 1
        assert len(batch) == 8
    ranks = []
    for rank in range(2):
        monkeypatch.setattr(datamodule_mod, "distributed_rank_and_world", lambda r=rank: (r, 2))
        ranks.append([b for _, b in sampler])
        assert len(sampler) == len(global_batches)
    assert len(ranks[0]) == len(ranks[1])  # equal step counts
    seen = [np.concatenate(r) for r in ranks]
    assert np.intersect1d(seen[0], seen[1]).size == 0  # disjoint cells
    for b0, b1, g in zip(ranks[0], ranks[1], global_batches):
        np.testing.assert_array_equal(np.sort(np.concatenate([b0, b1])), np.sort(g))


def test_info_nce_prefers_matching_views():
    torch.manual_seed(0)
    z = torch.randn(16, 32)
    matched = info_nce(z, z + 0.01 * torch.randn(16, 32))
    shuffled = info_nce(z, z[torch.randperm(16)])
    assert matched < shuffled
    assert matched < np.log(16)
    with pytest.raises(ValueError, match="differ in shape"):
        info_nce(z, z[:4])


@pytest.mark.slow
def test_multi_study_training_runs_and_records_the_corpus(model, two_studies, tmp_path):
    full, panel = two_studies
    before = [full.copy(), panel.copy()]
    model.train(
        corpus=[full, panel],
        max_steps=4,
        batch_size=8,
        max_genes=64,
        seed=1,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    args = model.training_args_
    assert [p["n_cells"] for p in args["corpus"]] == [60, 60]
    assert args["contrastive_weight"] > 0
    assert np.isfinite(model.history_["contrastive_loss_train"].to_numpy()).all()
    for a, b in zip(before, [full, panel]):  # nothing the user passed changed
        assert (a.X != b.X).nnz == 0
        assert a.var_names.equals(b.var_names)
        assert a.obs.equals(b.obs)


@pytest.mark.slow
@pytest.mark.parametrize(
    "objective",
    [{}, {"positives": "neighbours", "cell_head_dim": 8}],
    ids=["views", "neighbour pairs and a cell head"],
)
def test_training_is_reproducible_from_the_seed(two_studies, tmp_path, objective):
    full, panel = two_studies
    weights = []
    for _ in range(2):
        XTrimoGene.setup_anndata(full)
        m = XTrimoGene(full, config="tiny", seed=0)
        torch.manual_seed(123 + len(weights))  # the global RNG state must not matter
        m.train(
            corpus=[full, panel],
            max_steps=3,
            batch_size=8,
            max_genes=64,
            **objective,
            seed=5,
            accelerator="cpu",
            devices=1,
            enable_checkpointing=False,
            logger=False,
            default_root_dir=str(tmp_path),
        )
        weights.append({k: v.clone() for k, v in m.module.state_dict().items()})
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make_bad", "message"),
    [
        (lambda a: a[:0].copy(), "is empty"),
        (lambda a: _with_var_names(a, [f"NOTAGENE{i}" for i in range(a.n_vars)]), "vocabulary"),
        (lambda a: _with_values(a, 0.5), "integer"),
    ],
)
def test_bad_corpus_entries_fail_before_training_naming_the_entry(
    model, two_studies, make_bad, message, tmp_path
):
    full, panel = two_studies
    bad = make_bad(panel)
    path = tmp_path / "bad_study.h5ad"
    bad.write_h5ad(path)
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.raises(ValueError, match=message) as err:
        model.train(corpus=[full, str(path)], max_steps=2, batch_size=8, max_genes=64)
    assert "bad_study.h5ad" in str(err.value)
    for key, value in model.module.state_dict().items():  # no training step happened
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_missing_corpus_file_is_named(model, two_studies, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.h5ad"):
        model.train(corpus=[two_studies[0], str(tmp_path / "nowhere.h5ad")], max_steps=1)


def _with_var_names(adata: ad.AnnData, names: list[str]) -> ad.AnnData:
    out = adata.copy()
    out.var_names = names
    return out


def _with_values(adata: ad.AnnData, offset: float) -> ad.AnnData:
    out = adata.copy()
    X = sp.csr_matrix(out.X, dtype=np.float32)
    X.data = X.data + offset
    out.X = X
    return out


def test_corpus_with_finetune_is_refused(model, two_studies):
    with pytest.raises(ValueError, match="corpus= is for pretraining"):
        model.train(corpus=list(two_studies), finetune="head", max_epochs=1)
