"""Pretraining runs: build a multi-study corpus, start the gene bias, train through Lightning."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scxtrimo.data._tokens import MaskingSpec, TokenIndex

from ._corpus import CorpusPart, PretrainingCorpus
from ._datamodule import PretrainingDataModule, PretrainingDataset
from ._gene_bias import expected_masked_values
from ._source_corpus import as_row_source, parts_from_source

if TYPE_CHECKING:
    from anndata import AnnData

#: The second (contrastive) view: always down-sampled, independent masks.
DEFAULT_VIEW_MASKING = MaskingSpec(downsample_prob=1.0)


def trainer_defaults(
    trainer_kwargs: dict[str, Any],
    *,
    gradient_clip_val: float,
    precision: Any,
    strategy: Any = None,
    num_nodes: int | None = None,
) -> dict[str, Any]:
    """Lightning trainer settings shared by pretraining and fine-tuning (the caller's win).

    Our batch sampler splits every global batch between ranks itself, so Lightning must not
    wrap it in a ``DistributedSampler``.
    """
    from scxtrimo._settings import settings

    out = dict(trainer_kwargs)
    out.setdefault("gradient_clip_val", gradient_clip_val)
    out.setdefault("enable_progress_bar", settings.progress_bar)
    out.setdefault("check_val_every_n_epoch", 1)
    out.setdefault("num_sanity_val_steps", 0)
    out.setdefault("deterministic", "warn")
    out.setdefault("benchmark", False)
    out.setdefault("use_distributed_sampler", False)
    if precision is not None:
        out["precision"] = precision
    if strategy is not None:
        out["strategy"] = strategy
    if num_nodes is not None:
        out["num_nodes"] = int(num_nodes)
    return out


def fit(
    model: Any,
    plan: Any,
    datamodule: Any,
    *,
    max_epochs: int,
    accelerator: str,
    devices: Any,
    trainer_kwargs: dict[str, Any],
) -> Any:
    """Run the model's scvi-tools train runner over ``plan`` and ``datamodule``.

    Shared by pretraining and fine-tuning. The history is kept as plain floats afterwards
    (Lightning logs 0-d tensors), for JSON and plotting.
    """
    runner = model._train_runner_cls(
        model,
        training_plan=plan,
        data_splitter=datamodule,
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=devices,
        **trainer_kwargs,
    )
    out = runner()
    if model.history_:
        model.history_ = {k: v.astype(float) for k, v in model.history_.items()}
    return out


def _source_name(source: Any, position: int) -> str:
    if isinstance(source, str | os.PathLike):
        return str(source)
    return f"corpus entry #{position} ({getattr(source, 'name', None) or type(source).__name__})"


def _open_source(source: Any, name: str) -> AnnData:
    import anndata as ad

    if isinstance(source, ad.AnnData):
        return source
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Pretraining corpus file {name} does not exist.")
        try:
            return ad.read_h5ad(path, backed="r")
        except OSError as err:
            raise ValueError(
                f"Pretraining corpus file {name} is not a readable h5ad: {err}"
            ) from err
    raise TypeError(
        f"{name}: a pretraining corpus holds AnnData objects, .h5ad or .zarr paths, TileDB-SOMA "
        f"experiments or row sources (scxtrimo.data.open_source), not {type(source).__name__}."
    )


def build_corpus(
    model: Any,
    sources: Sequence[Any],
    *,
    max_genes: int | None,
    invalid_cells: str = "skip",
) -> PretrainingCorpus:
    """Check every study of a corpus before any training, and map each onto the vocabulary.

    Parameters
    ----------
    model
        The :class:`~scxtrimo.model.XTrimoGene` to train (its set-up arguments say how to read
        the studies; its vocabulary maps their genes).
    sources
        Each with its own gene set and raw counts: AnnData objects (in memory or backed; views
        of held-out splits are fine), ``.h5ad`` paths (read backed), or inputs streamed in row
        chunks (:func:`~scxtrimo.train.part_from_source`): a row source
        (:class:`~scxtrimo.data.SomaSource` with its ``obs_value_filter``,
        :class:`~scxtrimo.data.ZarrSource`, :class:`~scxtrimo.data.H5adSource`,
        :class:`~scxtrimo.data.ConcatSource`...), the path or URI of a TileDB-SOMA experiment,
        an AnnData ``.zarr`` store, or a list of such inputs (shards: one study if they share
        their genes, else one study each).
    max_genes
        Gene-token cap of the run (``None``: all).
    invalid_cells
        Cells with fewer than 2 in-vocabulary counts are ``"skip"``-ped or ``"raise"``.

    Raises
    ------
    FileNotFoundError
        Naming the entry: a path that does not exist, or no SOMA experiment at a URI.
    ValueError
        Naming the study: an empty study, no gene in the vocabulary, non-count values, or no
        valid cell. Nothing the user passed is changed.
    """
    if isinstance(sources, str | os.PathLike) or not isinstance(sources, Sequence):
        sources = [sources]
    if len(sources) == 0:
        raise ValueError("The pretraining corpus is empty; pass AnnData objects or .h5ad paths.")
    if model.setup_args["input_type"] != "counts":
        raise ValueError(
            "Pretraining needs raw counts (down-sampling and depth tokens are computed from "
            "them); set the model up with input_type='counts'."
        )
    parts = []
    for position, source in enumerate(sources):
        name = _source_name(source, position)
        row_source = as_row_source(source, name, layer=model.setup_args.get("layer"))
        if row_source is not None:  # SOMA, .zarr, shards, row sources: streamed in row chunks
            kw = {"max_genes": max_genes, "invalid_cells": invalid_cells}
            parts.extend(parts_from_source(model, row_source, name, **kw))
            continue
        adata = _open_source(source, name)
        if adata.n_obs == 0 or adata.n_vars == 0:
            raise ValueError(
                f"Pretraining corpus entry {name} is empty ({adata.n_obs} cells x "
                f"{adata.n_vars} genes)."
            )
        try:
            prep = model.prepare_input(
                adata, invalid=invalid_cells, max_genes="all" if max_genes is None else max_genes
            )
        except (ValueError, KeyError) as err:
            message = err.args[0] if err.args else str(err)
            raise ValueError(f"Pretraining corpus entry {name}: {message}") from err
        if len(prep.cells) == 0:
            raise ValueError(f"Pretraining corpus entry {name} has no cell the model can use.")
        parts.append(
            CorpusPart(
                name, prep.matrix, prep.mapping.col_to_vocab, prep.cells, prep.stats.n_tokens
            )
        )
    return PretrainingCorpus(parts, model.config.n_genes)


def corpus_gene_bias(
    corpus: PretrainingCorpus, train_cells: np.ndarray, masking: MaskingSpec
) -> np.ndarray:
    """Each gene's expected masked target over the studies that measured it (training cells).

    The per-study values of :func:`~scxtrimo.train.expected_masked_values` are averaged with
    the study's number of training cells as weight, counting only studies that measured the
    gene (an unmeasured gene is unknown there, not zero).
    """
    n_genes = corpus.n_genes
    total = np.zeros(n_genes + 2, dtype=np.float64)
    weight = np.zeros(n_genes + 2, dtype=np.float64)
    part_of = corpus.part_of(train_cells)
    for i, part in enumerate(corpus.parts):
        rows = train_cells[part_of == i] - corpus.offsets[i]
        if rows.size == 0:
            continue
        start = expected_masked_values(part.matrix, part.col_to_vocab, rows, n_genes, masking)
        measured = np.concatenate([corpus.measured[i], [False, False]])
        total[measured] += rows.size * start[measured]
        weight[measured] += rows.size
    return (total / np.maximum(weight, 1)).astype(np.float32)


def run_pretraining(
    model: Any,
    sources: Sequence[Any],
    *,
    max_epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int | None,
    train_size: float,
    masking: MaskingSpec,
    view_masking: MaskingSpec | None,
    contrastive_weight: float,
    temperature: float,
    max_genes: int | None,
    seed: int,
    accelerator: str,
    devices: Any,
    strategy: Any,
    num_nodes: int | None,
    precision: Any,
    gradient_clip_val: float,
    num_workers: int,
    invalid_cells: str,
    drop_last: bool,
    plan_kwargs: dict | None,
    trainer_kwargs: dict,
):
    """Pretrain ``model`` on a corpus; called by :meth:`~scxtrimo.model.XTrimoGene.train`.

    The objective: masked regression of the full-depth cell from a (randomly) down-sampled
    view (scFoundation's read-depth-aware task), plus ``contrastive_weight`` x InfoNCE between
    the pooled embeddings of that view and a second, independently down-sampled and masked
    view of the same cell (off when ``contrastive_weight == 0``).
    """
    corpus = build_corpus(model, sources, max_genes=max_genes, invalid_cells=invalid_cells)
    if len(corpus.cells) < 2:
        raise ValueError("Training needs at least 2 valid cells.")
    use_views = contrastive_weight > 0
    dataset = PretrainingDataset(
        corpus,
        TokenIndex(model.config.n_genes),
        masking,
        seed=seed,
        max_genes=max_genes,
        view_masking=(view_masking or DEFAULT_VIEW_MASKING) if use_views else None,
    )
    datamodule = PretrainingDataModule(
        dataset,
        corpus.n_tokens,
        corpus.cells,
        batch_size=batch_size,
        train_size=train_size,
        seed=seed,
        num_workers=num_workers,
        pin_memory=accelerator in ("gpu", "cuda")
        or (accelerator == "auto" and torch.cuda.is_available()),
        groups=corpus.part_of(np.arange(corpus.n_cells)),
        drop_last=drop_last,
    )
    module = model.module
    if module.expression_bias is not None and not model.is_trained_:
        # A fresh model starts predicting each gene's expected masked value (training cells
        # only), so its steps go into learning what a cell's context adds.
        start = corpus_gene_bias(corpus, datamodule.train_idx, masking)
        with torch.no_grad():
            module.expression_bias.copy_(torch.from_numpy(start))
    plan_kwargs = {"cell_mean": True, **(plan_kwargs or {})}  # cell_mean: a module.loss argument
    plan = model._training_plan_cls(
        module,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        contrastive_weight=contrastive_weight,
        temperature=temperature,
        **plan_kwargs,
    )
    kwargs = trainer_defaults(
        trainer_kwargs,
        gradient_clip_val=gradient_clip_val,
        precision=precision,
        strategy=strategy,
        num_nodes=num_nodes,
    )
    torch.manual_seed(seed)
    module.train()
    out = fit(
        model,
        plan,
        datamodule,
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=devices,
        trainer_kwargs=kwargs,
    )
    module.eval()
    model.training_args_ = {
        "max_epochs": max_epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "train_size": train_size,
        "max_genes": max_genes,
        "seed": seed,
        "masking": masking.__dict__,
        "view_masking": dataset.view_masking.__dict__ if dataset.view_masking else None,
        "contrastive_weight": contrastive_weight,
        "temperature": temperature,
        "corpus": corpus.summary(),
        "finetune": None,
    }
    # Embed cells the way the model saw them in pretraining.
    model.default_max_genes_ = max_genes
    return out
