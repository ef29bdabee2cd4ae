"""Section c: one pretraining step of the asymmetric model vs all-gene encoders.

All three models predict the same masked values of the same real pbmc4k cells (one
``scxtrimo.data._tokens.pretraining_batch``) and take one AdamW step:

``asymmetric``
    scxtrimo's ``small`` module: encoder over the visible non-zero genes, Performer decoder
    over all 19,266 positions (its scvi-tools forward and loss).
``dense``
    The same encoder (width, depth, heads, feed-forward) run over all 19,266 positions with full
    softmax attention (SDPA), then a linear head: a classical transformer on the whole genome.
``performer``
    A Performer encoder at the same width and depth over all positions (scBERT-style), then a
    linear head.

Each model runs in a fresh process, so its peak memory is its own.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from _common import (
    encoder_flops,
    load_average,
    load_pbmc4k,
    log,
    matmul_flops,
    memory_probe,
    performer_layer_flops,
    transformer_layer_flops,
    value_embedding_flops,
)
from scxtrimo.data import MaskingSpec
from scxtrimo.data._tokens import TokenIndex, pretraining_batch, row_seeds
from scxtrimo.module import (
    AutoDiscretizationEmbedding,
    PerformerDecoder,
    TransformerEncoder,
    XTrimoGeneModule,
    get_config,
)

CONFIG = "small"
MAX_GENES = 1024  # XTrimoGene.train's default cap on visible tokens per cell
BATCH_SEED = 0


class AllGenesModel(nn.Module):
    """Value + gene embedding of every position, one encoder over all of them, linear head."""

    def __init__(self, config, kind: str) -> None:
        super().__init__()
        d = config.encoder_dim
        self.value_embedding = AutoDiscretizationEmbedding(config.bin_num, d, config.bin_alpha)
        self.gene_embedding = nn.Embedding(config.seq_len, d)
        if kind == "dense":
            self.encoder = TransformerEncoder(
                d,
                config.encoder_depth,
                config.encoder_heads,
                config.encoder_ff_dim,
                dropout=config.encoder_dropout,
                attention_dropout=config.encoder_attention_dropout,
            )
        else:
            self.encoder = PerformerDecoder(
                d,
                config.encoder_depth,
                config.encoder_heads,
                d // config.encoder_heads,
                config.encoder_ff_dim,
            )
        self.head = nn.Linear(d, 1)

    def forward(self, value, mask_token, masked_index, target, used) -> torch.Tensor:
        """Masked-regression MSE over the used masked slots."""
        positions = torch.arange(value.shape[1])
        x = self.value_embedding(value, mask_token=mask_token) + self.gene_embedding(positions)
        h = self.encoder(x)
        picked = h.gather(1, masked_index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        squared_error = (self.head(picked).squeeze(-1) - target).square().masked_fill(~used, 0)
        return squared_error.sum() / used.sum().clamp(min=1)


def real_batch(n_cells: int) -> dict[str, np.ndarray]:
    """A pretraining batch of the first ``n_cells`` of a fixed random draw of pbmc4k cells.

    Masks and down-sampling are seeded per cell, so a cell is masked identically in batches of
    any size.
    """
    adata, col_to_vocab = load_pbmc4k()
    rows = np.random.default_rng(BATCH_SEED).permutation(adata.n_obs)[:n_cells]
    return pretraining_batch(
        adata.X,
        rows,
        col_to_vocab,
        TokenIndex(get_config(CONFIG).n_genes),
        MaskingSpec(),
        row_seeds(BATCH_SEED, 0, rows),
        max_genes=MAX_GENES,
    )


def all_gene_inputs(batch: dict[str, np.ndarray], n_positions: int) -> dict[str, torch.Tensor]:
    """The same cells as full-length inputs: every gene's value, mask tokens where masked."""
    n = batch["value"].shape[0]
    value = np.zeros((n, n_positions), dtype=np.float32)
    mask_token = np.zeros((n, n_positions), dtype=bool)
    visible = ~batch["padding_mask"]
    value[np.nonzero(visible)[0], batch["gene_index"][visible]] = batch["value"][visible]
    used = ~batch["masked_pad"]
    rows, genes = np.nonzero(used)[0], batch["masked_index"][used]
    value[rows, genes] = batch["masked_value"][used]
    mask_token[rows, genes] = batch["masked_token"][used]
    tensors = {
        "value": value,
        "mask_token": mask_token,
        "masked_index": np.where(used, batch["masked_index"], 0),
        "target": batch["target_value"],
        "used": used,
    }
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}


def model_and_loss(kind: str, batch: dict[str, np.ndarray]) -> tuple[nn.Module, Any]:
    """The model to train and a closure computing its loss on ``batch``."""
    torch.manual_seed(0)
    config = get_config(CONFIG)
    if kind == "asymmetric":
        module = XTrimoGeneModule(config)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
        return module, lambda: module(tensors)[2].loss
    model = AllGenesModel(config, kind)
    inputs = all_gene_inputs(batch, config.seq_len)
    return model, lambda: model(**inputs)


def training_flops(kind: str, batch: dict[str, np.ndarray]) -> dict[str, float]:
    """Analytical forward FLOPs of the step's model on ``batch``, and fwd+bwd as 3x forward."""
    config = get_config(CONFIG)
    n_cells = batch["value"].shape[0]
    n_masked = (~batch["masked_pad"]).sum(axis=1).astype(np.float64)
    if kind == "asymmetric":
        forward = asymmetric_forward_flops(config, batch)
    else:
        n, d = config.seq_len, config.encoder_dim
        if kind == "dense":
            layer = transformer_layer_flops(n, d, config.encoder_ff_dim)
        else:
            dim_head = d // config.encoder_heads
            features = int(dim_head * math.log(dim_head))
            layer = performer_layer_flops(
                n, d, config.encoder_heads, dim_head, config.encoder_ff_dim, features
            )
        per_cell = value_embedding_flops(n, config.bin_num, d) + config.encoder_depth * layer
        forward = float(n_cells * per_cell + 2.0 * d * n_masked.sum())
    return {"forward": forward, "train_step": 3.0 * forward}


def asymmetric_forward_flops(config, batch: dict[str, np.ndarray]) -> float:
    """Encoder over each cell's visible tokens, decoder over all positions, head at masked ones."""
    d, dd = config.encoder_dim, config.decoder_dim
    n_visible = (~batch["padding_mask"]).sum(axis=1).astype(np.float64)
    n_masked = (~batch["masked_pad"]).sum(axis=1).astype(np.float64)
    n_positions = config.seq_len
    encoder = encoder_flops(config, n_visible).sum()
    decoder_inputs = (
        value_embedding_flops(n_masked, config.bin_num, d).sum()
        + 2.0 * d * dd * (n_visible + n_masked).sum()
        + value_embedding_flops(1, config.bin_num, d)
        + 2.0 * d * dd * config.n_gene_embeddings  # shared zero-value rows, once per batch
    )
    layer = performer_layer_flops(
        n_positions,
        dd,
        config.decoder_heads,
        config.decoder_dim_head,
        config.decoder_ff_dim,
        config.nb_features,
    )
    decoder = len(n_visible) * config.decoder_depth * layer
    return float(encoder + decoder_inputs + decoder + 2.0 * dd * n_masked.sum())


def pretraining_step(kind: str, n_cells: int, n_steps: int, warmup: int) -> dict[str, Any]:
    """Worker: ``warmup`` + ``n_steps`` AdamW steps of one model on ``n_cells`` real cells."""
    load_start = load_average()
    batch = real_batch(n_cells)
    model, loss_fn = model_and_loss(kind, batch)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    mm = matmul_flops()
    log(f"pretraining {kind}: {n_cells} cells, {warmup}+{n_steps} steps")
    times = []
    with memory_probe(trace=False) as probe:
        for step in range(warmup + n_steps):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            optimizer.step()
            if step >= warmup:
                times.append(time.perf_counter() - start)
    flops = training_flops(kind, batch)
    step_s = float(np.median(times))
    return {
        "kind": kind,
        "n_cells": n_cells,
        "n_steps": n_steps,
        "warmup_steps": warmup,
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "encoder_tokens_per_cell": float((~batch["padding_mask"]).sum(axis=1).mean()),
        "encoder_padded_width": int(batch["value"].shape[1]),
        "masked_per_cell": float((~batch["masked_pad"]).sum(axis=1).mean()),
        "step_s_all": times,
        "step_s": step_s,
        "step_s_per_cell": step_s / n_cells,
        "flops_forward": flops["forward"],
        "flops_train_step": flops["train_step"],
        "flops_train_step_per_cell": flops["train_step"] / n_cells,
        "achieved_flops_per_s": flops["train_step"] / step_s,
        "matmul_flops_per_s": mm,
        "final_loss": float(loss.detach()),
        "load_average_start": load_start,
        **probe.as_dict(),
    }
