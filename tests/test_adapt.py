"""tl.adapt / XTrimoGene.adapt: checks before work, input untouched, seeding, resume, pairs."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import scxtrimo
from scxtrimo.model import XTrimoGene
from scxtrimo.train import AdaptationSpec, adapt_module, positive_pairs
from scxtrimo.train import _adapt as adapt_mod

DATA = Path(__file__).parent / "data"
FAST = {"max_steps": 4, "batch_size": 16, "progress_bar": False}
FAST_NOISE = 0.05  # not the default: the record must show what was asked for


@pytest.fixture(scope="module")
def kang():
    """192 real PBMCs from three donors (the batches)."""
    return ad.read_h5ad(DATA / "kang2018_pbmc_subset.h5ad")


def _weights(model: XTrimoGene) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapt_trains_a_cell_head_and_changes_nothing_passed_in(pbmc, tiny_model):
    before_data = pbmc.copy()
    before_model = _weights(tiny_model)
    adapted = scxtrimo.tl.adapt(pbmc, tiny_model, noise=FAST_NOISE, **FAST)
    assert adapted is not tiny_model
    assert _same(_weights(tiny_model), before_model)  # the model passed in is untouched
    assert tiny_model.module.cell_head is None
    assert (pbmc.X != before_data.X).nnz == 0
    assert list(pbmc.obs.columns) == list(before_data.obs.columns)
    assert set(pbmc.uns) == set(before_data.uns)
    assert set(pbmc.obsm) == set(before_data.obsm)
    after = _weights(adapted)
    assert all(torch.equal(after[k], before_model[k]) for k in before_model)  # encoder frozen
    assert {k for k in after if k not in before_model} == {
        k for k in after if k.startswith("cell_head.")
    }
    assert adapted.config.cell_head_dim == 64
    record = adapted.adaptation_
    assert record["settings"]["noise"] == FAST_NOISE
    assert record["n_cells"] == pbmc.n_obs
    assert record["result"]["steps"] == 4
    assert len(record["result"]["loss"]) == 4
    assert adapted.source_.endswith("+adapted")
    assert all(p.requires_grad for p in adapted.module.parameters())


@pytest.mark.slow
def test_adapting_layers_changes_only_the_top_layers(pbmc, tiny_model):
    before = _weights(tiny_model)
    after = _weights(scxtrimo.tl.adapt(pbmc, tiny_model, n_layers=1, **FAST))
    last = f"encoder.layers.{tiny_model.config.encoder_depth - 1}."
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert changed
    assert all(k.startswith((last, "encoder.final_norm.")) for k in changed)


@pytest.mark.slow
def test_lora_adaptation_changes_only_the_top_layers_through_merged_adapters(pbmc, tiny_model):
    pytest.importorskip("peft")
    from scxtrimo.train._lora import has_lora

    before = _weights(tiny_model)
    adapted = scxtrimo.tl.adapt(pbmc, tiny_model, n_layers=1, method="lora", lora_rank=2, **FAST)
    after = _weights(adapted)
    assert not has_lora(adapted.module)  # merged: a plain module, embedding at the base's cost
    assert set(before) <= set(after)
    assert not any(".lora_" in k or "base_layer" in k for k in after)
    last = f"encoder.layers.{tiny_model.config.encoder_depth - 1}."
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    # Adapters sit on the weight matrices of the last layer; norms and biases stay frozen.
    assert changed
    assert all(k.startswith(last) and k.endswith(".weight") for k in changed)
    assert not any("norm" in k for k in changed)
    assert adapted.adaptation_["settings"]["lora_rank"] == 2
    full = _weights(scxtrimo.tl.adapt(pbmc, tiny_model, n_layers=1, **FAST))
    assert {k for k in before if not torch.equal(full[k], before[k])} - changed  # full trains more


def test_lora_adaptation_needs_encoder_layers(pbmc, tiny_model):
    with pytest.raises(ValueError, match="n_layers >= 1"):
        scxtrimo.tl.adapt(pbmc, tiny_model, method="lora", **FAST)
    with pytest.raises(ValueError, match="'full' or 'lora'"):
        scxtrimo.tl.adapt(pbmc, tiny_model, n_layers=1, method="qlora", **FAST)


@pytest.mark.slow
def test_adapt_is_seeded(pbmc, tiny_model):
    a = _weights(scxtrimo.tl.adapt(pbmc, tiny_model, seed=3, **FAST))
    b = _weights(scxtrimo.tl.adapt(pbmc, tiny_model, seed=3, **FAST))
    c = _weights(scxtrimo.tl.adapt(pbmc, tiny_model, seed=4, **FAST))
    assert _same(a, b)
    assert not _same(a, c)


@pytest.mark.slow
def test_adapted_model_embeds_saves_and_loads(pbmc, tiny_model, tmp_path):
    adapted = scxtrimo.tl.adapt(pbmc, tiny_model, n_layers=2, **FAST)
    scxtrimo.tl.embed(pbmc, adapted, key_added="X_adapted", progress_bar=False)
    assert pbmc.obsm["X_adapted"].shape == (pbmc.n_obs, 64)
    assert np.isfinite(pbmc.obsm["X_adapted"]).all()
    adapted.save(tmp_path / "m")
    loaded = XTrimoGene.load(tmp_path / "m")
    assert loaded.adaptation_["settings"]["n_layers"] == 2
    scxtrimo.tl.embed(pbmc, loaded, key_added="X_loaded", progress_bar=False)
    np.testing.assert_allclose(pbmc.obsm["X_loaded"], pbmc.obsm["X_adapted"], atol=1e-5)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"n_cells": 40}, ValueError, "at least 50 cells"),
        ({"batch_key": "nope"}, KeyError, "batch_key='nope'"),
        ({"nan_batch": True}, ValueError, "missing values"),
        ({"n_layers": 9}, ValueError, "n_layers=9"),
        ({"token_keep": 0.0}, ValueError, "token_keep"),
        ({"n_neighbors": -1}, ValueError, "n_neighbors"),
    ],
)
def test_bad_arguments_fail_before_any_work(pbmc, tiny_model, monkeypatch, change, error, match):
    def never(*args, **kwargs):  # pragma: no cover - reaching it is the failure
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr("scxtrimo.model._adaptation.cache_frozen_layers", never)
    data = pbmc[: change.pop("n_cells", pbmc.n_obs)].copy()
    if change.pop("nan_batch", False):
        data.obs["donor"] = "a"
        data.obs.loc[data.obs_names[0], "donor"] = np.nan
        change["batch_key"] = "donor"
    with pytest.raises(error, match=match):
        scxtrimo.tl.adapt(data, tiny_model, **{**FAST, **change})


def test_non_count_input_and_foreign_genes_are_refused(pbmc, tiny_model):
    logged = pbmc.copy()
    logged.X = logged.X.astype(np.float32) * 0.37
    with pytest.raises(ValueError, match="count"):
        scxtrimo.tl.adapt(logged, tiny_model, **FAST)
    foreign = pbmc.copy()
    foreign.var_names = [f"notagene{i}" for i in range(foreign.n_vars)]
    with pytest.raises(ValueError, match="vocabulary"):
        scxtrimo.tl.adapt(foreign, tiny_model, **FAST)


@pytest.mark.slow
def test_interrupted_adaptation_resumes_to_the_same_weights(
    pbmc, tiny_model, tmp_path, monkeypatch
):
    spec = AdaptationSpec(n_layers=1, max_steps=6, batch_size=16, seed=1)

    def setup():
        model = tiny_model.copy()
        prep = model.prepare_input(pbmc, max_genes=64)
        cells = np.unique(prep.cells)
        cache = adapt_mod.cache_frozen_layers(
            model.module, prep, cells, 1, device=torch.device("cpu"), progress_bar=False
        )
        features = np.asarray(sp.csr_matrix(pbmc.X).todense(), dtype=np.float32)[:, :50]
        return model, cache, positive_pairs(features, n_neighbors=3)

    model, cache, pairs = setup()
    adapt_module(model.module, cache, pairs, spec, progress_bar=False)
    uninterrupted = _weights(model)

    model, cache, pairs = setup()
    calls = {"n": 0}
    original = adapt_mod.info_nce

    def stop_at_step_five(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(adapt_mod, "info_nce", stop_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        adapt_module(
            model.module,
            cache,
            pairs,
            spec,
            checkpoint_dir=tmp_path,
            checkpoint_every=2,
            progress_bar=False,
        )
    monkeypatch.setattr(adapt_mod, "info_nce", original)
    model, cache, pairs = setup()  # a new process would start from the original weights
    result = adapt_module(
        model.module,
        cache,
        pairs,
        spec,
        checkpoint_dir=tmp_path,
        checkpoint_every=2,
        progress_bar=False,
    )
    assert result.resumed_from == 4
    assert result.steps == 6
    assert len(result.loss) == 6
    assert _same(_weights(model), uninterrupted)

    other = AdaptationSpec(n_layers=1, max_steps=6, batch_size=16, seed=2)
    model, cache, pairs = setup()
    with pytest.raises(ValueError, match="different adaptation"):
        adapt_module(model.module, cache, pairs, other, checkpoint_dir=tmp_path, progress_bar=False)


def test_split_encoder_equals_the_whole_encoder(tiny_model, pbmc):
    module = tiny_model.module
    prep = tiny_model.prepare_input(pbmc[:8].copy(), max_genes=64)
    from scxtrimo.data import TokenIndex
    from scxtrimo.data._tokens import inference_batch

    tokens = inference_batch(
        sp.csr_matrix(pbmc[:8].X),
        np.arange(8),
        prep.mapping.col_to_vocab,
        prep.spec,
        TokenIndex(module.config.n_genes),
    )
    t = {k: torch.from_numpy(v) for k, v in tokens.items()}
    with torch.no_grad():
        whole = module.encode(t["gene_index"], t["value"], t["padding_mask"])
        x = module.token_embeddings(t["gene_index"], t["value"], t["padding_mask"])
        low = module.encoder.run_layers(x, t["padding_mask"], stop=1)
        split = module.encoder.run_layers(low, t["padding_mask"], start=1)
    valid = ~t["padding_mask"]
    torch.testing.assert_close(split[valid], whole[valid])
    with pytest.raises(ValueError, match="outside"):
        module.encoder.run_layers(x, t["padding_mask"], start=2, stop=1)


def test_positive_pairs_are_mutual_and_cross_batch():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 10)) * 5
    states = np.repeat(np.arange(3), 40)
    batches = np.tile(np.repeat(["a", "b"], 20), 3)
    shift = np.where(batches == "a", 0.0, 2.0)[:, None]  # a batch effect
    features = centres[states] + shift + rng.normal(size=(120, 10)) * 0.3
    pairs = positive_pairs(features, batches, n_neighbors=5, n_mutual=10)
    assert pairs.neighbours.shape == (120, 6)
    assert (pairs.neighbours[:, 0] == np.arange(120)).all()
    assert (batches[pairs.neighbours] == batches[:, None]).all()  # within-batch neighbours
    assert pairs.n_with_partners > 60
    for cell in range(120):
        partners = pairs.partners[pairs.partner_ptr[cell] : pairs.partner_ptr[cell + 1]]
        if partners.size == 0:
            continue
        assert (batches[partners] != batches[cell]).all()
        assert (states[partners] == states[cell]).mean() > 0.9  # the same state meets
        for other in partners:  # mutual: the pair is listed both ways
            back = pairs.partners[pairs.partner_ptr[other] : pairs.partner_ptr[other + 1]]
            assert cell in back
    anchors = np.arange(120)
    always = pairs.draw(anchors, 1.0, np.random.default_rng(0))
    has = np.diff(pairs.partner_ptr) > 0
    assert (batches[always[has]] != batches[has]).all()
    never = pairs.draw(anchors, 0.0, np.random.default_rng(0))
    assert (batches[never] == batches).all()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::scxtrimo.data.LowVocabularyCoverageWarning")
def test_cross_batch_positives_mix_donors(kang):
    """On real PBMCs of three donors, adapting with batch_key mixes donors more than without."""
    from scxtrimo.metrics import batch_mixing

    common = {"max_steps": 200, "progress_bar": False, "seed": 0}
    with_key = scxtrimo.tl.adapt(kang, batch_key="batch", cross_batch_share=1.0, **common)
    without = scxtrimo.tl.adapt(kang, cross_batch_share=0.0, **common)
    out = {}
    for name, model in (("with", with_key), ("without", without)):
        scxtrimo.tl.embed(kang, model, key_added=name, progress_bar=False)
        out[name] = batch_mixing(kang.obsm[name], kang.obs["batch"].to_numpy())
    assert out["with"] > out["without"]
