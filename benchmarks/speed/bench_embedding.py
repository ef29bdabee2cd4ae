"""Section b: cell embeddings, batched and length-bucketed vs one cell per forward pass.

``batched`` is :meth:`scxtrimo.model.XTrimoGene.get_latent_representation` (token-budget
batches of cells of similar length, batches built in a background thread). ``one_cell`` is the
official scFoundation approach re-implemented on the same module and weights: every cell gets its
own batch of one and its own ``encode`` + ``pool`` call.

Timing: cells are split into depth bins and, bin by bin, both paths embed the same cells one
right after the other (alternating which goes first), so the ratio is robust to the load of a
shared machine drifting; a matmul probe before each bin gives the machine's fp32 FLOP/s at that
moment. Memory: each path runs again on a few cells (deepest included) in a fresh process.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from _common import (
    depth_groups,
    encoder_flops,
    load_average,
    load_pbmc4k,
    log,
    matmul_flops,
    memory_probe,
    spread_by_depth,
    timed,
)
from scxtrimo.data._loading import plan_batches
from scxtrimo.data._tokens import TokenIndex, inference_batch
from scxtrimo.model import XTrimoGene

MAX_TOKENS = 16_384  # get_latent_representation's default token budget


def build_model(config: str) -> tuple[XTrimoGene, Any, Any]:
    """A randomly initialised model, pbmc4k and its prepared input (spec, gene map, stats)."""
    import scxtrimo

    scxtrimo.settings.progress_bar = False
    adata, _ = load_pbmc4k()
    model = XTrimoGene(None, config=config, seed=0)
    return model, adata, model.prepare_input(adata)


def batched_embeddings(model: XTrimoGene, adata, cells: np.ndarray) -> np.ndarray:
    """Our path: the package's batched, length-bucketed embedding."""
    return model.get_latent_representation(
        adata, indices=cells, max_tokens=MAX_TOKENS, progress_bar=False
    )


@torch.inference_mode()
def encode_pool(module, tokens: dict[str, np.ndarray]) -> torch.Tensor:
    """``encode`` + ``pool("all")`` of one prebuilt token batch."""
    batch = {k: torch.from_numpy(v) for k, v in tokens.items()}
    h = module.encode(batch["gene_index"], batch["value"], batch["padding_mask"])
    return module.pool(h, batch["padding_mask"], "all")


@torch.inference_mode()
def one_cell_embeddings(model: XTrimoGene, adata, prep, cells: np.ndarray) -> tuple:
    """The official approach: one batch of one cell, one ``encode`` + ``pool`` per cell.

    Returns the embeddings and each cell's wall time (tokens built and forward pass).
    """
    module = model.module.eval()
    index = TokenIndex(model.config.n_genes)
    out = np.empty((len(cells), 4 * model.config.encoder_dim), dtype=np.float32)
    seconds = np.empty(len(cells))
    for i, cell in enumerate(cells):
        start = time.perf_counter()
        tokens = inference_batch(
            adata.X, np.array([cell]), prep.mapping.col_to_vocab, prep.spec, index
        )
        out[i] = encode_pool(module, tokens)[0].numpy()
        seconds[i] = time.perf_counter() - start
    return out, seconds


def batch_size_sweep(
    model: XTrimoGene, adata, prep, n_cells: int, sizes: list[int], passes: int = 2
) -> dict[str, Any]:
    """Encoder + pooling time per cell against cells per forward pass, without padding.

    The ``n_cells`` cells closest to the median depth (near-equal lengths) are encoded in
    batches of each size from prebuilt tokens, so only the batching itself differs; each size is
    timed ``passes`` times in alternating order and the fastest pass is kept.
    """
    n_tokens = prep.stats.n_tokens
    distance = np.abs(n_tokens - np.median(n_tokens))
    cells = np.sort(np.argsort(distance, kind="stable")[:n_cells])
    index = TokenIndex(model.config.n_genes)
    batches = {
        size: [
            inference_batch(
                adata.X, cells[i : i + size], prep.mapping.col_to_vocab, prep.spec, index
            )
            for i in range(0, n_cells, size)
        ]
        for size in sizes
    }
    encode_pool(model.module.eval(), batches[sizes[0]][0])  # warm-up
    best = dict.fromkeys(sizes, np.inf)
    for p in range(passes):
        for size in sizes if p % 2 == 0 else sizes[::-1]:
            seconds = timed(lambda b=batches[size]: [encode_pool(model.module, t) for t in b])
            best[size] = min(best[size], seconds)
    return {
        "n_cells": n_cells,
        "min_tokens": int(n_tokens[cells].min()) + 2,
        "max_tokens": int(n_tokens[cells].max()) + 2,
        "seconds_per_cell": {str(size): best[size] / n_cells for size in sizes},
    }


def padded_flops(config, n_tokens: np.ndarray) -> float:
    """Encoder FLOPs the batched path computes, padding included (same plan as the package)."""
    total = 0.0
    for batch in plan_batches(n_tokens, max_tokens=MAX_TOKENS):
        width = int(n_tokens[batch].max()) + 2
        total += len(batch) * float(encoder_flops(config, width))
    return total


def _time_bin(model, adata, prep, cells: np.ndarray, batched_first: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}

    def run_batched() -> None:
        results["batched_z"] = batched_embeddings(model, adata, cells)

    def run_one_cell() -> None:
        results["one_cell_z"], results["per_cell_s"] = one_cell_embeddings(
            model, adata, prep, cells
        )

    order = [("batched", run_batched), ("one_cell", run_one_cell)]
    for name, fn in order if batched_first else order[::-1]:
        results[f"{name}_s"] = timed(fn)
    return results


def embedding_timing(
    config: str, n_groups: int, per_group: int | None, sweep: tuple[int, list[int]]
) -> dict[str, Any]:
    """Worker: both paths, depth group by depth group (see :func:`_common.depth_groups`).

    Then the batch-size sweep (``sweep`` = cells, batch sizes) of :func:`batch_size_sweep`.
    """
    load_start = load_average()
    model, adata, prep = build_model(config)
    cfg = model.config
    n_tokens = prep.stats.n_tokens
    groups = depth_groups(n_tokens, n_groups, per_group)
    log(f"embedding {config}: {sum(map(len, groups))} cells in {n_groups} depth groups")
    warm = groups[0][:2]
    batched_embeddings(model, adata, warm)
    one_cell_embeddings(model, adata, prep, warm)
    bins, max_diff = [], 0.0
    for k, part in enumerate(groups):
        mm = matmul_flops()
        checks_s = timed(lambda part=part: model.prepare_input(adata, indices=part))
        res = _time_bin(model, adata, prep, part, batched_first=k % 2 == 0)
        max_diff = max(max_diff, float(np.abs(res["batched_z"] - res["one_cell_z"]).max()))
        tokens = n_tokens[part] + 2
        useful = float(encoder_flops(cfg, tokens).sum())
        bins.append(
            {
                "n_cells": len(part),
                "mean_tokens": float(tokens.mean()),
                "min_tokens": int(tokens.min()),
                "max_tokens": int(tokens.max()),
                "batched_s": res["batched_s"],
                "input_checks_s": checks_s,
                "one_cell_s": res["one_cell_s"],
                "per_cell_s": res["per_cell_s"].tolist(),
                "per_cell_tokens": tokens.tolist(),
                "encoder_flops": useful,
                "encoder_flops_padded": padded_flops(cfg, n_tokens[part]),
                "matmul_flops_per_s": mm,
            }
        )
        log(
            f"  bin {k}: {bins[-1]['mean_tokens']:.0f} tokens, {res['one_cell_s'] / res['batched_s']:.2f}x"
        )
    if max_diff > 1e-5:
        raise AssertionError(f"batched and one-cell embeddings differ by {max_diff:.2e} > 1e-5")
    log(f"embedding {config}: batch-size sweep {sweep}")
    sweep_result = batch_size_sweep(model, adata, prep, sweep[0], list(sweep[1]))
    return {
        "batch_size_sweep": sweep_result,
        "config": config,
        "n_parameters": int(sum(p.numel() for p in model.module.parameters())),
        "n_cells": int(sum(map(len, groups))),
        "max_abs_diff": max_diff,
        "bins": bins,
        "load_average_start": load_start,
    }


def embedding_memory(
    config: str, path: str, n_groups: int, per_group: int | None, n_probe: int
) -> dict[str, Any]:
    """Worker: peak memory of one path on ``n_probe`` of the timed cells (deepest included)."""
    model, adata, prep = build_model(config)
    n_tokens = prep.stats.n_tokens
    cells = np.sort(np.concatenate(depth_groups(n_tokens, n_groups, per_group)))
    probe_cells = np.sort(cells[spread_by_depth(n_tokens[cells], n_probe)])
    with memory_probe() as probe:
        start = time.perf_counter()
        if path == "batched":
            batched_embeddings(model, adata, probe_cells)
        else:
            one_cell_embeddings(model, adata, prep, probe_cells)
        seconds = time.perf_counter() - start
    return {
        "config": config,
        "path": path,
        "n_cells": len(probe_cells),
        "max_tokens_per_cell": int(n_tokens[probe_cells].max()) + 2,
        "seconds": seconds,
        **probe.as_dict(),
    }
