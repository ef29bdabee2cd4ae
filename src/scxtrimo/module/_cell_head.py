"""The cell head: a projection of a cell's pooled encoder outputs, learnt by adaptation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CellHead(nn.Module):
    """Standardise the pooled vector, a two-layer MLP, unit length: the adapted cell embedding.

    Added by :func:`scxtrimo.tl.adapt`; a model with a cell head embeds cells (``pooling="all"``)
    as ``head(pool(encoder(cell)))``. The output has unit length: adaptation trains cosine
    similarities (InfoNCE), so Euclidean neighbours of the output are its cosine neighbours.
    The standardisation (per-feature shift and scale of the
    pooled vector over the cells it was adapted on) is a buffer, saved with the weights.

    Parameters
    ----------
    in_dim
        Width of the pooled vector (``4 x encoder_dim``).
    hidden_dim
        Width of the hidden layer.
    out_dim
        Width of the adapted embedding.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)
        )

    @torch.no_grad()
    def standardise_on(self, pooled: torch.Tensor) -> None:
        """Set the shift and scale from pooled vectors ``[cells, in_dim]``."""
        pooled = pooled.float()
        self.shift.copy_(pooled.mean(dim=0))
        self.scale.copy_(pooled.std(dim=0).clamp(min=1e-6))

    def standardise(self, pooled: torch.Tensor) -> torch.Tensor:
        """The standardised input of the MLP."""
        return (pooled - self.shift) / self.scale

    def forward(self, pooled: torch.Tensor, standardised: bool = False) -> torch.Tensor:
        """Adapted embeddings ``[B, out_dim]`` (unit length) of pooled vectors ``[B, in_dim]``.

        ``standardised=True``: ``pooled`` is already standardised (training adds noise there).
        """
        out = self.mlp(pooled if standardised else self.standardise(pooled))
        return F.normalize(out, dim=-1)
