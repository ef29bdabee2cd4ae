"""Auto-discretisation embedding of continuous expression values."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AutoDiscretizationEmbedding"]


class AutoDiscretizationEmbedding(nn.Module):
    """Embed scalar expression values as a learned soft mixture of bin vectors.

    A scalar ``v`` is mapped to bin logits ``h = LeakyReLU_0.1(W1 v + b1)``, mixed by a residual
    layer ``z = alpha * h + (W2 h + b2)``, turned into bin weights ``softmax(z)`` and embedded as
    the weighted sum of ``bin_num`` learned vectors. Every value (including 0) thus receives a
    convex combination of the bin vectors.

    Masked and padded positions get dedicated learned vectors. They are selected with explicit
    boolean arguments instead of the official magic input values (102 for mask, 103 for
    padding): with magic values, a genuine value of exactly 102 or 103 (possible for
    un-normalised inputs) would be silently replaced by the mask or padding embedding.

    Parameters
    ----------
    bin_num
        Number of bins.
    dim
        Embedding width.
    alpha
        Weight of the first bin-logit layer in the residual mix.
    """

    def __init__(self, bin_num: int, dim: int, alpha: float = 1.0) -> None:
        super().__init__()
        self.bin_num = bin_num
        self.dim = dim
        self.alpha = float(alpha)
        self.value_to_bin_logits = nn.Linear(1, bin_num)
        self.bin_logit_mixing = nn.Linear(bin_num, bin_num)
        self.bin_embeddings = nn.Embedding(bin_num, dim)
        # Shapes [1, dim] (not [dim]) so the official `emb_mask`/`emb_pad` tables load unchanged.
        self.mask_embedding = nn.Parameter(torch.empty(1, dim))
        self.padding_embedding = nn.Parameter(torch.empty(1, dim))
        nn.init.normal_(self.mask_embedding)
        nn.init.normal_(self.padding_embedding)

    def bin_weights(self, value: torch.Tensor) -> torch.Tensor:
        """Soft bin assignment of each value.

        Parameters
        ----------
        value
            Expression values of any shape ``[...]``.

        Returns
        -------
        Bin weights of shape ``[..., bin_num]`` summing to one over the last axis.
        """
        logits = self.value_to_bin_logits(value.unsqueeze(-1).to(self.bin_embeddings.weight.dtype))
        logits = nn.functional.leaky_relu(logits, negative_slope=0.1)
        mixed = self.alpha * logits + self.bin_logit_mixing(logits)
        return torch.softmax(mixed, dim=-1)

    def forward(
        self,
        value: torch.Tensor,
        mask_token: torch.Tensor | None = None,
        padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed values.

        Parameters
        ----------
        value
            Expression values ``[...]`` (float).
        mask_token
            Boolean ``[...]``; ``True`` replaces the position by the learned mask embedding.
        padding
            Boolean ``[...]``; ``True`` replaces the position by the learned padding embedding
            (applied after ``mask_token``).

        Returns
        -------
        Embeddings of shape ``[..., dim]``.
        """
        embedded = self.bin_weights(value) @ self.bin_embeddings.weight
        if mask_token is not None:
            embedded = torch.where(mask_token.unsqueeze(-1), self.mask_embedding[0], embedded)
        if padding is not None:
            embedded = torch.where(padding.unsqueeze(-1), self.padding_embedding[0], embedded)
        return embedded
