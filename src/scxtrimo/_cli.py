"""Command line: ``scxtrimo embed``, ``scxtrimo pretrain`` and ``scxtrimo demo``."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("scxtrimo")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _max_genes(text: str) -> int | str:
    return "all" if text == "all" else _positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``scxtrimo`` command."""
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="scxtrimo",
        description="xTrimoGene / scFoundation single-cell foundation model for AnnData.",
    )
    parser.add_argument("--version", action="version", version=f"scxtrimo {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = parser.add_subparsers(dest="command", required=True)

    emb = sub.add_parser(
        "embed",
        help="embed the cells of an .h5ad file",
        description="Embed cells; writes OUTPUT = INPUT + obsm[KEY] (+ uns['scxtrimo']). "
        "The input is read backed, chunk by chunk, and never modified; X is not loaded into "
        "memory and the output is written atomically.",
    )
    emb.add_argument("input", type=Path, help="input .h5ad with raw counts")
    emb.add_argument(
        "-o", "--output", type=Path, required=True, help="output .h5ad (not the input)"
    )
    emb.add_argument(
        "--model",
        default=None,
        help="saved XTrimoGene directory or scFoundation models.ckpt (default: shipped model)",
    )
    emb.add_argument("--key-added", default="X_scxtrimo", help="obsm key (default X_scxtrimo)")
    emb.add_argument("--layer", default=None, help="layer with raw counts (default X)")
    emb.add_argument("--gene-symbols-key", default=None, help="var column with gene symbols")
    emb.add_argument("--gene-ids-key", default=None, help="var column with Ensembl IDs")
    emb.add_argument("--pooling", choices=["all", "max", "mean"], default="all")
    emb.add_argument("--target-depth", default=None, help="e.g. 4, t4, fold:2, add:1")
    emb.add_argument("--batch-size", type=_positive_int, default=None)
    emb.add_argument("--max-tokens", type=_positive_int, default=16_384)
    emb.add_argument(
        "--max-genes",
        type=_max_genes,
        default=None,
        help="cap on gene tokens per cell, or 'all' (default: the model's pretraining cap)",
    )
    emb.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: auto)")
    emb.add_argument(
        "--skip-invalid-cells", action="store_true", help="NaN rows for cells with < 2 counts"
    )
    emb.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")

    pre = sub.add_parser(
        "pretrain",
        help="pretrain an xTrimoGene model on an .h5ad of raw counts",
        description="Masked-regression, read-depth-aware pretraining; saves MODEL_DIR.",
    )
    pre.add_argument("input", type=Path, help="input .h5ad with raw counts")
    pre.add_argument("-o", "--output", type=Path, required=True, help="model directory to write")
    pre.add_argument("--config", default="small", help="tiny, small, base or scfoundation")
    pre.add_argument("--init", default=None, help="continue from a saved model directory")
    pre.add_argument("--max-epochs", type=_positive_int, default=10)
    pre.add_argument("--batch-size", type=_positive_int, default=32)
    pre.add_argument("--lr", type=float, default=1e-3)
    pre.add_argument("--max-genes", type=_positive_int, default=1024)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--layer", default=None)
    pre.add_argument("--gene-symbols-key", default=None)
    pre.add_argument("--gene-ids-key", default=None)
    pre.add_argument("--accelerator", default="auto")
    pre.add_argument("--devices", default="auto")
    pre.add_argument("--precision", default=None, help="e.g. bf16-mixed on GPUs")
    pre.add_argument("--backed", action="store_true", help="read the input backed (large files)")
    pre.add_argument("--overwrite", action="store_true")

    demo = sub.add_parser(
        "demo",
        help="embed real PBMCs end to end and report kNN cell-type accuracy",
        description="Runs offline on the PBMC dataset shipped with scxtrimo: gets a model "
        "(the shipped pretrained one, or pretrains a small one), embeds, writes "
        "OUT/pbmc4k_scxtrimo.h5ad and a UMAP PNG, and prints a report.",
    )
    demo.add_argument("--out", type=Path, default=Path("scxtrimo_demo"), help="output folder")
    demo.add_argument("--model", default=None, help="model to use instead of the default")
    demo.add_argument(
        "--pretrain",
        action="store_true",
        help="pretrain a fresh model first (the shipped model's recipe, ~6 min on 2 CPU cores)",
    )
    demo.add_argument("--config", default="small")
    demo.add_argument("--max-epochs", type=_positive_int, default=8)
    demo.add_argument(
        "--max-genes", type=_positive_int, default=256, help="gene tokens per cell when pretraining"
    )
    demo.add_argument(
        "--max-cells", type=_positive_int, default=None, help="subsample cells (quick runs)"
    )
    demo.add_argument("--seed", type=int, default=0)
    return parser


def _check_output(input_path: Path, output: Path, overwrite: bool) -> None:
    if output.resolve() == input_path.resolve():
        raise SystemExit(
            "error: the output must not be the input file; scxtrimo never overwrites its input."
        )
    if output.exists() and not overwrite:
        raise SystemExit(f"error: {output} exists; pass --overwrite to replace it.")


def run_embed(args: argparse.Namespace) -> None:
    """``scxtrimo embed``: stream a backed file through the model, write a copy + embedding."""
    import anndata as ad
    import h5py
    from anndata.io import write_elem

    from .tl import embed

    if not args.input.exists():
        raise SystemExit(f"error: input file {args.input} not found.")
    _check_output(args.input, args.output, args.overwrite)
    adata = ad.read_h5ad(args.input, backed="r")
    try:
        embed(
            adata,
            args.model,
            key_added=args.key_added,
            layer=args.layer,
            gene_symbols_key=args.gene_symbols_key,
            gene_ids_key=args.gene_ids_key,
            pooling=args.pooling,
            target_depth=args.target_depth,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            max_genes=args.max_genes,
            invalid_cells="skip" if args.skip_invalid_cells else "raise",
            device=args.device,
        )
        emb = adata.obsm[args.key_added]
        report = adata.uns["scxtrimo"][args.key_added]
    finally:
        adata.file.close()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=args.output.parent, prefix=f".{args.output.name}.", suffix=".tmp"
    )
    os.close(fd)
    try:
        shutil.copyfile(args.input, tmp)  # byte copy: X is never loaded into memory
        with h5py.File(tmp, "r+") as f:
            obsm = f.require_group("obsm")
            if args.key_added in obsm:
                del obsm[args.key_added]
            write_elem(obsm, args.key_added, emb)
            uns = f.require_group("uns")
            existing = dict(ad.io.read_elem(uns["scxtrimo"])) if "scxtrimo" in uns else {}
            existing[args.key_added] = report
            if "scxtrimo" in uns:
                del uns["scxtrimo"]
            write_elem(uns, "scxtrimo", existing)
        os.replace(tmp, args.output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    logger.info("Wrote %s (obsm[%r], %d x %d).", args.output, args.key_added, *emb.shape)


def run_pretrain(args: argparse.Namespace) -> None:
    """``scxtrimo pretrain``: set up, train and save a model."""
    import anndata as ad

    from .model import XTrimoGene

    if not args.input.exists():
        raise SystemExit(f"error: input file {args.input} not found.")
    if args.output.exists() and any(args.output.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: {args.output} exists and is not empty; pass --overwrite.")
    adata = ad.read_h5ad(args.input, backed="r" if args.backed else None)
    setup = {
        "layer": args.layer,
        "gene_symbols_key": args.gene_symbols_key,
        "gene_ids_key": args.gene_ids_key,
    }
    if args.init:
        model = XTrimoGene.load(args.init, adata=adata)
    else:
        XTrimoGene.setup_anndata(adata, **setup)
        model = XTrimoGene(adata, config=args.config, seed=args.seed)
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    model.train(
        max_epochs=args.max_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_genes=args.max_genes,
        seed=args.seed,
        accelerator=args.accelerator,
        devices=devices,
        precision=args.precision,
    )
    model.save(args.output, overwrite=args.overwrite)
    logger.info("Saved the model to %s.", args.output)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scxtrimo`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from ._settings import settings

    if args.quiet:
        settings.verbosity = "warning"
        settings.progress_bar = False
    if args.command == "embed":
        run_embed(args)
    elif args.command == "pretrain":
        run_pretrain(args)
    else:
        from ._demo import run_demo

        run_demo(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
