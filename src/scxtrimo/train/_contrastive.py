"""The cell-level pretraining term: InfoNCE between two augmented views of the same cells."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gather(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows of ``z`` (with gradients) and the offset of this rank's rows."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return z, 0
    world = torch.distributed.get_world_size()
    if world == 1:
        return z, 0
    from torch.distributed.nn.functional import all_gather

    # Ranks hold the same number of cells (global batches are split evenly by the sampler).
    parts = all_gather(z.contiguous())
    rank = torch.distributed.get_rank()
    return torch.cat(parts, dim=0), rank * z.shape[0]


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE: each cell's view must find its other view among the batch's cells.

    Under data-parallel training the candidates are the cells of every rank (gathered with
    gradients), so a step with ``world`` ranks of ``B`` cells scores the same pairs as one
    process with ``world * B`` cells, and the mean of the ranks' losses is that process's loss.

    Parameters
    ----------
    z1, z2
        Embeddings ``[B, d]`` of the two views; row ``i`` of both is the same cell.
    temperature
        Softmax temperature of the cosine similarities.

    Returns
    -------
    The mean over this rank's cells (scalar).
    """
    if z1.shape != z2.shape:
        raise ValueError(f"The two views differ in shape: {tuple(z1.shape)} vs {tuple(z2.shape)}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    z1 = F.normalize(z1.float(), dim=-1)
    z2 = F.normalize(z2.float(), dim=-1)
    all1, offset = _gather(z1)
    all2, _ = _gather(z2)
    targets = torch.arange(z1.shape[0], device=z1.device) + offset
    loss_12 = F.cross_entropy(z1 @ all2.T / temperature, targets)
    loss_21 = F.cross_entropy(z2 @ all1.T / temperature, targets)
    return 0.5 * (loss_12 + loss_21)
