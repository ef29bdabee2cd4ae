"""Fine-tuning for cell-type annotation: label batches, parameter freezing, training plan.

Fine-tuning trains the classification head of :class:`~scxtrimo.module.XTrimoGeneModule` (a
linear layer on the ``"all"``-pooled cell embedding) with cross-entropy. Batches hold the
encoder tokens of each cell's non-zero genes and its label; nothing is masked and the decoder
never runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import Dataset

from scxtrimo.data._matrix import as_row_accessible
from scxtrimo.data._tokens import InputSpec, TokenIndex, inference_batch
from scxtrimo.inference import PreparedInput, embed_prepared

from ._lora import (
    LoraSpec,
    base_fingerprint,
    count_parameters,
    discard_lora,
    inject_lora,
    lora_state,
    lora_target_modules,
    merge_lora,
)
from ._plan import XTrimoGeneTrainingPlan
from ._settings import Fit, TrainingResult, TrainingSettings

if TYPE_CHECKING:
    from scxtrimo.module import XTrimoGeneModule

FinetuneMode = Literal["head", "last_layers", "full", "lora"]
FINETUNE_MODES: tuple[str, ...] = ("head", "last_layers", "full", "lora")

# Parts of the module that the classification loss never reaches (the decoder side).
_DECODER_PARTS = ("decoder_embed", "decoder", "head_norm", "expression_head")


def finetune_plan(
    module: XTrimoGeneModule, mode: FinetuneMode, n_last_layers: int = 1
) -> tuple[list[str], list[str]]:
    """Which parameters a fine-tuning mode trains, and which sub-modules stay frozen.

    Parameters
    ----------
    module
        A module with a classification head (``n_labels > 0``).
    mode
        ``"head"``: only the classifier, on a frozen encoder (a linear probe).
        ``"last_layers"``: the classifier, the last ``n_last_layers`` encoder layers and the
        encoder's final LayerNorm. ``"full"``: the classifier, the value and gene embeddings
        and the whole encoder. The decoder side (``decoder_embed``, ``decoder``,
        ``head_norm``, ``expression_head``) receives no gradient from the classification loss
        and is frozen in every mode, so its weights are left exactly as they were.
        ``"lora"``: the classifier and the peft LoRA adapters of the encoder (see
        ``scxtrimo.train._lora``); every base weight is frozen. The adapters' names are
        listed once they are injected (``inject_lora``).
    n_last_layers
        Encoder layers to train with ``mode="last_layers"`` (1 to the encoder depth).

    Returns
    -------
    trainable
        Names of the parameters to train (as in ``module.named_parameters()``).
    frozen_modules
        Names of the frozen sub-modules that run in the forward pass; they are kept in
        evaluation mode (no dropout) while the rest trains.
    """
    if mode not in FINETUNE_MODES:
        raise ValueError(f"finetune must be one of {FINETUNE_MODES}, not {mode!r}.")
    if getattr(module, "classifier", None) is None:
        raise ValueError(
            "The module has no classification head; register labels first "
            "(XTrimoGene.setup_anndata(adata, labels_key=...) or model.add_classifier(...))."
        )
    depth = len(module.encoder.layers)
    if mode == "last_layers" and not 1 <= int(n_last_layers) <= depth:
        raise ValueError(f"n_last_layers must be between 1 and {depth}, got {n_last_layers}.")
    if mode == "head":
        prefixes = ["classifier."]
        frozen = ["value_embedding", "gene_embedding", "encoder"]
    elif mode == "last_layers":
        first = depth - int(n_last_layers)
        prefixes = ["classifier.", "encoder.final_norm."]
        prefixes += [f"encoder.layers.{i}." for i in range(first, depth)]
        frozen = ["value_embedding", "gene_embedding"]
        frozen += [f"encoder.layers.{i}" for i in range(first)]
    elif mode == "lora":
        prefixes = ["classifier."]
        frozen = ["value_embedding", "gene_embedding"]
    else:
        prefixes = ["classifier.", "value_embedding.", "gene_embedding.", "encoder."]
        frozen = []
    trainable = [
        name
        for name, _ in module.named_parameters()
        if any(name.startswith(p) for p in prefixes) or (mode == "lora" and ".lora_" in name)
    ]
    return trainable, frozen


def freeze_for_finetuning(
    module: XTrimoGeneModule, mode: FinetuneMode, n_last_layers: int = 1
) -> list[str]:
    """Set ``requires_grad`` of every parameter for a fine-tuning mode.

    Parameters
    ----------
    module
        The module (with a classification head).
    mode, n_last_layers
        See :func:`finetune_plan`.

    Returns
    -------
    Names of the trainable parameters.
    """
    trainable, _ = finetune_plan(module, mode, n_last_layers)
    keep = set(trainable)
    for name, param in module.named_parameters():
        param.requires_grad_(name in keep)
    return trainable


class FinetuningDataset(Dataset):
    """Builds a whole labelled batch per ``__getitem__((epoch, cells))`` call.

    Each batch holds the encoder tokens of the cells (as in inference: ``T``, ``S`` and the
    non-zero genes, nothing masked) and ``labels`` (int64 class indices).

    Parameters
    ----------
    matrix
        Cells x genes (in memory or backed).
    col_to_vocab
        Column-to-vocabulary map of the dataset.
    spec
        How values become model inputs (input type, target depth, gene cap).
    index
        Special token indices of the model.
    labels
        Class index of every row of ``matrix`` (``-1``: unlabelled, never sampled).
    total_counts
        Per-cell read depth for log-normalised input, or ``None``.
    """

    def __init__(
        self,
        matrix: Any,
        col_to_vocab: np.ndarray,
        spec: InputSpec,
        index: TokenIndex,
        labels: np.ndarray,
        total_counts: np.ndarray | None = None,
    ) -> None:
        self.matrix = as_row_accessible(matrix)
        self.col_to_vocab = col_to_vocab
        self.spec = spec
        self.index = index
        self.labels = np.asarray(labels, dtype=np.int64)
        self.total_counts = total_counts
        if self.labels.shape[0] != self.matrix.shape[0]:
            raise ValueError("labels must have one entry per row of the matrix.")

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def __getitem__(self, item: tuple[int, np.ndarray]) -> dict[str, torch.Tensor]:
        _, cells = item
        cells = np.asarray(cells, dtype=np.int64)
        if sp.issparse(self.matrix) and self.matrix.format == "csr":
            block, rows = self.matrix, cells
        else:  # backed or dense: read the rows in sorted order (h5py needs it)
            order = np.argsort(cells)
            block = self.matrix[cells[order]]
            block = sp.csr_matrix(block) if not sp.issparse(block) else block.tocsr()
            rows = np.empty_like(order)
            rows[order] = np.arange(len(cells))
        totals = None if self.total_counts is None else self.total_counts[cells]
        tokens = inference_batch(block, rows, self.col_to_vocab, self.spec, self.index, totals)
        out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tokens.items()}
        out["labels"] = torch.from_numpy(self.labels[cells])
        out["cell_index"] = torch.from_numpy(cells)
        return out


class EmbeddingDataset(Dataset):
    """Labelled batches of precomputed cell embeddings (``z``), for head-only fine-tuning.

    Parameters
    ----------
    z
        ``"all"``-pooled cell embeddings, one row per cell of the AnnData.
    labels
        Class index per row.
    """

    def __init__(self, z: np.ndarray, labels: np.ndarray) -> None:
        self.matrix = np.asarray(z, dtype=np.float32)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def __getitem__(self, item: tuple[int, np.ndarray]) -> dict[str, torch.Tensor]:
        _, cells = item
        cells = np.asarray(cells, dtype=np.int64)
        return {
            "z": torch.from_numpy(np.ascontiguousarray(self.matrix[cells])),
            "labels": torch.from_numpy(self.labels[cells]),
            "cell_index": torch.from_numpy(cells),
        }


class FinetuningTrainingPlan(XTrimoGeneTrainingPlan):
    """Training plan for classification fine-tuning.

    Same optimiser and schedule as :class:`XTrimoGeneTrainingPlan` (AdamW over the parameters
    with ``requires_grad``, warm-up, cosine decay); frozen sub-modules run in evaluation mode
    (no dropout), and ``train_accuracy`` / ``validation_accuracy`` are logged next to the
    cross-entropy losses.

    Parameters
    ----------
    module
        The module, with a classification head.
    frozen_modules
        Names of sub-modules kept in evaluation mode.
    **kwargs
        Passed to :class:`XTrimoGeneTrainingPlan`.
    """

    def __init__(
        self, module: torch.nn.Module, *, frozen_modules: Sequence[str] = (), **kwargs
    ) -> None:
        super().__init__(module, **kwargs)
        self.frozen_modules = list(frozen_modules)

    def _freeze_modes(self) -> None:
        for name in self.frozen_modules:
            self.module.get_submodule(name).eval()

    def training_step(self, batch, batch_idx):
        """One step; frozen parts run in evaluation mode (Lightning switches all to training)."""
        self._freeze_modes()
        return self._step(batch, "train")

    def _step(self, batch: dict, mode: str) -> torch.Tensor:
        if "z" in batch:  # head only, on precomputed embeddings of the frozen encoder
            logits = self.module.classifier(batch["z"])
            labels = batch["labels"].reshape(-1).long()
            loss = torch.nn.functional.cross_entropy(logits, labels)
        else:
            _, _, out = self.forward(batch, loss_kwargs=self.loss_kwargs)
            loss, logits, labels = out.loss, out.logits, out.true_labels
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"The {mode} loss became {loss.item()} at global step {self.global_step} "
                f"(epoch {self.current_epoch}). Lower the learning rate (lr) or keep gradient "
                "clipping on."
            )
        n = int(labels.shape[0])
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        for key, value, bar in ((f"{mode}_loss", loss, True), (f"{mode}_accuracy", accuracy, True)):
            self.log(
                key,
                value,
                on_step=False,
                on_epoch=True,
                prog_bar=bar,
                batch_size=n,
                sync_dist=self.use_sync_dist,
            )
        return loss


def _feature_scaling(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (1 where constant) of the training embeddings."""
    z = np.asarray(z, dtype=np.float64)
    mean, sd = z.mean(axis=0), z.std(axis=0)
    return mean, np.where(sd > 0, sd, 1.0)


@torch.no_grad()
def _to_standardised(head: torch.nn.Linear, mean: np.ndarray, sd: np.ndarray) -> None:
    """Rewrite ``head`` (acting on ``z``) to act on ``(z - mean) / sd`` with the same output."""
    w, b = head.weight.double(), head.bias.double()
    m = torch.as_tensor(mean, dtype=torch.float64, device=w.device)
    s = torch.as_tensor(sd, dtype=torch.float64, device=w.device)
    head.bias.copy_(b + w @ m)
    head.weight.copy_(w * s)


@torch.no_grad()
def _from_standardised(head: torch.nn.Linear, mean: np.ndarray, sd: np.ndarray) -> None:
    """Inverse of :func:`_to_standardised`."""
    w, b = head.weight.double(), head.bias.double()
    m = torch.as_tensor(mean, dtype=torch.float64, device=w.device)
    s = torch.as_tensor(sd, dtype=torch.float64, device=w.device)
    w_raw = w / s
    head.weight.copy_(w_raw)
    head.bias.copy_(b - w_raw @ m)


def run_finetuning(
    module: XTrimoGeneModule,
    prep: PreparedInput,
    labels: np.ndarray,
    settings: TrainingSettings,
    *,
    mode: FinetuneMode,
    n_last_layers: int,
    fit: Fit,
    lora: LoraSpec | None = None,
) -> TrainingResult:
    """Fine-tune ``module``'s classification head (and more, by ``mode``) for ``labels``.

    Called by :meth:`~scxtrimo.model.XTrimoGene.train` with ``finetune=...``; see there.
    With ``mode="head"`` the frozen encoder's cell embeddings are computed once (the encoder
    runs without dropout, so they would be identical every epoch) and the head is trained on
    them, standardised per feature (the head is folded back to act on the raw embedding):
    epochs then cost almost nothing and the scale of the features does not matter.

    Parameters
    ----------
    module
        The network, with a classification head; trained in place.
    prep
        The checked training cells (:func:`~scxtrimo.inference.prepare_input`).
    labels
        Class index of every row of the AnnData (``-1``: no label, not trained on).
    settings
        The run's settings.
    mode
        ``"head"``, ``"last_layers"``, ``"full"`` or ``"lora"``.
    n_last_layers
        Encoder layers trained with ``mode="last_layers"``.
    fit
        Runs Lightning over the plan and data module (the model's train runner).
    lora
        The adapters of ``mode="lora"`` (default: ``LoraSpec()``).
        peft's adapters are injected into the encoder, trained with the head, then merged
        into the base weights (the module is a plain module again, as fast as the base); the
        result carries the adapter tensors and the base's fingerprint. If training fails the
        adapters are removed unmerged, leaving the base weights as they were.

    Returns
    -------
    The run's arguments, the runner's output and what to record about the head.
    """
    from scxtrimo._settings import settings as package_settings

    from ._datamodule import PretrainingDataModule
    from ._pretrain import trainer_defaults

    s = settings
    if module.classifier is None:
        raise ValueError(
            "Fine-tuning needs labels: XTrimoGene.setup_anndata(adata, labels_key=...) before "
            "creating the model, or model.add_classifier(adata, labels_key=...) for a "
            "pretrained or loaded model."
        )
    saved_flags = {name: p.requires_grad for name, p in module.named_parameters()}
    trainable, frozen = finetune_plan(module, mode, n_last_layers)
    if mode == "lora":
        lora = LoraSpec() if lora is None else lora
        lora_target_modules(module, lora)  # unknown targets fail before any work
    cells = prep.cells[labels[prep.cells] >= 0]
    if len(cells) < 2:
        raise ValueError("Fine-tuning needs at least 2 labelled, valid cells.")
    trainer_kwargs = dict(s.trainer_kwargs)
    if s.strategy is not None:
        trainer_kwargs["strategy"] = s.strategy
    if s.num_nodes is not None:
        trainer_kwargs["num_nodes"] = s.num_nodes
    if mode == "head":
        # The frozen encoder runs without dropout, so its embeddings are the same every epoch:
        # compute them once (length-bucketed inference) and train the head on them.
        z = embed_prepared(
            module,
            prep.with_cells(cells),
            progress_bar=trainer_kwargs.get("enable_progress_bar", package_settings.progress_bar),
        )
        # Train in standardised coordinates (like StandardScaler + logistic regression), so
        # that the optimiser does not depend on the scale of each embedding feature; the head
        # is folded back to act on the raw embedding afterwards (an exact reparametrisation).
        scaling = _feature_scaling(z[cells])
        dataset = EmbeddingDataset((z - scaling[0]) / scaling[1], labels)
        _to_standardised(module.classifier, *scaling)
    else:
        dataset = FinetuningDataset(
            prep.matrix,
            prep.mapping.col_to_vocab,
            prep.spec,
            TokenIndex(module.config.n_genes),
            labels,
            prep.total_counts,
        )
    datamodule = PretrainingDataModule(
        dataset,
        prep.stats.n_tokens,
        cells,
        batch_size=s.batch_size,
        train_size=s.train_size,
        seed=s.seed,
        num_workers=s.num_workers,
        pin_memory=s.accelerator in ("gpu", "cuda")
        or (s.accelerator == "auto" and torch.cuda.is_available()),
    )
    plan = FinetuningTrainingPlan(
        module,
        frozen_modules=frozen,
        lr=s.lr,
        weight_decay=s.weight_decay,
        warmup_steps=s.warmup_steps,
        **(s.plan_kwargs or {}),
    )
    trainer_kwargs = trainer_defaults(
        trainer_kwargs, gradient_clip_val=s.gradient_clip_val, precision=s.precision
    )
    lora_record = None
    if mode == "lora":  # injected last, so that nothing can fail before the try below
        lora_record = {**lora.to_dict(), "base_weights_sha256": base_fingerprint(module)}
        trainable = trainable + inject_lora(module, lora)
    keep = set(trainable)
    n_trainable = count_parameters(module, trainable)
    for name, param in module.named_parameters():
        param.requires_grad_(name in keep)
    torch.manual_seed(s.seed)
    module.train()
    adapter_state = None
    succeeded = False
    checkpointing = module.encoder.gradient_checkpointing
    module.encoder.gradient_checkpointing = bool(s.gradient_checkpointing) and mode != "head"
    try:
        out = fit(
            plan,
            datamodule,
            max_epochs=s.max_epochs,
            accelerator=s.accelerator,
            devices=s.devices,
            trainer_kwargs=trainer_kwargs,
        )
        succeeded = True
    finally:
        module.encoder.gradient_checkpointing = checkpointing
        if mode == "head":
            _from_standardised(module.classifier, *scaling)
        if mode == "lora":
            if succeeded:
                adapter_state = lora_state(module)
                merge_lora(module)  # as fast as the base from now on
            else:
                discard_lora(module)
        for name, param in module.named_parameters():
            param.requires_grad_(saved_flags.get(name, True))
        module.eval()
    classifier = {
        "trained": True,
        "finetune": mode,
        "n_last_layers": int(n_last_layers) if mode == "last_layers" else None,
        "max_genes": s.max_genes,
        "lora": lora_record,
    }
    training_args = {
        "finetune": mode,
        "n_last_layers": int(n_last_layers),
        "max_epochs": s.max_epochs,
        "batch_size": s.batch_size,
        "lr": s.lr,
        "weight_decay": s.weight_decay,
        "train_size": s.train_size,
        "max_genes": s.max_genes,
        "seed": s.seed,
        "gradient_checkpointing": bool(s.gradient_checkpointing),
        "n_cells": len(cells),
        "trainable_parameters": n_trainable,
        "lora": lora_record,
    }
    return TrainingResult(
        training_args, output=out, classifier=classifier, adapter_state=adapter_state
    )
