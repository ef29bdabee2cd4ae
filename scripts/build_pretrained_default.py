"""Pretrain scxtrimo's shipped default model from scratch, and package it (one command).

Usage::

    python scripts/build_pretrained_default.py --out runs/default --ship

trains the ``small`` configuration on the training parts of the four shared studies
(``benchmarks/evaluation/default_model_splits.py``: pbmc4k 90%, Kang 12k minus two donors, CellBench
CEL-seq2, Kang IFN-beta controls; every evaluation part is left out) with the default recipe:
read-depth-aware masked regression plus InfoNCE between neighbour pairs through a 64-d cell
head, 5,000 steps of 32 cells, the 128 highest genes of a cell, 15% of its non-zero genes
masked, the decoder on every second step (``--regression-every 2``; the steps between are
encoder-only). Seeded; the wall time is printed. ``OUT/final`` is the trained model;
``OUT/final_shipped`` the same without the cell head and with a 256-gene cap at inference
(:func:`shipped_variant`). ``--ship`` then packages ``final_shipped``: it writes
``src/scxtrimo/_resources/pretrained/`` with the weights rounded to float16 (the shipped model
*is* the rounded one: every number reported for it is measured after rounding).

``--cell-head MODEL_DIR`` fits the default's cell head (``scxtrimo.module.CellHead``, the
recipe of ``tl.adapt``) on the frozen encoder of a saved model over the same training corpus:
positives are each cell's neighbours in its own study's PCA, and every step's anchors come from
one study (studies have different gene panels: none is another's negative). The result is
saved to ``OUT/final_head`` (``--ship`` packages it).

Ablations (same budget, one switch each): ``--no-depth-pairs`` (no down-sampling, so no
shallow/deep pairs), ``--no-contrastive`` (masked regression only), ``--one-study`` (pbmc4k
only); ``--max-cells-per-study N`` caps every study's training cells (a balanced
corpus). ``--package MODEL_DIR`` packages an existing saved model without training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "src" / "scxtrimo" / "_resources" / "pretrained"
sys.path.insert(0, str(ROOT / "benchmarks" / "evaluation"))


def package(model_dir: Path, notes: str = "") -> Path:
    """Round the weights of a saved model to float16 and copy it into the package resources."""
    from scxtrimo.model._io import empty_registry

    state = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)
    rounded = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    meta = json.loads((model_dir / "model.json").read_text())
    meta["source"] = "scxtrimo-default"
    # Shipped for inference: the registry of the training reference (its 33,694 gene names) is
    # not needed to load or embed, and would be 0.4 MB of package data; keep the input settings.
    meta["registry"] = empty_registry("XTrimoGene", meta["setup_args"])
    meta["shipped_default"] = {"weights_dtype": "float16", "notes": notes}
    TARGET.mkdir(parents=True, exist_ok=True)
    tmp = TARGET / "model.pt.tmp"
    torch.save(rounded, tmp)
    tmp.replace(TARGET / "model.pt")
    (TARGET / "model.json").write_text(json.dumps(meta, indent=1))
    size = (TARGET / "model.pt").stat().st_size / 2**20
    print(f"wrote {TARGET} ({size:.1f} MiB)")
    return TARGET


class SaveEvery:
    """Lightning callback: save the model every ``every`` steps (intermediate checkpoints)."""

    def __new__(cls, model, out: Path, every: int):  # noqa: D102 (a factory, not a method)
        from lightning.pytorch.callbacks import Callback

        class _Save(Callback):
            def on_train_batch_end(self, trainer, *args, **kwargs):
                step = trainer.global_step
                STEPS_DONE[0] = step  # the wall-time guard may stop before --steps
                if every > 0 and step % every == 0 and trainer.is_global_zero:
                    model.module.eval()
                    model.is_trained_ = True
                    model.save(out / f"step{step:05d}", overwrite=True)
                    model.is_trained_ = False
                    model.module.train()
                    elapsed = time.time() - START
                    print(f"step {step}: saved ({elapsed / 60:.1f} min)", flush=True)

        return _Save()


START = time.time()
STEPS_DONE = [0]


def shipped_variant(model, inference_max_genes: int, *, keep_head: bool = False):
    """A copy of a pretrained model as it ships: the cell head dropped, the inference gene cap.

    The InfoNCE term was taken through the head, but as with projection heads in contrastive
    learning the pooled vector *before* it is the better embedding (measured on the held-out
    splits, ``docs/evaluation.md``), so the head is dropped unless ``keep_head``. The model
    trains on its ``--max-genes`` highest genes per cell, and embeds with
    ``inference_max_genes`` (256 beat 128 and tied 512 on the held-out splits).
    """
    shipped = model.copy()
    if not keep_head and shipped.module.cell_head is not None:
        shipped.module.cell_head = None
        shipped.module.config = shipped.module.config.replace(cell_head_dim=0)
        shipped.config_ = shipped.module.config.to_dict()
    shipped.default_max_genes_ = inference_max_genes
    shipped.is_trained_ = True
    return shipped


def fit_corpus_head(model, corpus, seed: int, steps: int) -> dict:
    """Give ``model`` a cell head fitted on ``corpus`` (one AnnData per study), in place."""
    from scxtrimo.data._matrix import rows_as_csr
    from scxtrimo.train import (
        AdaptationSpec,
        PositivePairs,
        TokenCache,
        adapt_module,
        cache_frozen_layers,
        expression_features,
        positive_pairs,
    )

    pooled, neighbours, groups, offset = [], [], [], 0
    depth = model.config.encoder_depth
    for number, study in enumerate(corpus):
        prep = model.prepare_input(study, invalid="skip")
        cells = np.unique(prep.cells)
        cache = cache_frozen_layers(
            model.module, prep, cells, depth, device=torch.device("cpu"), progress_bar=True
        )
        pairs = positive_pairs(expression_features(rows_as_csr(prep.matrix, cells), seed=seed))
        pooled.append(cache.hidden)
        neighbours.append(pairs.neighbours + offset)
        groups.append(np.full(len(cells), number))
        offset += len(cells)
        print(
            f"study {number}: {len(cells)} cells cached ({time.time() - START:.0f} s)", flush=True
        )
    pairs = PositivePairs(
        np.concatenate(neighbours), np.zeros(offset + 1, np.int64), np.empty(0, np.int64)
    )
    spec = AdaptationSpec(max_steps=steps, seed=seed)
    result = adapt_module(
        model.module, TokenCache(torch.cat(pooled)), pairs, spec, groups=np.concatenate(groups)
    )
    model.config_ = model.module.config.to_dict()
    model.adaptation_ = {
        "settings": spec.to_dict(),
        "corpus_cells": offset,
        "n_studies": len(corpus),
        "result": result.to_dict(),
    }
    return model.adaptation_


def main() -> None:
    """Train (and optionally package) the default model."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "default")
    parser.add_argument("--data", type=Path, default=None, help="shared data folder")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-genes", type=int, default=128, help="gene tokens in training")
    parser.add_argument(
        "--inference-max-genes", type=int, default=256, help="gene tokens when embedding"
    )
    parser.add_argument(
        "--nonzero-prob", type=float, default=0.15, help="share of non-zero genes masked"
    )
    parser.add_argument(
        "--regression-every", type=int, default=2, help="decoder on every k-th step (neighbours)"
    )
    parser.add_argument(
        "--keep-head", action="store_true", help="ship the cell head trained with the encoder"
    )
    parser.add_argument("--contrastive-weight", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument(
        "--positives", choices=("views", "neighbours"), default="neighbours", help="InfoNCE pairs"
    )
    parser.add_argument("--cell-head-dim", type=int, default=64, help="0: no cell head")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-minutes", type=float, default=120.0, help="wall-time guard")
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-depth-pairs", action="store_true")
    parser.add_argument("--no-contrastive", action="store_true")
    parser.add_argument("--one-study", action="store_true")
    parser.add_argument(
        "--max-cells-per-study", type=int, default=None, help="cap each study (balance)"
    )
    parser.add_argument("--ship", action="store_true")
    parser.add_argument("--package", type=Path, default=None, help="package MODEL_DIR only")
    parser.add_argument("--notes", default="")
    parser.add_argument(
        "--cell-head", type=Path, default=None, help="fit a cell head on MODEL_DIR's encoder"
    )
    parser.add_argument("--head-steps", type=int, default=2000)
    args = parser.parse_args()
    if args.package is not None:
        package(args.package, args.notes)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    import default_model_splits as splits_mod
    from scxtrimo.data import MaskingSpec
    from scxtrimo.model import XTrimoGene

    splits = splits_mod.all_splits(args.data)
    if args.cell_head is not None:
        model = XTrimoGene.load(args.cell_head)
        record = fit_corpus_head(
            model, splits_mod.training_corpus(splits), args.seed, args.head_steps
        )
        model.save(args.out / "final_head", overwrite=True)
        wall = time.time() - START
        print(f"cell head fitted in {wall / 60:.1f} min on {record['corpus_cells']} cells")
        if args.ship:
            package(args.out / "final_head", args.notes or "cell head fitted on the corpus")
        return
    studies = ("pbmc4k",) if args.one_study else None
    corpus = splits_mod.training_corpus(splits, studies)
    if args.max_cells_per_study:  # balance the studies: cap each one's training cells (seeded)
        rng = np.random.default_rng(args.seed)
        corpus = [
            a[np.sort(rng.choice(a.n_obs, args.max_cells_per_study, replace=False))]
            if a.n_obs > args.max_cells_per_study
            else a
            for a in corpus
        ]
    down = 0.0 if args.no_depth_pairs else None
    masking = MaskingSpec(
        nonzero_prob=args.nonzero_prob,
        zero_prob=0.01,
        **({} if down is None else {"downsample_prob": down}),
    )
    view_masking = MaskingSpec(zero_prob=0.01, downsample_prob=1.0 if down is None else down)
    weight = 0.0 if args.no_contrastive else args.contrastive_weight

    reference = splits["pbmc4k"].adata
    XTrimoGene.setup_anndata(reference)
    model = XTrimoGene(reference, config="small", seed=args.seed)
    print(
        f"pretraining {sum(a.n_obs for a in corpus)} cells from {len(corpus)} studies, "
        f"{args.steps} steps of {args.batch_size} cells (threads={torch.get_num_threads()}), "
        f"InfoNCE on {args.positives}, cell head {args.cell_head_dim}",
        flush=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    model.train(
        corpus=corpus,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        max_genes=args.max_genes,
        masking=masking,
        view_masking=view_masking,
        contrastive_weight=weight,
        temperature=args.temperature,
        positives=args.positives,
        cell_head_dim=args.cell_head_dim if args.positives == "neighbours" else 0,
        regression_every=args.regression_every,
        train_size=0.98,
        seed=args.seed,
        accelerator="auto",
        devices=1,
        drop_last=True,
        max_time={"minutes": args.max_minutes},
        check_val_every_n_epoch=1_000_000,  # validation by the evaluation command instead
        callbacks=[SaveEvery(model, args.out, args.save_every)],
    )
    model.default_target_depth_ = "fold:1"
    model.save(args.out / "final", overwrite=True)
    shipped = shipped_variant(model, args.inference_max_genes, keep_head=args.keep_head)
    shipped.save(args.out / "final_shipped", overwrite=True)
    wall = time.time() - START
    (args.out / "wall_time.json").write_text(
        json.dumps({"wall_s": wall, "steps_done": STEPS_DONE[0], "args": vars(args)}, default=str)
    )
    print(
        f"wall time {wall / 60:.1f} min, {STEPS_DONE[0]} of {args.steps} steps; "
        f"saved {args.out / 'final'}",
        flush=True,
    )
    if args.ship:
        notes = args.notes or f"{STEPS_DONE[0]} steps, {wall / 60:.0f} min"
        package(args.out / "final_shipped", notes)


if __name__ == "__main__":
    main()
