"""Pretraining runs: build a multi-study corpus, start the gene bias, train through Lightning."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scxtrimo.data._tokens import MaskingSpec, TokenIndex
from scxtrimo.inference import InputSettings, prepare_input

from ._corpus import CorpusPart, PretrainingCorpus
from ._datamodule import PretrainingDataModule, PretrainingDataset
from ._gene_bias import expected_masked_values
from ._plan import XTrimoGeneTrainingPlan
from ._positives import corpus_neighbours
from ._settings import Fit, PretrainingObjective, TrainingResult, TrainingSettings
from ._source_corpus import as_row_source, parts_from_source

if TYPE_CHECKING:
    from anndata import AnnData

    from scxtrimo.module import XTrimoGeneModule

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
    module: XTrimoGeneModule,
    sources: Sequence[Any],
    *,
    input_settings: InputSettings | None = None,
    max_genes: int | None,
    invalid_cells: str = "skip",
) -> PretrainingCorpus:
    """Check every study of a corpus before any training, and map each onto the vocabulary.

    Parameters
    ----------
    module
        The network to train (``model.module``); its vocabulary maps the studies' genes.
    sources
        Each with its own gene set and raw counts: AnnData objects (in memory or backed; views
        of held-out splits are fine), ``.h5ad`` paths (read backed), or inputs streamed in row
        chunks (:func:`~scxtrimo.train.part_from_source`): a row source
        (:class:`~scxtrimo.data.SomaSource` with its ``obs_value_filter``,
        :class:`~scxtrimo.data.ZarrSource`, :class:`~scxtrimo.data.H5adSource`,
        :class:`~scxtrimo.data.ConcatSource`...), the path or URI of a TileDB-SOMA experiment,
        an AnnData ``.zarr`` store, or a list of such inputs (shards: one study if they share
        their genes, else one study each).
    input_settings
        How to read the studies (the model's :attr:`~scxtrimo.model.XTrimoGene.input_settings`;
        raw counts); ``None``: the defaults.
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
    settings = input_settings or InputSettings()
    if settings.input_type != "counts":
        raise ValueError(
            "Pretraining needs raw counts (down-sampling and depth tokens are computed from "
            "them); set the model up with input_type='counts'."
        )
    parts = []
    for position, source in enumerate(sources):
        name = _source_name(source, position)
        row_source = as_row_source(source, name, layer=settings.layer)
        if row_source is not None:  # SOMA, .zarr, shards, row sources: streamed in row chunks
            kw = {"max_genes": max_genes, "invalid_cells": invalid_cells}
            parts.extend(parts_from_source(module, row_source, name, input_settings=settings, **kw))
            continue
        adata = _open_source(source, name)
        if adata.n_obs == 0 or adata.n_vars == 0:
            raise ValueError(
                f"Pretraining corpus entry {name} is empty ({adata.n_obs} cells x "
                f"{adata.n_vars} genes)."
            )
        try:
            prep = prepare_input(
                adata,
                settings,
                n_genes=module.config.n_genes,
                invalid=invalid_cells,
                max_genes="all" if max_genes is None else max_genes,
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
    return PretrainingCorpus(parts, module.config.n_genes)


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


@torch.no_grad()
def start_cell_head(
    module: XTrimoGeneModule,
    dataset: PretrainingDataset,
    train_cells: np.ndarray,
    width: int,
    seed: int,
    n_cells: int = 512,
) -> None:
    """Give ``module`` a new cell head (hidden layer ``8 x width``), standardised on the pooled
    vectors of training cells.

    The standardisation (a fixed shift and scale) is taken from up to ``n_cells`` training
    cells, drawn with ``seed``, as the untrained encoder pools them, in batches of 64.
    """
    with torch.random.fork_rng(devices=[]):  # the head's start depends on the seed alone
        torch.manual_seed(seed)
        head = module.add_cell_head(out_dim=width, hidden_dim=8 * width)
    device = next(module.parameters()).device
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(train_cells, min(n_cells, len(train_cells)), replace=False))
    part_of = dataset.corpus.part_of(cells)
    was_training = module.training
    module.eval()
    pooled = []
    for part in np.unique(part_of):  # a batch never mixes studies
        members = cells[part_of == part]
        for start in range(0, len(members), 64):
            batch = dataset[(0, members[start : start + 64])]
            tokens = [batch[k].to(device) for k in ("gene_index", "value", "padding_mask")]
            pooled.append(module.pool(module.encode(*tokens), tokens[2], "all"))
    head.standardise_on(torch.cat(pooled))
    module.train(was_training)


def run_pretraining(
    module: XTrimoGeneModule,
    corpus: PretrainingCorpus,
    settings: TrainingSettings,
    objective: PretrainingObjective,
    *,
    fit: Fit,
    init_expression_bias: bool = False,
    plan_cls: type = XTrimoGeneTrainingPlan,
) -> TrainingResult:
    """Pretrain ``module`` on a checked ``corpus`` (from :func:`build_corpus`).

    Called by :meth:`~scxtrimo.model.XTrimoGene.train`. The objective: masked regression of the
    full-depth cell from a (randomly) down-sampled view (scFoundation's read-depth-aware task),
    plus ``contrastive_weight`` x InfoNCE (off when ``contrastive_weight == 0``) between the
    pooled embeddings of that view and a second, independently down-sampled and masked view
    of the same cell (``objective.positives="views"``), or between each cell and one of its
    nearest cells in a PCA of its study (``"neighbours"``: half the encoder passes; see
    :func:`~scxtrimo.train.corpus_neighbours`), optionally through a new cell head.

    Parameters
    ----------
    module
        The network to train, in place.
    corpus
        The studies, checked.
    settings
        The run's settings.
    objective
        What the run optimises.
    fit
        Runs Lightning over the plan and data module (the model's train runner).
    init_expression_bias
        Start the decoder's expression bias at each gene's expected masked value (a fresh
        model), so its steps go into learning what a cell's context adds.
    plan_cls
        The training plan.

    Returns
    -------
    The run's arguments, the runner's output and the gene cap to use at inference.
    """
    if len(corpus.cells) < 2:
        raise ValueError("Training needs at least 2 valid cells.")
    s = settings
    masking = objective.masking
    use_pairs = objective.positives == "neighbours" and objective.contrastive_weight > 0
    use_views = objective.positives == "views" and objective.contrastive_weight > 0
    dataset = PretrainingDataset(
        corpus,
        TokenIndex(module.config.n_genes),
        masking,
        seed=s.seed,
        max_genes=s.max_genes,
        view_masking=(objective.view_masking or DEFAULT_VIEW_MASKING) if use_views else None,
    )
    datamodule = PretrainingDataModule(
        dataset,
        corpus.n_tokens,
        corpus.cells,
        batch_size=s.batch_size,
        train_size=s.train_size,
        seed=s.seed,
        num_workers=s.num_workers,
        pin_memory=s.accelerator in ("gpu", "cuda")
        or (s.accelerator == "auto" and torch.cuda.is_available()),
        groups=corpus.part_of(np.arange(corpus.n_cells)),
        drop_last=s.drop_last,
    )
    if use_pairs:
        datamodule.partners = corpus_neighbours(
            corpus, datamodule.train_idx, n_neighbors=objective.n_neighbors, seed=s.seed
        )
        if objective.cell_head_dim:
            start_cell_head(module, dataset, datamodule.train_idx, objective.cell_head_dim, s.seed)
    if module.expression_bias is not None and init_expression_bias:
        start = corpus_gene_bias(corpus, datamodule.train_idx, masking)
        with torch.no_grad():
            module.expression_bias.copy_(torch.from_numpy(start))
    plan_kwargs = {"cell_mean": True, **(s.plan_kwargs or {})}  # cell_mean: a module.loss argument
    plan = plan_cls(
        module,
        lr=s.lr,
        weight_decay=s.weight_decay,
        warmup_steps=s.warmup_steps,
        contrastive_weight=objective.contrastive_weight,
        temperature=objective.temperature,
        pairs=use_pairs,
        regression_every=objective.regression_every,
        **plan_kwargs,
    )
    strategy = s.strategy
    if objective.regression_every > 1 and strategy in ("ddp", "ddp_spawn", "ddp_notebook"):
        # Encoder-only steps leave the decoder without gradients; DDP must be told.
        strategy = f"{strategy}_find_unused_parameters_true"
    kwargs = trainer_defaults(
        dict(s.trainer_kwargs),
        gradient_clip_val=s.gradient_clip_val,
        precision=s.precision,
        strategy=strategy,
        num_nodes=s.num_nodes,
    )
    torch.manual_seed(s.seed)
    module.train()
    try:
        out = fit(
            plan,
            datamodule,
            max_epochs=s.max_epochs,
            accelerator=s.accelerator,
            devices=s.devices,
            trainer_kwargs=kwargs,
        )
    finally:
        module.eval()
    training_args = {
        "max_epochs": s.max_epochs,
        "batch_size": s.batch_size,
        "lr": s.lr,
        "weight_decay": s.weight_decay,
        "train_size": s.train_size,
        "max_genes": s.max_genes,
        "seed": s.seed,
        "masking": masking.__dict__,
        "view_masking": dataset.view_masking.__dict__ if dataset.view_masking else None,
        "contrastive_weight": objective.contrastive_weight,
        "temperature": objective.temperature,
        "positives": objective.positives,
        "n_neighbors": objective.n_neighbors if use_pairs else None,
        "cell_head_dim": objective.cell_head_dim,
        "regression_every": objective.regression_every,
        "corpus": corpus.summary(),
        "finetune": None,
    }
    # Embed cells the way the model saw them in pretraining.
    return TrainingResult(training_args, output=out, default_max_genes=s.max_genes)
