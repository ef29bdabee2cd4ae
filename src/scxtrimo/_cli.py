"""Command line: ``scxtrimo embed``, ``scxtrimo pretrain`` and ``scxtrimo demo``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("scxtrimo")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _max_genes(text: str) -> int | str:
    return "all" if text == "all" else _positive_int(text)


class _HelpFormatter(argparse.HelpFormatter):
    """Help that shows every option's default, unless it is unset or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.option_strings
            and action.default is not None
            and action.default is not False
            and action.default != argparse.SUPPRESS
            and "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``scxtrimo`` command."""
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="scxtrimo",
        description="xTrimoGene / scFoundation single-cell foundation model for AnnData.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"scxtrimo {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = parser.add_subparsers(dest="command", required=True)
    sub_args = {"formatter_class": _HelpFormatter}

    emb = sub.add_parser(
        "embed",
        **sub_args,
        help="embed the cells of an .h5ad, .zarr, TileDB-SOMA experiment or .h5ad shards",
        description="Embed cells chunk by chunk (resumable). OUT *.h5ad: for one .h5ad input, "
        "a copy of the input + obsm[KEY] (+ uns['scxtrimo']), written at the end through a "
        "temporary file; otherwise obs + obsm[KEY]. OUT *.zarr: an AnnData zarr store with "
        "obs + obsm[KEY], written chunk by chunk (anndata.read_zarr reads it). The input is "
        "read by rows and never modified. A killed run continues with --resume.",
    )
    emb.add_argument(
        "input",
        nargs="+",
        help="input .h5ad (raw counts), AnnData .zarr, TileDB-SOMA experiment path/URI, or "
        "several .h5ad shards read one after the other (their genes may differ)",
    )
    emb.add_argument(
        "-o",
        "--out",
        "--output",
        dest="output",
        type=Path,
        required=True,
        help="output .h5ad or .zarr (not the input)",
    )
    emb.add_argument(
        "--model",
        default=None,
        help="saved XTrimoGene directory, scFoundation models.ckpt, or 'scfoundation' for the "
        "official weights (downloaded once, then cached; offline: pass the file) "
        "(default: shipped model)",
    )
    emb.add_argument("--key-added", default="X_scxtrimo", help="obsm key of the embedding")
    emb.add_argument("--layer", default=None, help="layer with raw counts (default: X)")
    emb.add_argument("--gene-symbols-key", default=None, help="var column with gene symbols")
    emb.add_argument("--gene-ids-key", default=None, help="var column with Ensembl IDs")
    emb.add_argument(
        "--input-type",
        choices=["counts", "log1p"],
        default=None,
        help="raw counts or log1p-normalised values (default: the model's setting, else "
        "counts); bulk profiles are scaled to the median of the whole data set, which a "
        "chunked run cannot know: use scxtrimo.tl.embed(adata, input_type='bulk')",
    )
    emb.add_argument("--total-counts-key", default=None, help="obs column of total counts")
    emb.add_argument(
        "--pooling",
        choices=["all", "max", "mean"],
        default="all",
        help="cell embedding: all = [h(S), h(T), max, mean] (4 x encoder width, the official "
        "one), or the max or mean over the gene tokens",
    )
    emb.add_argument(
        "--target-depth",
        default=None,
        help="target read depth T: e.g. 4, t4, fold:2, add:1 (default: the model's)",
    )
    emb.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="cells per forward pass (default: as many as fit in --max-tokens)",
    )
    emb.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=16_384,
        help="token budget of one forward pass (cells x gene tokens); lower it if memory is short",
    )
    emb.add_argument(
        "--max-genes",
        type=_max_genes,
        default=None,
        help="cap on gene tokens per cell, or 'all' (default: the model's pretraining cap)",
    )
    emb.add_argument(
        "--chunk-size",
        type=_positive_int,
        default=None,
        help="cells per chunk, the unit of writing and resuming (default: 4096)",
    )
    emb.add_argument(
        "--precision",
        choices=("fp32", "bf16", "int8"),
        default="fp32",
        help="fp32; bf16 (autocast; CPU with AVX512-BF16/AMX, or CUDA); int8 (CPU: int8 encoder "
        "linear layers, dynamic activation quantisation)",
    )
    emb.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: auto)")
    emb.add_argument(
        "--devices",
        type=int,
        default=1,
        help="processes/GPUs (Lightning DDP) for N > 1; -1: all GPUs",
    )
    emb.add_argument("--accelerator", default="auto", help="auto, gpu or cpu (for --devices > 1)")
    emb.add_argument(
        "--strategy",
        default=None,
        help="Lightning strategy for --devices > 1 (default: ddp_spawn; ddp under torchrun)",
    )
    emb.add_argument("--num-nodes", type=_positive_int, default=1, help="machines (Lightning DDP)")
    emb.add_argument(
        "--skip-invalid-cells", action="store_true", help="NaN rows for cells with < 2 counts"
    )
    emb.add_argument("--measurement", default="RNA", help="SOMA measurement")
    emb.add_argument(
        "--X-name", dest="x_name", default=None, help="SOMA X layer (default: raw, else data)"
    )
    emb.add_argument(
        "--obs-filter", default=None, help="SOMA obs value filter, e.g. \"tissue == 'blood'\""
    )
    emb.add_argument(
        "--no-copy-input",
        action="store_true",
        help="for an .h5ad output of an .h5ad input: write obs + embedding only",
    )
    group = emb.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue an interrupted run into OUT")
    group.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    pre = sub.add_parser(
        "pretrain",
        **sub_args,
        help="pretrain an xTrimoGene model on an .h5ad of raw counts",
        description="Masked-regression, read-depth-aware pretraining; saves MODEL_DIR.",
    )
    pre.add_argument("input", type=Path, help="input .h5ad with raw counts")
    pre.add_argument("-o", "--output", type=Path, required=True, help="model directory to write")
    pre.add_argument(
        "--config",
        default="small",
        choices=["tiny", "small", "base", "scfoundation"],
        help="model size (ignored with --init)",
    )
    pre.add_argument("--init", default=None, help="continue from a saved model directory")
    pre.add_argument("--max-epochs", type=_positive_int, default=10, help="passes over the cells")
    pre.add_argument("--batch-size", type=_positive_int, default=32, help="cells per step")
    pre.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    pre.add_argument(
        "--max-genes",
        type=_positive_int,
        default=1024,
        help="cap on expressed-gene tokens per cell (a random subset above it)",
    )
    pre.add_argument("--seed", type=int, default=0, help="random seed (weights, masking, order)")
    pre.add_argument("--layer", default=None, help="layer with raw counts (default: X)")
    pre.add_argument("--gene-symbols-key", default=None, help="var column with gene symbols")
    pre.add_argument("--gene-ids-key", default=None, help="var column with Ensembl IDs")
    pre.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, gpu, cpu")
    pre.add_argument("--devices", default="auto", help="Lightning devices: auto, N or -1 (all)")
    pre.add_argument("--precision", default=None, help="e.g. bf16-mixed on GPUs (default: 32-bit)")
    pre.add_argument("--backed", action="store_true", help="read the input backed (large files)")
    pre.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")

    ada = sub.add_parser(
        "adapt",
        **sub_args,
        help="adapt a model to the cells of an .h5ad (self-supervised), then save it",
        description="Trains the top encoder layers on the file's unlabelled cells "
        "(scxtrimo.tl.adapt) and saves MODEL_DIR; embed with it: scxtrimo embed IN -o OUT "
        "--model MODEL_DIR. The input is read, never modified.",
    )
    ada.add_argument("input", type=Path, help="input .h5ad with raw counts")
    ada.add_argument("-o", "--output", type=Path, required=True, help="model directory to write")
    ada.add_argument(
        "--model",
        default=None,
        help="model to start from: a saved model directory, models.ckpt or 'scfoundation' "
        "(default: the shipped model)",
    )
    ada.add_argument(
        "--batch-key", default=None, help="obs column of batches (adds cross-batch positives)"
    )
    ada.add_argument("--max-steps", type=_positive_int, default=1000, help="optimisation steps")
    ada.add_argument(
        "--max-time", type=float, default=None, help="wall-time budget in seconds (default: none)"
    )
    ada.add_argument(
        "--n-layers",
        type=_non_negative_int,
        default=0,
        help="top encoder layers trained with the cell head (0: the head alone)",
    )
    ada.add_argument(
        "--method",
        choices=("full", "lora"),
        default="full",
        help="train the top layers' weights (full) or LoRA adapters on them (lora)",
    )
    ada.add_argument("--lora-rank", type=_positive_int, default=8, help="rank of LoRA adapters")
    ada.add_argument("--batch-size", type=_positive_int, default=256, help="anchor cells per step")
    ada.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    ada.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="folder for a checkpoint every 50 steps; the same command resumes from it",
    )
    ada.add_argument("--seed", type=int, default=0, help="random seed")
    ada.add_argument("--layer", default=None, help="layer with raw counts (default: X)")
    ada.add_argument("--gene-symbols-key", default=None, help="var column with gene symbols")
    ada.add_argument("--gene-ids-key", default=None, help="var column with Ensembl IDs")
    ada.add_argument("--device", default=None, help="cpu, cuda... (default: scxtrimo's setting)")
    ada.add_argument("--backed", action="store_true", help="read the input backed (large files)")
    ada.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")

    demo = sub.add_parser(
        "demo",
        **sub_args,
        help="embed real PBMCs end to end and report kNN cell-type accuracy",
        description="Runs offline on the PBMC dataset shipped with scxtrimo: gets a model "
        "(the shipped pretrained one, or pretrains a small one), embeds, writes "
        "OUT/pbmc4k_scxtrimo.h5ad and a UMAP PNG, and prints a report.",
    )
    demo.add_argument("--out", type=Path, default=Path("scxtrimo_demo"), help="output folder")
    demo.add_argument(
        "--model", default=None, help="saved model directory or models.ckpt (default: shipped)"
    )
    demo.add_argument(
        "--pretrain",
        action="store_true",
        help="pretrain a fresh model first (the shipped model's recipe; tens of minutes on 2 CPU cores)",
    )
    demo.add_argument(
        "--config",
        default="small",
        choices=["tiny", "small", "base", "scfoundation"],
        help="model size with --pretrain",
    )
    demo.add_argument(
        "--max-epochs", type=_positive_int, default=8, help="pretraining epochs with --pretrain"
    )
    demo.add_argument(
        "--max-genes", type=_positive_int, default=256, help="gene tokens per cell when pretraining"
    )
    demo.add_argument(
        "--max-cells",
        type=_positive_int,
        default=None,
        help="subsample cells for quick runs (default: all)",
    )
    demo.add_argument(
        "--no-adapt",
        action="store_true",
        help="skip adapting the model to these cells (scxtrimo.tl.adapt)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    return parser


def _check_output(input_path: Path, output: Path, overwrite: bool) -> None:
    if output.resolve() == input_path.resolve():
        raise SystemExit(
            "error: the output must not be the input file; scxtrimo never overwrites its input."
        )
    if output.exists() and not overwrite:
        raise SystemExit(f"error: {output} exists; pass --overwrite to replace it.")


def _is_uri(text: str) -> bool:
    return "://" in text


def run_embed(args: argparse.Namespace) -> None:
    """``scxtrimo embed``: chunked, resumable embedding into an .h5ad or a .zarr store."""
    from .tl import embed_to_store

    for item in args.input:
        if not _is_uri(item) and not Path(item).exists():
            raise SystemExit(f"error: input {item} not found.")
        if not _is_uri(item) and Path(item).resolve() == args.output.resolve():
            raise SystemExit(
                "error: the output must not be the input file; scxtrimo never overwrites its input."
            )
    if args.output.suffix not in (".h5ad", ".zarr"):
        raise SystemExit(f"error: the output must end in .h5ad or .zarr, got {args.output}.")
    source = args.input[0] if len(args.input) == 1 else list(args.input)
    try:
        embed_to_store(
            source,
            args.output,
            args.model,
            key_added=args.key_added,
            layer=args.layer,
            gene_symbols_key=args.gene_symbols_key,
            gene_ids_key=args.gene_ids_key,
            input_type=args.input_type,
            total_counts_key=args.total_counts_key,
            pooling=args.pooling,
            target_depth=args.target_depth,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            max_genes=args.max_genes,
            invalid_cells="skip" if args.skip_invalid_cells else "raise",
            precision=args.precision,
            chunk_size=args.chunk_size,
            resume=args.resume,
            overwrite=args.overwrite,
            devices=args.devices,
            accelerator=args.accelerator,
            strategy=args.strategy,
            num_nodes=args.num_nodes,
            device=args.device,
            copy_input=False if args.no_copy_input else None,
            measurement_name=args.measurement,
            X_name=args.x_name,
            obs_value_filter=args.obs_filter,
        )
    except FileExistsError as err:
        raise SystemExit(f"error: {err}") from err


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


def run_adapt(args: argparse.Namespace) -> None:
    """``scxtrimo adapt``: adapt a model to the input's cells and save it."""
    import anndata as ad

    from .tl import adapt

    if not args.input.exists():
        raise SystemExit(f"error: input file {args.input} not found.")
    if args.output.exists() and any(args.output.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: {args.output} exists and is not empty; pass --overwrite.")
    adata = ad.read_h5ad(args.input, backed="r" if args.backed else None)
    model = adapt(
        adata,
        args.model,
        batch_key=args.batch_key,
        layer=args.layer,
        gene_symbols_key=args.gene_symbols_key,
        gene_ids_key=args.gene_ids_key,
        max_steps=args.max_steps,
        max_time=args.max_time,
        n_layers=args.n_layers,
        method=args.method,
        lora_rank=args.lora_rank,
        batch_size=args.batch_size,
        lr=args.lr,
        checkpoint_dir=args.checkpoint_dir,
        seed=args.seed,
        device=args.device,
    )
    model.save(args.output, overwrite=args.overwrite)
    result = model.adaptation_["result"]
    logger.info(
        "Adapted on %d cells in %.0f s (%d steps); saved the model to %s.",
        model.adaptation_["n_cells"],
        model.adaptation_["wall_seconds"],
        result["steps"],
        args.output,
    )


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
    elif args.command == "adapt":
        run_adapt(args)
    else:
        from ._demo import run_demo

        run_demo(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
