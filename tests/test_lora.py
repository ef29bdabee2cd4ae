"""LoRA fine-tuning through peft: what trains, merging, saving beside the base, clear errors."""

import builtins
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from scxtrimo.model import XTrimoGene
from scxtrimo.train._lora import (
    LoraSpec,
    base_fingerprint,
    has_lora,
    inject_lora,
    lora_state,
    merge_lora,
    require_peft,
)

pytest.importorskip("peft")

# The Kang subsets cover 1,205 of the 19,264 vocabulary genes: the coverage warning is expected.
pytestmark = pytest.mark.filterwarnings("ignore::scxtrimo.data.LowVocabularyCoverageWarning")

KANG = Path(__file__).parent / "data" / "kang2018_pbmc_subset.h5ad"
FAST = {
    "batch_size": 16,
    "max_genes": 128,
    "enable_progress_bar": False,
    "enable_checkpointing": False,
}


class RecordGrad(Callback):
    """Records which parameters require and received a gradient on the first batch."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not hasattr(self, "requires"):
            module = pl_module.module
            self.requires = {n for n, p in module.named_parameters() if p.requires_grad}
            self.received = {
                n for n, p in module.named_parameters() if p.grad is not None and p.grad.any()
            }


@pytest.fixture(scope="module")
def reference():
    kang = ad.read_h5ad(KANG)
    return kang[kang.obs["batch"] != "donor1488"].copy()


@pytest.fixture(scope="module")
def lora_trained(reference):
    """A tiny base model and a copy of it fine-tuned with LoRA on real Kang PBMCs."""
    ref = reference.copy()
    base = XTrimoGene(None, config="tiny", seed=0)
    before = {k: v.clone() for k, v in base.module.state_dict().items()}
    model = XTrimoGene(None, config="tiny", seed=0)
    model.add_classifier(ref, labels_key="cell_type")
    head0 = {k: v.clone() for k, v in model.module.classifier.state_dict().items()}
    record = RecordGrad()
    model.train(max_epochs=2, finetune="lora", lora_rank=4, lr=1e-2, callbacks=[record], **FAST)
    return base, before, head0, model, record, ref


def test_only_adapters_and_head_train_and_change(lora_trained):
    base, before, head0, model, record, _ = lora_trained
    assert record.requires, "the callback did not run"
    # Exactly the adapters and the head require and receive gradients.
    assert all(".lora_" in n or n.startswith("classifier.") for n in record.requires)
    assert any(".lora_B" in n for n in record.requires)
    assert {"classifier.weight", "classifier.bias"} <= record.requires
    assert record.received <= record.requires
    # On the first step lora_B is zero, so only lora_B (and the head) get a non-zero gradient.
    assert any(".lora_B" in n for n in record.received)
    assert not any(".lora_A" in n for n in record.received)
    depth = model.config.encoder_depth
    for i in range(depth):
        for t in ("attention.qkv_proj", "attention.out_proj", "ff_in", "ff_out"):
            assert f"encoder.layers.{i}.{t}.lora_A.default.weight" in record.requires
    # After training the adapters are merged: a plain module, the same parameter names.
    assert not has_lora(model.module)
    assert not hasattr(model.module, "peft_config")
    after = {k: v for k, v in model.module.state_dict().items() if not k.startswith("classifier")}
    assert set(after) == set(before)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    targets = {
        f"encoder.layers.{i}.{t}.weight"
        for i in range(depth)
        for t in ("attention.qkv_proj", "attention.out_proj", "ff_in", "ff_out")
    }
    # Only the targeted weights moved (merged adapters); biases, norms, embeddings, decoder
    # are exactly the base's.
    assert changed == targets
    assert not torch.equal(model.module.classifier.weight, head0["weight"])
    assert all(p.requires_grad for p in model.module.parameters())
    info = model.classifier_
    assert info["finetune"] == "lora"
    assert info["lora"]["rank"] == 4
    assert info["lora"]["base_weights_sha256"] == base_fingerprint(base.module)
    n_adapters = sum(v.numel() for v in model.lora_state_.values())
    n_head = sum(v.numel() for v in head0.values())
    assert model.training_args_["trainable_parameters"] == n_adapters + n_head
    assert np.isfinite(model.history["train_loss"].to_numpy()).all()


def test_merged_module_computes_what_the_adapted_one_did(pbmc):
    model = XTrimoGene(None, config="tiny", seed=0)
    spec = LoraSpec(rank=4, alpha=8, targets=("attention.qkv_proj", "ff_out"))
    names = inject_lora(model.module, spec)
    assert len(names) == 2 * 2 * model.config.encoder_depth
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero adapters (lora_B starts at zero: a no-op)
        for n, p in model.module.named_parameters():
            if ".lora_" in n:
                p.normal_(std=0.2)
    adapted = model.get_latent_representation(pbmc[:12].copy())
    state = lora_state(model.module)
    assert set(state) == set(names)
    merge_lora(model.module)
    assert not has_lora(model.module)
    assert all(
        type(m) is torch.nn.Linear
        for m in model.module.encoder.layers[0].modules()
        if isinstance(m, torch.nn.Linear)
    )
    merged = model.get_latent_representation(pbmc[:12].copy())
    np.testing.assert_allclose(merged, adapted, atol=1e-5, rtol=0)
    base = XTrimoGene(None, config="tiny", seed=0).get_latent_representation(pbmc[:12].copy())
    assert np.abs(base - merged).max() > 1e-3  # the adapters did something


def test_save_load_and_apply_to_the_base(lora_trained, tmp_path):
    _, _, _, model, _, ref = lora_trained
    query = ref[:40].copy()
    z = model.get_latent_representation(query)
    probs = model.predict(query, soft=True)
    model.save(tmp_path / "m")
    assert (tmp_path / "m" / "lora_adapter.pt").exists()
    # The merged model loads like any model.
    loaded = XTrimoGene.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.get_latent_representation(query), z, atol=1e-5)
    assert loaded.classifier_["lora"] == model.classifier_["lora"]
    assert set(loaded.lora_state_) == set(model.lora_state_)
    # The base plus the adapter file rebuild it.
    rebuilt = XTrimoGene(None, config="tiny", seed=0)
    rebuilt.apply_lora(tmp_path / "m")
    assert not has_lora(rebuilt.module)
    np.testing.assert_allclose(rebuilt.get_latent_representation(query), z, atol=1e-5)
    for k, v in model.module.state_dict().items():
        torch.testing.assert_close(rebuilt.module.state_dict()[k], v, atol=1e-6, rtol=0)
    assert rebuilt.label_categories == model.label_categories
    np.testing.assert_allclose(
        rebuilt.predict(query, soft=True).to_numpy(), probs.to_numpy(), atol=1e-5
    )
    # Saving the rebuilt model keeps the adapters.
    rebuilt.save(tmp_path / "r")
    assert (tmp_path / "r" / "lora_adapter.pt").exists()


def test_adapters_refused_on_another_base(lora_trained, tmp_path):
    _, _, _, model, _, _ = lora_trained
    model.save(tmp_path / "m")
    other = XTrimoGene(None, config="tiny", seed=1)
    before = {k: v.clone() for k, v in other.module.state_dict().items()}
    expected = model.classifier_["lora"]["base_weights_sha256"]
    with pytest.raises(
        ValueError, match=f"trained on a base model with weights SHA-256 {expected}"
    ):
        other.apply_lora(tmp_path / "m")
    after = other.module.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing changed
    # A model saved without LoRA has no adapters to apply.
    plain = XTrimoGene(None, config="tiny", seed=0)
    plain.save(tmp_path / "plain")
    with pytest.raises(ValueError, match="holds no LoRA adapters"):
        XTrimoGene(None, config="tiny", seed=0).apply_lora(tmp_path / "plain")


def test_bad_lora_arguments(reference):
    model = XTrimoGene(None, config="tiny", seed=0)
    model.add_classifier(reference[:64].copy(), labels_key="cell_type")
    with pytest.raises(ValueError, match="lora_targets"):
        model.train(max_epochs=1, finetune="lora", lora_targets=["attention"], **FAST)
    with pytest.raises(ValueError, match="lora_rank"):
        model.train(max_epochs=1, finetune="lora", lora_rank=0, **FAST)
    assert not has_lora(model.module)


def test_missing_peft_names_the_extra(monkeypatch, reference):
    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("No module named 'peft'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(ImportError, match=r"pip install 'scxtrimo\[lora\]'"):
        require_peft()
    model = XTrimoGene(None, config="tiny", seed=0)
    model.add_classifier(reference[:64].copy(), labels_key="cell_type")
    with pytest.raises(ImportError, match=r"scxtrimo\[lora\]"):
        model.train(max_epochs=1, finetune="lora", **FAST)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = XTrimoGene(None, config="tiny", seed=0)
    encoder = model.module.encoder
    for layer in encoder.layers:  # with dropout: the recomputation must draw the same masks
        layer.dropout = layer.attention.dropout = 0.1
    encoder.train()
    x = torch.randn(3, 7, model.config.encoder_dim, requires_grad=True)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 5:] = True
    grads = []
    for checkpointing in (False, True):
        encoder.gradient_checkpointing = checkpointing
        encoder.zero_grad()
        x.grad = None
        torch.manual_seed(3)
        y = encoder(x, pad)
        (y[~pad] ** 2).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in encoder.parameters()])
    encoder.gradient_checkpointing = False
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lora_with_gradient_checkpointing_trains(reference):
    model = XTrimoGene(None, config="tiny", seed=0)
    model.add_classifier(reference[:96].copy(), labels_key="cell_type")
    before = model.module.encoder.layers[0].ff_in.weight.clone()
    model.train(max_epochs=1, finetune="lora", gradient_checkpointing=True, lr=1e-2, **FAST)
    assert model.training_args_["gradient_checkpointing"]
    assert not model.module.encoder.gradient_checkpointing  # restored after training
    assert not torch.equal(model.module.encoder.layers[0].ff_in.weight, before)


class Interrupt(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        raise RuntimeError("stop here")


def test_failed_lora_run_leaves_the_base_as_it_was(reference):
    model = XTrimoGene(None, config="tiny", seed=0)
    model.add_classifier(reference[:96].copy(), labels_key="cell_type")
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.raises(RuntimeError, match="stop here"):
        model.train(max_epochs=1, finetune="lora", lr=1e-2, callbacks=[Interrupt()], **FAST)
    assert not has_lora(model.module)
    after = model.module.state_dict()
    encoder = [k for k in before if not k.startswith("classifier.")]
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in encoder)
    # A later run works (no adapters left behind).
    model.train(max_epochs=1, finetune="lora", lr=1e-2, **FAST)
    assert model.classifier_["finetune"] == "lora"
