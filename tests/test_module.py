"""Unit tests of the xTrimoGene module (tiny configurations, CPU)."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scxtrimo.model._scfoundation import map_scfoundation_key, scfoundation_state_dict_keys
from scxtrimo.module import (
    CONFIGS,
    AutoDiscretizationEmbedding,
    PerformerDecoder,
    XTrimoGeneConfig,
    XTrimoGeneModule,
    get_config,
)
from scxtrimo.module._performer import favor_softmax_features, gaussian_orthogonal_random_matrix

N_GENES = 19264


def make_module(**overrides) -> XTrimoGeneModule:
    torch.manual_seed(0)
    # Dropout off so that training-mode steps are deterministic.
    module = XTrimoGeneModule("tiny", **{"encoder_dropout": 0.0, **overrides})
    return module.eval()


def make_batch(
    lengths: list[int],
    n_masked: list[int] | None = None,
    *,
    n_genes: int = N_GENES,
    seed: int = 0,
    pad_gene_index: int | None = None,
    pad_value: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Random encoder batch in the contract layout (+ masked slots if ``n_masked``)."""
    generator = torch.Generator().manual_seed(seed)
    batch_size, width = len(lengths), 2 + max(lengths)
    pad_gene_index = n_genes + 2 if pad_gene_index is None else pad_gene_index
    gene_index = torch.full((batch_size, width), pad_gene_index, dtype=torch.int64)
    value = torch.full((batch_size, width), pad_value, dtype=torch.float32)
    padding_mask = torch.ones(batch_size, width, dtype=torch.bool)
    max_masked = max(n_masked) if n_masked else 0
    masked_index = torch.zeros(batch_size, max_masked, dtype=torch.int64)
    masked_pad = torch.ones(batch_size, max_masked, dtype=torch.bool)
    for row, length in enumerate(lengths):
        n_extra = n_masked[row] if n_masked else 0
        genes = torch.randperm(n_genes, generator=generator)[: length + n_extra]
        visible, hidden = genes[:length].sort().values, genes[length:]
        gene_index[row, 0], gene_index[row, 1] = n_genes, n_genes + 1
        gene_index[row, 2 : 2 + length] = visible
        value[row, :2] = torch.tensor([4.0, 3.0])
        value[row, 2 : 2 + length] = torch.rand(length, generator=generator) * 4 + 0.1
        padding_mask[row, : 2 + length] = False
        masked_index[row, :n_extra] = hidden
        masked_pad[row, :n_extra] = False
    batch = {"gene_index": gene_index, "value": value, "padding_mask": padding_mask}
    if n_masked:
        target = torch.rand(batch_size, max_masked, generator=generator) * 3
        target = target * (torch.rand(batch_size, max_masked, generator=generator) > 0.5)
        batch |= {
            "masked_index": masked_index,
            "masked_value": torch.rand(batch_size, max_masked, generator=generator),
            "masked_token": torch.rand(batch_size, max_masked, generator=generator) < 0.8,
            "masked_pad": masked_pad,
            "target_value": target.masked_fill(masked_pad, 0.0),
        }
    return batch


def select(batch: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
    """One cell of a batch with its trailing padding removed."""
    length = int((~batch["padding_mask"][row]).sum())
    out = {k: batch[k][row : row + 1, :length] for k in ("gene_index", "value", "padding_mask")}
    if "masked_index" in batch:
        n_masked = int((~batch["masked_pad"][row]).sum())
        for key in ("masked_index", "masked_value", "masked_token", "masked_pad", "target_value"):
            out[key] = batch[key][row : row + 1, :n_masked]
    return out


def decoder_kwargs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = ("masked_index", "masked_value", "masked_token", "masked_pad")
    return {key: batch[key] for key in keys if key in batch}


# -- configuration --------------------------------------------------------------------------------
def test_config_round_trip_and_json():
    for config in CONFIGS.values():
        as_dict = config.to_dict()
        json.dumps(as_dict)
        assert XTrimoGeneConfig.from_dict(as_dict) == config


def test_config_errors_and_overrides():
    with pytest.raises(ValueError, match=r"Unknown XTrimoGeneConfig field.*'hidden'"):
        XTrimoGeneConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match=r"valid names are \['base', 'scfoundation'"):
        get_config("huge")
    with pytest.raises(ValueError, match="divisible"):
        get_config("tiny", encoder_heads=3)
    with pytest.raises(ValueError, match="encoder_activation"):
        get_config("tiny", encoder_activation="swish")
    with pytest.raises(ValueError, match="Unknown XTrimoGeneConfig field"):
        get_config("tiny", encoder_width=3)
    with pytest.raises(TypeError, match="configuration name"):
        get_config(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        CONFIGS["tiny"].encoder_dim = 5
    config = get_config({"encoder_dim": 48, "encoder_heads": 4}, decoder_depth=3)
    assert (config.encoder_dim, config.decoder_depth, config.encoder_ff_dim) == (48, 3, 512)
    assert get_config(config) is config
    assert CONFIGS["scfoundation"].nb_features == 266 == get_config("scfoundation").nb_features
    assert get_config("tiny").nb_features == int(8 * torch.log(torch.tensor(8.0)))
    tiny = get_config("tiny")
    assert (tiny.t_token_index, tiny.s_token_index, tiny.padding_index) == (19264, 19265, 19266)
    assert (tiny.seq_len, tiny.n_gene_embeddings) == (19266, 19267)


def test_named_config_parameter_counts():
    counts = {}
    for name, config in CONFIGS.items():
        with torch.device("meta"):
            module = XTrimoGeneModule(config)
        n_params = sum(p.numel() for p in module.parameters())
        n_buffers = sum(b.numel() for b in module.buffers())
        assert n_params == config.n_parameters()
        assert n_params + n_buffers == config.n_parameters(include_buffers=True)
        counts[name] = n_params
    assert counts["tiny"] < 1_000_000
    assert 2_500_000 < counts["small"] < 4_000_000
    assert 8_000_000 < counts["base"] < 12_000_000
    assert counts["scfoundation"] == 119_252_285


def test_scfoundation_config_has_official_keys_and_shapes():
    config = get_config("scfoundation")
    with torch.device("meta"):
        module = XTrimoGeneModule(config)
    ours = {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}
    official = scfoundation_state_dict_keys(config)
    assert len(official) == len(ours) == 265
    mapped = {map_scfoundation_key("model." + key): shape for key, shape in official.items()}
    assert mapped == ours
    assert sum(int(torch.Size(s).numel()) for s in official.values()) == 119_354_430
    assert official["decoder.performer.net.layers.5.0.fn.fast_attention.projection_matrix"] == (
        266,
        64,
    )
    assert module.state_dict()["decoder.calls_since_last_redraw"].dtype == torch.int64
    assert map_scfoundation_key("model.not_a_tensor") is None


# -- building blocks ------------------------------------------------------------------------------
def test_value_embedding_flags_are_explicit():
    torch.manual_seed(0)
    embedding = AutoDiscretizationEmbedding(bin_num=10, dim=6)
    value = torch.tensor([[0.0, 1.5, 102.0, 103.0]])
    out = embedding(value)
    assert out.shape == (1, 4, 6)
    # 102/103 are genuine values here, not the official magic mask/pad ids.
    assert not torch.allclose(out[0, 2], embedding.mask_embedding[0])
    assert not torch.allclose(out[0, 3], embedding.padding_embedding[0])
    weights = embedding.bin_weights(value)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 4))
    flagged = embedding(
        value,
        mask_token=torch.tensor([[False, True, False, False]]),
        padding=torch.tensor([[False, False, True, False]]),
    )
    torch.testing.assert_close(flagged[0, 1], embedding.mask_embedding[0])
    torch.testing.assert_close(flagged[0, 2], embedding.padding_embedding[0])
    torch.testing.assert_close(flagged[0, [0, 3]], out[0, [0, 3]])


def test_orthogonal_random_features():
    generator = torch.Generator().manual_seed(3)
    matrix = gaussian_orthogonal_random_matrix(20, 8, generator=generator)
    assert matrix.shape == (20, 8)
    block = matrix[:8] / matrix[:8].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(8), atol=1e-5, rtol=0)
    again = gaussian_orthogonal_random_matrix(20, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(matrix, again)


def test_key_stabilizer_modes():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 2, 5, 4, generator=generator)
    keys[1] *= 4  # a cell with much larger keys dominates the batch-wide maximum
    projection = gaussian_orthogonal_random_matrix(6, 4, generator=generator)
    per_cell = favor_softmax_features(keys, projection, is_query=False, key_stabilizer="cell")
    batched = favor_softmax_features(keys, projection, is_query=False, key_stabilizer="batch")
    for row in range(3):
        alone = favor_softmax_features(keys[row : row + 1], projection, is_query=False)
        torch.testing.assert_close(per_cell[row : row + 1], alone)
        single_batch = favor_softmax_features(
            keys[row : row + 1], projection, is_query=False, key_stabilizer="batch"
        )
        torch.testing.assert_close(single_batch, alone)
    assert not torch.allclose(per_cell[0], batched[0])
    with pytest.raises(ValueError, match="key_stabilizer"):
        favor_softmax_features(keys, projection, is_query=False, key_stabilizer="global")


def test_performer_projections_fixed_in_eval_and_redrawn_on_request():
    torch.manual_seed(0)
    decoder = PerformerDecoder(dim=8, depth=2, heads=2, dim_head=4, ff_dim=16)
    before = [layer.attention.projection_matrix.clone() for layer in decoder.layers]
    x = torch.randn(2, 7, 8)
    decoder.eval()
    out = decoder(x)
    torch.testing.assert_close(decoder(x), out)
    assert int(decoder.calls_since_last_redraw) == 0
    decoder.redraw_projections(torch.Generator().manual_seed(1))
    after = [layer.attention.projection_matrix.clone() for layer in decoder.layers]
    assert not torch.allclose(before[0], after[0])
    assert not torch.allclose(after[0], after[1])
    decoder.redraw_projections(torch.Generator().manual_seed(1))
    torch.testing.assert_close(decoder.layers[0].attention.projection_matrix, after[0])

    auto = PerformerDecoder(8, 1, 2, 4, 16, feature_redraw_interval=2).train()
    initial = auto.layers[0].attention.projection_matrix.clone()
    auto(x)
    auto(x)
    torch.testing.assert_close(auto.layers[0].attention.projection_matrix, initial)
    auto(x)  # third training call: interval reached -> redraw
    assert not torch.allclose(auto.layers[0].attention.projection_matrix, initial)
    assert int(auto.calls_since_last_redraw) == 1


# -- encoder and pooling --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides", [{}, {"encoder_norm_first": True, "encoder_activation": "gelu"}]
)
def test_encoder_and_pool_are_padding_invariant(overrides):
    module = make_module(**overrides)
    # Garbage at padded slots (value 102, a real gene index) must not matter.
    batch = make_batch([3, 40, 11, 25], pad_gene_index=5, pad_value=102.0)
    with torch.no_grad():
        h = module.encode(batch["gene_index"], batch["value"], batch["padding_mask"])
        pooled = {p: module.pool(h, batch["padding_mask"], p) for p in ("all", "max", "mean")}
        for row in range(4):
            cell = select(batch, row)
            h_alone = module.encode(cell["gene_index"], cell["value"], cell["padding_mask"])
            length = h_alone.shape[1]
            torch.testing.assert_close(h[row, :length], h_alone[0], atol=1e-5, rtol=0)
            for pooling, expected in pooled.items():
                alone = module.pool(h_alone, cell["padding_mask"], pooling)
                torch.testing.assert_close(expected[row], alone[0], atol=1e-5, rtol=0)
    assert h.shape == (4, 42, 32)
    assert pooled["all"].shape == (4, 128)
    assert pooled["max"].shape == pooled["mean"].shape == (4, 32)


def test_pool_never_uses_padding():
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(2, 6, 4, generator=generator)
    padding_mask = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    poisoned = h.clone()
    poisoned[0, 4:] = 1e6
    poisoned[0, 5] = float("nan")
    pooled = XTrimoGeneModule.pool(poisoned, padding_mask, "all")
    assert torch.isfinite(pooled).all()
    genes = h[0, 2:4]
    expected = torch.cat([h[0, 1], h[0, 0], genes.amax(0), genes.mean(0)])
    torch.testing.assert_close(pooled[0], expected)
    torch.testing.assert_close(
        XTrimoGeneModule.pool(poisoned, padding_mask, "max")[0], h[0, :4].amax(0)
    )
    torch.testing.assert_close(
        XTrimoGeneModule.pool(poisoned, padding_mask, "mean")[0], genes.mean(0)
    )
    # A cell with only its T and S tokens gets zeros for the gene statistics, not -inf/NaN.
    only_tokens = XTrimoGeneModule.pool(h[:1, :2], torch.zeros(1, 2, dtype=torch.bool), "all")
    torch.testing.assert_close(only_tokens[0, 8:], torch.zeros(8))
    with pytest.raises(ValueError, match="pooling"):
        XTrimoGeneModule.pool(h, padding_mask, "cls")


def test_dropout_only_in_training():
    torch.manual_seed(0)
    module = XTrimoGeneModule("tiny", encoder_dropout=0.5)
    batch = make_batch([10, 6])
    args = (batch["gene_index"], batch["value"], batch["padding_mask"])
    module.eval()
    torch.testing.assert_close(module.encode(*args), module.encode(*args))
    module.train()
    assert not torch.allclose(module.encode(*args), module.encode(*args))


# -- decoder --------------------------------------------------------------------------------------
def naive_decoder_input(module: XTrimoGeneModule, h, batch) -> torch.Tensor:
    """Reference: value-embed every position of every cell, then overwrite (official recipe)."""
    cfg = module.config
    batch_size, seq_len = h.shape[0], cfg.seq_len
    values = torch.zeros(batch_size, seq_len)
    mask_token = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    if "masked_index" in batch:
        for row in range(batch_size):
            used = ~batch["masked_pad"][row]
            positions = batch["masked_index"][row, used]
            values[row, positions] = batch["masked_value"][row, used]
            mask_token[row, positions] = batch["masked_token"][row, used]
    x = module.value_embedding(values, mask_token=mask_token)
    for row in range(batch_size):
        real = ~batch["padding_mask"][row]
        x[row, batch["gene_index"][row, real]] = h[row, real]
    x = x + module.gene_embedding.weight[:seq_len]
    return module.decoder_embed(x)


@pytest.mark.parametrize("with_masked", [False, True])
def test_efficient_decoder_input_matches_naive_reference(with_masked):
    module = make_module()
    batch = make_batch([5, 30, 12], [4, 9, 1] if with_masked else None)
    with torch.no_grad():
        h = module.encode(batch["gene_index"], batch["value"], batch["padding_mask"])
        reference = naive_decoder_input(module, h, batch)
        efficient = module._decoder_input(
            h,
            batch["gene_index"],
            batch["padding_mask"],
            *(batch.get(k) for k in ("masked_index", "masked_value", "masked_token", "masked_pad")),
        )
        torch.testing.assert_close(efficient, reference, atol=1e-5, rtol=0)
        decoded = module.decode(
            h, batch["gene_index"], batch["padding_mask"], **decoder_kwargs(batch)
        )
        torch.testing.assert_close(decoded, module.decoder(reference), atol=1e-5, rtol=0)
    assert decoded.shape == (3, N_GENES + 2, 16)


def test_decoder_outputs_and_batch_independence():
    module = make_module()
    batch = make_batch([3, 50, 20], [2, 6, 0])
    genes = torch.tensor([0, 7, N_GENES - 1, N_GENES, N_GENES + 1])
    with torch.no_grad():
        h = module.encode(batch["gene_index"], batch["value"], batch["padding_mask"])
        common = (h, batch["gene_index"], batch["padding_mask"])
        embeddings = module.gene_embeddings(*common, **decoder_kwargs(batch))
        expression = module.expression(*common, **decoder_kwargs(batch))
        subset = module.gene_embeddings(*common, **decoder_kwargs(batch), genes=genes)
        per_cell_subset = module.expression(
            *common, **decoder_kwargs(batch), genes=genes.expand(3, -1)
        )
        batched = module.gene_embeddings(*common, **decoder_kwargs(batch), key_stabilizer="batch")
        for row in range(3):
            cell = select(batch, row)
            h_alone = module.encode(cell["gene_index"], cell["value"], cell["padding_mask"])
            alone = module.gene_embeddings(
                h_alone, cell["gene_index"], cell["padding_mask"], **decoder_kwargs(cell)
            )
            torch.testing.assert_close(embeddings[row], alone[0], atol=1e-5, rtol=0)
            alone_batch_mode = module.gene_embeddings(
                h_alone,
                cell["gene_index"],
                cell["padding_mask"],
                **decoder_kwargs(cell),
                key_stabilizer="batch",
            )
            torch.testing.assert_close(alone_batch_mode, alone)
    assert embeddings.shape == batched.shape == (3, N_GENES + 2, 16)
    assert expression.shape == (3, N_GENES + 2)
    torch.testing.assert_close(subset, embeddings[:, genes])
    torch.testing.assert_close(per_cell_subset, expression[:, genes])
    torch.testing.assert_close(
        expression, module.expression_head(embeddings).squeeze(-1), atol=1e-6, rtol=0
    )


def _top_constant_rows(module: XTrimoGeneModule, n: int) -> torch.Tensor:
    """Genes whose shared ("value 0") decoder rows have the largest key projections."""
    layer = module.decoder.layers[0]
    table = module.gene_embedding.weight
    constant = module.decoder_embed(module.value_embedding(torch.zeros(1)) + table)
    key = layer.attention.k_proj(layer.attention_norm(constant[:N_GENES]))
    key = key.unflatten(-1, (layer.attention.heads, layer.attention.dim_head))
    projection = layer.attention.projection_matrix
    dash = torch.einsum("nhd,md->nhm", key * key.shape[-1] ** -0.25, projection)
    return dash.amax(dim=(1, 2)).argsort(descending=True)[:n]


@pytest.mark.parametrize("training", [False, True])
def test_masked_expression_matches_full_decoder(training):
    module = make_module().train(training)
    batch = make_batch([5, 40, 12, 7], [4, 9, 0, 30], seed=3)
    # Cell 0 shows the encoder the shared rows with the largest keys, so its stabiliser must
    # come from the next shared row it keeps (the hard case of the replaced-row algebra).
    top = _top_constant_rows(module, 5).detach()
    batch["gene_index"][0, 2:7] = top
    batch["masked_index"][0, :4] = torch.arange(4) + 1000
    args = (batch["gene_index"], batch["padding_mask"])
    h = module.encode(batch["gene_index"], batch["value"], batch["padding_mask"])
    fast = module.masked_expression(h, *args, **decoder_kwargs(batch))
    positions = batch["masked_index"].masked_fill(batch["masked_pad"], 0)
    full = module.expression(h, *args, **decoder_kwargs(batch), genes=positions)
    used = ~batch["masked_pad"]
    torch.testing.assert_close(fast[used], full[used], atol=1e-5, rtol=1e-5)
    params = [p for p in module.parameters() if p.requires_grad]
    grad_fast = torch.autograd.grad(
        fast[used].square().sum(), params, allow_unused=True, retain_graph=True
    )
    grad_full = torch.autograd.grad(full[used].square().sum(), params, allow_unused=True)
    for name, a, b in zip([n for n, _ in module.named_parameters()], grad_fast, grad_full):
        if b is None:
            assert a is None or not a.any(), name
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    # generative() takes this path for single-layer decoders with the per-cell stabiliser.
    out = module.generative(h, *args, **decoder_kwargs(batch))["prediction"]
    torch.testing.assert_close(out[used], fast[used])


def test_replaced_rows_need_a_single_layer_decoder():
    module = make_module(decoder_depth=2)
    batch = make_batch([5, 8], [3, 2])
    with torch.no_grad():
        h = module.encode(batch["gene_index"], batch["value"], batch["padding_mask"])
        with pytest.raises(ValueError, match="single-layer decoder"):
            module.masked_expression(
                h, batch["gene_index"], batch["padding_mask"], **decoder_kwargs(batch)
            )
        # generative() falls back to decoding every position.
        out = module.generative(
            h, batch["gene_index"], batch["padding_mask"], **decoder_kwargs(batch)
        )
    assert out["prediction"].shape == (2, 3)


# -- scvi-tools hooks and training ----------------------------------------------------------------
def test_forward_returns_loss_output():
    module = make_module()
    batch = make_batch([5, 30, 12], [4, 9, 1])
    inference_outputs, generative_outputs, losses = module(batch)
    assert inference_outputs["z"].shape == (3, 128)
    assert inference_outputs["h"].shape == (3, 32, 32)
    prediction = generative_outputs["prediction"]
    assert prediction.shape == (3, 9)
    with torch.no_grad():
        full = module.expression(
            inference_outputs["h"],
            batch["gene_index"],
            batch["padding_mask"],
            **decoder_kwargs(batch),
        )
    used = ~batch["masked_pad"]
    expected = full.gather(1, batch["masked_index"])
    torch.testing.assert_close(prediction[used], expected[used], atol=1e-6, rtol=0)
    squared = (prediction - batch["target_value"]).square()
    torch.testing.assert_close(losses.loss, squared[used].mean())
    per_cell = losses.reconstruction_loss["reconstruction_loss"]
    assert per_cell.shape == (3,)
    torch.testing.assert_close(per_cell[1], squared[1].mean())
    assert set(losses.extra_metrics) == {"masked_mse_nonzero", "masked_mse_zero"}
    assert losses.n_obs_minibatch == 3
    assert "kl_weight" not in inspect.signature(module.loss).parameters
    with pytest.raises(NotImplementedError, match="no likelihood"):
        module.sample()


def test_classification_head():
    module = make_module()
    assert module.classifier is None
    classifier = XTrimoGeneModule("tiny", n_labels=3)
    batch = make_batch([5, 30, 12], [4, 9, 1])
    labels = torch.tensor([[0], [2], [1]])
    inference_outputs, _, losses = classifier({**batch, "labels": labels})
    assert inference_outputs["logits"].shape == (3, 3)
    assert losses.logits.shape == (3, 3)
    torch.testing.assert_close(losses.true_labels, labels.reshape(-1))
    expected_ce = torch.nn.functional.cross_entropy(losses.logits, labels.reshape(-1))
    torch.testing.assert_close(losses.classification_loss, expected_ce)
    # Fine-tuning batches without masked positions skip the decoder.
    encoder_only = {k: batch[k] for k in ("gene_index", "value", "padding_mask")}
    _, generative_outputs, losses = classifier({**encoder_only, "labels": labels.reshape(-1)})
    assert generative_outputs["prediction"] is None
    torch.testing.assert_close(losses.loss, losses.classification_loss)
    with pytest.raises(ValueError, match="no loss to compute"):
        module(encoder_only)


@pytest.mark.slow
def test_loss_decreases_on_fixed_batch():
    module = make_module().train()
    batch = make_batch([20, 35, 12, 28], [8, 8, 5, 8], seed=1)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        _, _, output = module(batch)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # Only the used masked slots carry gradient into the decoder input (no leak from pads).
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def test_visible_loss_term():
    module = make_module(visible_loss_weight=0.5)
    batch = make_batch([5, 40, 12], [4, 9, 3], seed=5)
    generator = torch.Generator().manual_seed(0)
    batch["visible_target"] = torch.rand(batch["value"].shape, generator=generator) * 3
    _, generative, out = module(batch)
    visible = generative["visible_prediction"]
    # Same predictions as decoding every position and reading the encoder's genes.
    h = module.encode(batch["gene_index"], batch["value"], batch["padding_mask"])
    full = module.expression(
        h,
        batch["gene_index"],
        batch["padding_mask"],
        **decoder_kwargs(batch),
        genes=batch["gene_index"].masked_fill(batch["padding_mask"], 0),
    )
    genes = ~batch["padding_mask"]
    genes[:, :2] = False
    torch.testing.assert_close(visible[genes], full[genes], atol=1e-5, rtol=1e-5)
    visible_mse = (visible - batch["visible_target"])[genes].square().mean()
    used = ~batch["masked_pad"]
    masked_mse = (generative["prediction"] - batch["target_value"])[used].square().mean()
    torch.testing.assert_close(out.loss, masked_mse + 0.5 * visible_mse)
    torch.testing.assert_close(out.extra_metrics["visible_mse"], visible_mse.detach())
    # Without the weight (scFoundation), visible genes are neither predicted nor scored.
    plain = make_module(visible_loss_weight=0.0)
    _, generative, out = plain(batch)
    assert "visible_prediction" not in generative
    assert "visible_mse" not in out.extra_metrics


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=24), min_size=1, max_size=6),
    norm_first=st.booleans(),
)
def test_packed_tokens_give_the_padded_result_at_real_positions(lengths, norm_first):
    """Inference runs the per-token layers on the real tokens only; nothing else changes."""
    from scxtrimo.module._encoder import TransformerEncoder

    torch.manual_seed(len(lengths))
    enc = TransformerEncoder(32, 2, 4, 64, dropout=0.0, norm_first=norm_first).eval()
    width = max(lengths) + 3  # every batch carries some padding
    x = torch.randn(len(lengths), width, 32)
    padding = torch.arange(width)[None, :] >= torch.tensor(lengths)[:, None]
    with torch.no_grad():
        packed = enc(x, padding)
        enc.pack_tokens = False
        padded = enc(x, padding)
    real = ~padding
    torch.testing.assert_close(packed[real], padded[real], rtol=1e-5, atol=1e-5)
    assert (packed[padding] == 0).all()
    enc.pack_tokens = True
    with torch.enable_grad():  # training keeps the padded path (and its gradients)
        trained = enc(x.requires_grad_(), padding)
    torch.testing.assert_close(trained[real], padded[real], rtol=1e-5, atol=1e-5)
