"""The pretraining decoder: replaced-row path vs decoding every position.

Usage (from the repository root)::

    python benchmarks/speed/bench_decoder_path.py [--config small] [--cells 8 32] [--steps 5]

One AdamW step of :class:`~scxtrimo.module.XTrimoGeneModule` on real pbmc4k cells (one
``scxtrimo.data._tokens.pretraining_batch``, 256 visible genes per cell as in the shipped
recipe), with the decoder computed two ways that give the same loss and gradients:

``replaced rows``
    What ``XTrimoGeneModule.generative`` does for single-layer decoders
    (:meth:`~scxtrimo.module.XTrimoGeneModule.masked_expression`): the attention sums over the
    positions that hold the same "value 0" input in every cell are computed once per batch.
``all positions``
    The decoder run over all 19,266 positions of every cell, then read at the masked ones
    (:meth:`~scxtrimo.module.XTrimoGeneModule.expression` with ``genes=``).

The two run alternately in the same process; the median step time of each and their ratio
are written to ``benchmarks/results/decoder_path.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import scxtrimo
from scxtrimo.data import MaskingSpec, map_genes
from scxtrimo.data._tokens import TokenIndex, pretraining_batch, row_seeds
from scxtrimo.module import XTrimoGeneModule


def step_closures(module: XTrimoGeneModule, tensors: dict[str, torch.Tensor]):
    """Loss closures of the two decoder paths (same masked-MSE as the module's loss)."""
    used = ~tensors["masked_pad"]
    positions = tensors["masked_index"].masked_fill(~used, 0)
    decoder_args = {
        k: tensors[k] for k in ("masked_index", "masked_value", "masked_token", "masked_pad")
    }

    def mse(prediction: torch.Tensor) -> torch.Tensor:
        error = (prediction - tensors["target_value"]).square().masked_fill(~used, 0.0)
        return error.sum() / used.sum()

    def encode() -> torch.Tensor:
        return module.encode(tensors["gene_index"], tensors["value"], tensors["padding_mask"])

    def replaced_rows() -> torch.Tensor:
        h = encode()
        return mse(
            module.masked_expression(
                h, tensors["gene_index"], tensors["padding_mask"], **decoder_args
            )
        )

    def all_positions() -> torch.Tensor:
        h = encode()
        prediction = module.expression(
            h, tensors["gene_index"], tensors["padding_mask"], **decoder_args, genes=positions
        )
        return mse(prediction)

    return {"replaced rows": replaced_rows, "all positions": all_positions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--cells", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-genes", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 on a shared machine)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    adata = scxtrimo.datasets.pbmc4k()
    col_to_vocab = map_genes(adata.var).col_to_vocab
    rows_out = []
    for n_cells in args.cells:
        cells = np.random.default_rng(0).permutation(adata.n_obs)[:n_cells]
        batch = pretraining_batch(
            adata.X,
            cells,
            col_to_vocab,
            TokenIndex(19264),
            MaskingSpec(),
            row_seeds(0, 0, cells),
            args.max_genes,
        )
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
        torch.manual_seed(0)
        module = XTrimoGeneModule(args.config).train()
        closures = step_closures(module, tensors)
        losses = {name: float(fn().detach()) for name, fn in closures.items()}
        optimizer = torch.optim.AdamW(module.parameters(), lr=0.0)  # timing only: weights fixed
        times: dict[str, list[float]] = {name: [] for name in closures}
        for step in range(args.steps + 1):
            order = list(closures) if step % 2 == 0 else list(closures)[::-1]
            for name in order:
                start = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                closures[name]().backward()
                optimizer.step()
                if step > 0:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
        medians = {name: float(np.median(t)) for name, t in times.items()}
        rows_out.append(
            {
                "n_cells": n_cells,
                "visible_tokens_per_cell": float((~batch["padding_mask"]).sum(1).mean()),
                "masked_per_cell": float((~batch["masked_pad"]).sum(1).mean()),
                "loss": losses,
                "step_s": medians,
                "speedup": medians["all positions"] / medians["replaced rows"],
            }
        )
        print(rows_out[-1])
    result = {
        "command": "python benchmarks/speed/bench_decoder_path.py "
        f"--config {args.config} --cells {' '.join(map(str, args.cells))} --steps {args.steps}"
        + (f" --threads {args.threads}" if args.threads is not None else ""),
        "config": args.config,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "rows": rows_out,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decoder_path.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"One AdamW pretraining step of `{args.config}` on real pbmc4k cells, "
        f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}; median of {args.steps} steps. Command: `{result['command']}`",
        "",
        "| cells per step | visible genes / cell | masked / cell | all positions (s) "
        "| replaced rows (s) | speed-up | loss (all / replaced) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows_out:
        lines.append(
            f"| {row['n_cells']} | {row['visible_tokens_per_cell']:.0f} "
            f"| {row['masked_per_cell']:.0f} | {row['step_s']['all positions']:.2f} "
            f"| {row['step_s']['replaced rows']:.2f} | {row['speedup']:.1f}x "
            f"| {row['loss']['all positions']:.6f} / {row['loss']['replaced rows']:.6f} |"
        )
    (args.out / "decoder_path.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
