"""What a training run is given and what it gives back: its settings, objective and result."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from scxtrimo.data._tokens import MaskingSpec

#: How a recipe runs Lightning: ``fit(plan, datamodule, max_epochs=..., accelerator=...,
#: devices=..., trainer_kwargs=...)``. The model hands in its scvi-tools train runner, which
#: records the history on the model (as ``TrainRunner`` does); a recipe never sees the model.
Fit = Callable[..., Any]


@dataclass(frozen=True)
class TrainingSettings:
    """The settings of one training run, shared by pretraining and fine-tuning.

    Built by :meth:`~scxtrimo.model.XTrimoGene.train` from its arguments (see there for each
    field); the recipes (:func:`run_pretraining`, :func:`run_finetuning`) read them.
    """

    max_epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int | None = None
    train_size: float = 0.9
    max_genes: int | None = 1024
    seed: int = 0
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: Any = None
    num_nodes: int | None = None
    precision: Any = None
    gradient_clip_val: float = 1.0
    num_workers: int = 0
    invalid_cells: str = "skip"
    drop_last: bool = False
    gradient_checkpointing: bool = False
    plan_kwargs: Mapping[str, Any] | None = None
    trainer_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> TrainingSettings:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class PretrainingObjective:
    """What pretraining optimises: masked regression of a down-sampled view plus InfoNCE.

    Attributes
    ----------
    masking
        Masking and down-sampling of the regression view.
    view_masking
        The same for the contrastive view (``None``: always down-sampled, scFoundation rates).
    contrastive_weight
        Weight of the InfoNCE term; 0 turns it off (no second view is built).
    temperature
        Softmax temperature of the InfoNCE term.
    positives
        What the InfoNCE term pairs: ``"views"``, two augmented views of each cell (two
        encoder passes per cell); ``"neighbours"``, each cell and one of its ``n_neighbors``
        nearest cells in a PCA of its study (one encoder pass per cell; the pair's cells are
        both trained by masked regression).
    n_neighbors
        Neighbours per cell with ``positives="neighbours"``.
    cell_head_dim
        With ``positives="neighbours"``: train a new :class:`~scxtrimo.module.CellHead` of this
        width with the encoder, and take the InfoNCE term on its output (it becomes the
        model's cell embedding); 0: on the pooled vector.
    regression_every
        With ``positives="neighbours"``: the masked-regression term (the decoder) runs on every
        ``regression_every``-th step; the steps between are encoder-only contrastive steps
        (without the decoder's forward and backward passes, about half the cost of a full
        step). 1: every step.
    """

    masking: MaskingSpec = field(default_factory=MaskingSpec)
    view_masking: MaskingSpec | None = None
    contrastive_weight: float = 1.0
    temperature: float = 0.2
    positives: str = "views"
    n_neighbors: int = 10
    cell_head_dim: int = 0
    regression_every: int = 1

    def __post_init__(self) -> None:
        if self.positives not in ("views", "neighbours"):
            raise ValueError(f"positives must be 'views' or 'neighbours', got {self.positives!r}.")
        if self.cell_head_dim and self.positives != "neighbours":
            raise ValueError("cell_head_dim needs positives='neighbours'.")
        if isinstance(self.regression_every, bool) or not isinstance(self.regression_every, int):
            raise TypeError(
                f"regression_every must be an integer >= 1, got {self.regression_every!r}."
            )
        if self.regression_every < 1:
            raise ValueError(f"regression_every must be >= 1, got {self.regression_every}.")
        if self.regression_every > 1 and (
            self.positives != "neighbours" or not self.contrastive_weight > 0
        ):
            raise ValueError(
                "regression_every > 1 interleaves encoder-only contrastive steps, which need "
                "positives='neighbours' and contrastive_weight > 0."
            )


@dataclass
class TrainingResult:
    """What a training run returns; the model's ``train`` writes it onto the model.

    Attributes
    ----------
    training_args
        The run's arguments and what it trained on (the model's ``training_args_``).
    output
        What the train runner returned.
    default_max_genes
        Pretraining: the gene cap the module now expects at inference; ``None`` otherwise.
    classifier
        Fine-tuning: what to add to the model's ``classifier_`` record (mode, gene cap...).
    adapter_state
        LoRA fine-tuning: the trained adapter tensors (already merged into the module).
    """

    training_args: dict[str, Any]
    output: Any = None
    default_max_genes: int | None = None
    classifier: dict[str, Any] | None = None
    adapter_state: dict[str, Any] | None = None
