"""The training objective: masked regression of expression values, and a classification head's cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scvi.module.base import LossOutput
from torch import nn


def objective(
    tensors: dict[str, torch.Tensor],
    inference_outputs: dict[str, torch.Tensor],
    generative_outputs: dict[str, torch.Tensor | None],
    *,
    classifier: nn.Module | None,
    visible_loss_weight: float,
    classification_weight: float = 1.0,
    cell_mean: bool = False,
) -> LossOutput:
    """The loss of :meth:`~scxtrimo.module.XTrimoGeneModule.loss` (see there for the terms)."""
    prediction = generative_outputs.get("prediction")
    has_labels = classifier is not None and "labels" in tensors
    if prediction is None and not has_labels:
        raise ValueError(
            "The batch has neither masked positions (`masked_index`, `target_value`) nor "
            "`labels` for a classification head, so there is no loss to compute."
        )
    batch_size = inference_outputs["h"].shape[0]
    total = inference_outputs["h"].new_zeros(())
    reconstruction_loss = None
    extra_metrics: dict[str, torch.Tensor] = {}
    if prediction is not None:
        target = tensors["target_value"].to(prediction.dtype)
        masked_pad = tensors.get("masked_pad")
        used = (
            ~masked_pad.to(torch.bool)
            if masked_pad is not None
            else torch.ones_like(target, dtype=torch.bool)
        )
        squared_error = (prediction - target).square().masked_fill(~used, 0.0)
        n_used = used.sum(dim=1)
        reconstruction_loss = squared_error.sum(dim=1) / n_used.clamp(min=1)
        if cell_mean:
            total = total + reconstruction_loss.mean()
        else:
            total = total + squared_error.sum() / n_used.sum().clamp(min=1)
        nonzero = used & (target != 0)
        zero = used & (target == 0)
        extra_metrics["masked_mse_nonzero"] = (
            squared_error.masked_fill(~nonzero, 0.0).sum() / nonzero.sum().clamp(min=1)
        ).detach()
        extra_metrics["masked_mse_zero"] = (
            squared_error.masked_fill(~zero, 0.0).sum() / zero.sum().clamp(min=1)
        ).detach()
    visible_prediction = generative_outputs.get("visible_prediction")
    if visible_prediction is not None:
        # Genes the encoder saw (not T, S or padding) against their full-depth values.
        genes = ~tensors["padding_mask"].to(torch.bool)
        genes[:, :2] = False
        visible_error = (visible_prediction - tensors["visible_target"]).square()
        visible_error = visible_error.masked_fill(~genes, 0.0)
        if cell_mean:
            visible_mse = (visible_error.sum(dim=1) / genes.sum(dim=1).clamp(min=1)).mean()
        else:
            visible_mse = visible_error.sum() / genes.sum().clamp(min=1)
        total = total + visible_loss_weight * visible_mse
        extra_metrics["visible_mse"] = visible_mse.detach()
    classification = {}
    if has_labels:
        logits = inference_outputs["logits"]
        labels = tensors["labels"].reshape(-1).to(device=logits.device, dtype=torch.long)
        classification_loss = F.cross_entropy(logits, labels)
        total = total + classification_weight * classification_loss
        classification = {
            "classification_loss": classification_loss,
            "logits": logits,
            "true_labels": labels,
        }
    return LossOutput(
        loss=total,
        reconstruction_loss=reconstruction_loss,
        n_obs_minibatch=batch_size,
        extra_metrics=extra_metrics,
        **classification,
    )
