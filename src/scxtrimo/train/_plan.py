"""Training plan for pretraining and fine-tuning: AdamW, linear warm-up, cosine decay."""

from __future__ import annotations

import math

import torch
from scvi.train import TrainingPlan

from ._contrastive import info_nce


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _can_fuse(groups: list[dict]) -> bool:
    """Whether AdamW's fused kernel applies: float32 parameters, all on one CPU or CUDA device.

    The fused kernel updates every tensor in one pass (on CPU since torch 2.4), where the
    default loops over tensors; a pretraining step of the ``small`` model spends about a tenth
    of its time in the optimiser (``benchmarks/results/training_step.md``).
    """
    params = [p for g in groups for p in g["params"]]
    devices = {p.device for p in params}
    return (
        bool(params)
        and len(devices) == 1
        and next(iter(devices)).type in ("cpu", "cuda")
        and all(p.dtype == torch.float32 for p in params)
    )


class XTrimoGeneTrainingPlan(TrainingPlan):
    """Lightning module that trains an :class:`~scxtrimo.module.XTrimoGeneModule`.

    scvi-tools' default plan is tuned for VAEs (Adam with ``eps=0.01``, no warm-up); a
    transformer wants AdamW without weight decay on biases, norms and embedding tables, a
    linear warm-up and a cosine decay, stepped every batch.

    Parameters
    ----------
    module
        The module to train.
    lr
        Peak learning rate.
    weight_decay
        AdamW weight decay for weight matrices.
    betas, eps
        AdamW parameters.
    warmup_steps
        Linear warm-up steps; ``None`` uses 5% of all steps.
    min_lr_ratio
        Learning rate at the end of the cosine decay, relative to ``lr``.
    contrastive_weight
        Weight of the cell-level term: InfoNCE between the pooled embeddings of two augmented
        views of each cell (:func:`~scxtrimo.train.info_nce`), used when batches carry a second
        view; 0 turns it off.
    temperature
        Softmax temperature of the InfoNCE term.
    pairs
        Training batches are neighbour pairs (anchors, then one neighbour each; see
        :class:`~scxtrimo.train.LengthBucketBatchSampler`): the InfoNCE term is taken between
        the two halves' cell embeddings (:meth:`~scxtrimo.module.XTrimoGeneModule.cell_embedding`,
        through the cell head when the module has one), one encoder pass per cell, no second
        view. Validation batches are plain (masked regression only).
    regression_every
        With ``pairs``: the masked-regression term runs on every ``regression_every``-th
        training step (global step divisible by it); the other steps encode the batch and take
        the InfoNCE term alone, without the decoder (validation always decodes).
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan`.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-8,
        warmup_steps: int | None = None,
        min_lr_ratio: float = 0.05,
        contrastive_weight: float = 0.0,
        temperature: float = 0.1,
        pairs: bool = False,
        regression_every: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(
            module, optimizer="AdamW", lr=lr, weight_decay=weight_decay, eps=eps, **kwargs
        )
        if not contrastive_weight >= 0:
            raise ValueError(f"contrastive_weight must be >= 0, got {contrastive_weight}.")
        self.betas = betas
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.contrastive_weight = float(contrastive_weight)
        self.temperature = float(temperature)
        self.pairs = bool(pairs)
        if regression_every < 1 or (regression_every > 1 and not (pairs and contrastive_weight)):
            raise ValueError(
                f"regression_every={regression_every}: it must be >= 1, and > 1 needs pairs=True "
                "and contrastive_weight > 0 (the steps between are contrastive only)."
            )
        self.regression_every = int(regression_every)

    def _param_groups(self) -> list[dict]:
        decay, no_decay = [], []
        for name, param in self.module.named_parameters():
            if not param.requires_grad:
                continue
            # Biases, norms and embedding tables are not regularised towards zero.
            if param.ndim < 2 or "emb" in name or "norm" in name:
                no_decay.append(param)
            else:
                decay.append(param)
        return [
            {"params": decay, "weight_decay": self.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self):
        """AdamW with a per-step warm-up + cosine schedule."""
        groups = self._param_groups()
        optimizer = torch.optim.AdamW(
            groups, lr=self.lr, betas=self.betas, eps=self.eps, fused=_can_fuse(groups)
        )
        total = int(max(1, self.trainer.estimated_stepping_batches))
        warmup = self.warmup_steps if self.warmup_steps is not None else max(1, total // 20)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, self.min_lr_ratio)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def _pair_info_nce(self, h: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """InfoNCE between the cell embeddings of a paired batch's halves (anchors, partners)."""
        z = self.module.cell_embedding(h, padding_mask)
        half = z.shape[0] // 2
        return info_nce(z[:half], z[half : 2 * half], self.temperature)

    def _contrastive_step(self, batch: dict) -> torch.Tensor:
        """An encoder-only training step: InfoNCE between the neighbour-pair halves."""
        mask = batch["padding_mask"]
        contrastive = self._pair_info_nce(
            self.module.encode(batch["gene_index"], batch["value"], mask), mask
        )
        self.log(
            "contrastive_loss_train",
            contrastive.detach(),
            on_step=False,
            on_epoch=True,
            batch_size=int(batch["gene_index"].shape[0]),
            sync_dist=self.use_sync_dist,
        )
        loss = self.contrastive_weight * contrastive
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"The contrastive loss became {loss.item()} at global step {self.global_step}. "
                "Lower the learning rate (lr); the last good weights are those of the previous "
                "checkpoint."
            )
        return loss

    def _step(self, batch: dict, mode: str) -> torch.Tensor:
        if mode == "train" and self.pairs and self.global_step % self.regression_every:
            return self._contrastive_step(batch)
        inference_outputs, _, out = self.forward(batch, loss_kwargs=self.loss_kwargs)
        loss = out.loss
        extra = dict(out.extra_metrics or {})
        if "z_view2" in inference_outputs:
            extra["masked_mse"] = loss.detach()
            contrastive = info_nce(
                inference_outputs["z"], inference_outputs["z_view2"], self.temperature
            )
            extra["contrastive_loss"] = contrastive.detach()
            if self.contrastive_weight > 0:
                loss = loss + self.contrastive_weight * contrastive
        elif self.pairs and mode == "train" and self.contrastive_weight > 0:
            extra["masked_mse"] = loss.detach()
            contrastive = self._pair_info_nce(inference_outputs["h"], batch["padding_mask"])
            extra["contrastive_loss"] = contrastive.detach()
            loss = loss + self.contrastive_weight * contrastive
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"The {mode} loss became {loss.item()} at global step {self.global_step} "
                f"(epoch {self.current_epoch}). Lower the learning rate (lr), keep gradient "
                "clipping on, or use precision='32-true'; the last good weights are those of "
                "the previous checkpoint."
            )
        n = int(batch["gene_index"].shape[0])
        self.log(
            f"{mode}_loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=n,
            sync_dist=self.use_sync_dist,
        )
        for key, value in extra.items():
            if isinstance(value, torch.Tensor) and value.ndim == 0:
                self.log(
                    f"{key}_{mode}",
                    value,
                    on_step=False,
                    on_epoch=True,
                    batch_size=n,
                    sync_dist=self.use_sync_dist,
                )
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the torch RNG state so a resumed run draws the same dropout masks."""
        checkpoint["scxtrimo_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the RNG state saved with the checkpoint."""
        state = checkpoint.get("scxtrimo_rng_state")
        if state is not None:
            torch.set_rng_state(state)

    def training_step(self, batch, batch_idx):
        """One optimisation step; a non-finite loss stops training with the step number."""
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        """Masked-regression loss on held-out cells."""
        self._step(batch, "validation")
