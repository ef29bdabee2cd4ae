"""Transformer encoder over the gathered (non-zero) tokens of each cell."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

__all__ = [
    "MultiHeadSelfAttention",
    "TokenPacking",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention with a fused query/key/value projection.

    The fused projection ``qkv_proj`` (weight ``[3 * dim, dim]``, rows ordered q, k, v) has the
    layout of :class:`torch.nn.MultiheadAttention`'s ``in_proj_weight``/``in_proj_bias``, so those
    load without conversion.

    Parameters
    ----------
    dim
        Model width.
    heads
        Number of heads; must divide ``dim``.
    dropout
        Dropout on the attention weights (training only).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"`dim` ({dim}) must be divisible by `heads` ({heads}).")
        self.dim = dim
        self.heads = heads
        self.dropout = dropout
        self.qkv_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        # Same initialisation as torch.nn.MultiheadAttention.
        nn.init.xavier_uniform_(self.qkv_proj.weight)
        nn.init.zeros_(self.qkv_proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend.

        Parameters
        ----------
        x
            Tokens ``[B, L, dim]``.
        attention_mask
            Boolean, broadcastable to ``[B, heads, L, L]``; ``True`` = may attend.

        Returns
        -------
        Attention output ``[B, L, dim]``.
        """
        batch_size, length, _ = x.shape
        head_dim = self.dim // self.heads
        qkv = self.qkv_proj(x).view(batch_size, length, 3, self.heads, head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(batch_size, length, self.dim)
        return self.out_proj(out)

    def forward_packed(self, x: torch.Tensor, packing: TokenPacking) -> torch.Tensor:
        """Attend over packed tokens ``[N, dim]`` (the real tokens of a batch, no padding).

        The projections run on the ``N`` real tokens only; the scores are computed per cell
        on the batch's padded layout (``packing``), which costs ``O(B L^2)`` where the
        projections cost ``O(N dim^2)``.
        """
        head_dim = self.dim // self.heads
        qkv = packing.unpack(self.qkv_proj(x))  # [B, L, 3 dim], zeros at padding
        batch_size, length = qkv.shape[:2]
        query, key, value = (
            qkv.view(batch_size, length, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        )
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=packing.attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(batch_size, length, self.dim)
        return self.out_proj(packing.pack(out))


class TokenPacking:
    """Where the real tokens of a padded batch ``[B, L]`` sit, to run per-token layers on them only.

    Linear layers, norms and activations act on each token alone, so they can run on the
    ``N`` real tokens packed into ``[N, dim]`` instead of the ``B x L`` padded ones; attention
    unpacks to the padded layout for its scores. Inference batches are length-bucketed with up
    to 25% padding (``scxtrimo.data.plan_batches``), which the packed layers no longer compute.

    Parameters
    ----------
    padding_mask
        Boolean ``[B, L]``; ``True`` marks padding.
    """

    def __init__(self, padding_mask: torch.Tensor) -> None:
        padding_mask = padding_mask.to(torch.bool)
        self.shape = tuple(padding_mask.shape)
        self.index = (~padding_mask).reshape(-1).nonzero().squeeze(1)  # flat positions, [N]
        #: ``[B, 1, 1, L]``: every query may attend to every non-padded key.
        self.attention_mask = ~padding_mask[:, None, None, :]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, d]`` -> the real tokens ``[N, d]``."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, d]`` -> ``[B, L, d]`` with zeros at padded positions."""
        out = x.new_zeros(self.shape[0] * self.shape[1], x.shape[-1])
        out.index_copy_(0, self.index, x)  # in place: one padded buffer, not two
        return out.view(*self.shape, x.shape[-1])


class TransformerEncoderLayer(nn.Module):
    """One transformer encoder block (post-LN or pre-LN).

    Post-LN (``norm_first=False``, scFoundation): ``x = LN(x + Attn(x)); x = LN(x + FF(x))``.
    Pre-LN: ``x = x + Attn(LN(x)); x = x + FF(LN(x))``. Dropout acts on the attention weights,
    inside the feed-forward block and on both residual branches, in training mode only.

    Parameters
    ----------
    dim
        Model width.
    heads
        Number of attention heads.
    ff_dim
        Feed-forward hidden width.
    dropout
        Dropout rate.
    activation
        Feed-forward activation.
    norm_first
        Pre-LN if ``True``, post-LN otherwise.
    layer_norm_eps
        LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        ff_dim: int,
        dropout: float = 0.1,
        activation: Literal["relu", "gelu"] = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        attention_dropout: float | None = None,
    ) -> None:
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(f"`activation` must be 'relu' or 'gelu', got {activation!r}.")
        self.dropout = dropout
        self.activation = activation
        self.norm_first = norm_first
        # Dropout on attention weights forces the O(L^2)-memory attention kernel in training.
        attn_p = dropout if attention_dropout is None else attention_dropout
        self.attention = MultiHeadSelfAttention(dim, heads, dropout=attn_p)
        self.attention_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.ff_in = nn.Linear(dim, ff_dim)
        self.ff_out = nn.Linear(ff_dim, dim)
        self.ff_norm = nn.LayerNorm(dim, eps=layer_norm_eps)

    def _attention_block(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        return F.dropout(self.attention(x, attention_mask), self.dropout, self.training)

    def _feed_forward_block(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.ff_in(x)
        hidden = F.relu(hidden) if self.activation == "relu" else F.gelu(hidden)
        hidden = F.dropout(hidden, self.dropout, self.training)
        return F.dropout(self.ff_out(hidden), self.dropout, self.training)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the block.

        Parameters
        ----------
        x
            Tokens ``[B, L, dim]``.
        attention_mask
            Boolean, broadcastable to ``[B, heads, L, L]``; ``True`` = may attend.

        Returns
        -------
        Tokens ``[B, L, dim]``.
        """
        if self.norm_first:
            x = x + self._attention_block(self.attention_norm(x), attention_mask)
            return x + self._feed_forward_block(self.ff_norm(x))
        x = self.attention_norm(x + self._attention_block(x, attention_mask))
        return self.ff_norm(x + self._feed_forward_block(x))

    def forward_packed(self, x: torch.Tensor, packing: TokenPacking) -> torch.Tensor:
        """:meth:`forward` on packed tokens ``[N, dim]`` (see :class:`TokenPacking`)."""

        def attend(y: torch.Tensor) -> torch.Tensor:
            return F.dropout(self.attention.forward_packed(y, packing), self.dropout, self.training)

        if self.norm_first:
            x = x + attend(self.attention_norm(x))
            return x + self._feed_forward_block(self.ff_norm(x))
        x = self.attention_norm(x + attend(x))
        return self.ff_norm(x + self._feed_forward_block(x))


class TransformerEncoder(nn.Module):
    """Stack of ``TransformerEncoderLayer`` followed by a final LayerNorm.

    Padded positions are excluded as attention keys, so the outputs at real positions do not
    depend on how much padding a batch carries (outputs *at* padded positions are meaningless).
    Every row needs at least one non-padded position (the T token always is one).

    Parameters
    ----------
    dim
        Model width.
    depth
        Number of layers.
    heads
        Number of attention heads.
    ff_dim
        Feed-forward hidden width.
    dropout
        Dropout rate (training only).
    activation
        Feed-forward activation.
    norm_first
        Pre-LN if ``True``, post-LN otherwise.
    layer_norm_eps
        LayerNorm epsilon.
    attention_dropout
        Dropout on attention weights; ``None`` uses ``dropout``.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        ff_dim: int,
        dropout: float = 0.1,
        activation: Literal["relu", "gelu"] = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        attention_dropout: float | None = None,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(
                dim,
                heads,
                ff_dim,
                dropout=dropout,
                activation=activation,
                norm_first=norm_first,
                layer_norm_eps=layer_norm_eps,
                attention_dropout=attention_dropout,
            )
            for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        #: Recompute each layer's activations in the backward pass instead of keeping them
        #: (training with gradients only; same results, less memory, one more forward).
        self.gradient_checkpointing = False
        #: Without gradients, run the per-token layers on the real tokens only
        #: (``module._encoder.TokenPacking``); the padded layout is kept for attention scores.
        self.pack_tokens = True

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode.

        Parameters
        ----------
        x
            Token embeddings ``[B, L, dim]``.
        padding_mask
            Boolean ``[B, L]``; ``True`` marks padding.

        Returns
        -------
        Encoded tokens ``[B, L, dim]``.
        """
        return self.run_layers(x, padding_mask)

    def run_layers(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """Apply the layers from ``start`` up to ``stop`` (exclusive); the final norm at the end.

        ``run_layers(run_layers(x, m, stop=k), m, start=k)`` equals ``forward(x, m)``: the
        outputs of frozen lower layers can be computed once and the upper layers trained on
        them (:func:`scxtrimo.tl.adapt`).

        Parameters
        ----------
        x
            Inputs of layer ``start`` ``[B, L, dim]``.
        padding_mask
            Boolean ``[B, L]``; ``True`` marks padding.
        start, stop
            Layer range (``stop=None``: to the end).

        Returns
        -------
        Outputs of layer ``stop - 1`` (normalised when it is the last layer).
        """
        depth = len(self.layers)
        stop = depth if stop is None else stop
        if not 0 <= start <= stop <= depth:
            raise ValueError(f"Layer range {start}..{stop} is outside 0..{depth}.")
        if (
            self.pack_tokens
            and padding_mask is not None
            and not torch.is_grad_enabled()
            and start < stop
        ):
            packing = TokenPacking(padding_mask)
            packed = packing.pack(x)
            for layer in self.layers[start:stop]:
                packed = layer.forward_packed(packed, packing)
            if stop == depth:
                packed = self.final_norm(packed)
            return packing.unpack(packed)
        attention_mask = None
        if padding_mask is not None:
            # [B, 1, 1, L]: every query may attend to every non-padded key.
            attention_mask = ~padding_mask.to(torch.bool)[:, None, None, :]
        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers[start:stop]:
            if checkpoint:  # the RNG state is restored for the recomputation (same dropout)
                x = torch.utils.checkpoint.checkpoint(layer, x, attention_mask, use_reentrant=False)
            else:
                x = layer(x, attention_mask)
        return self.final_norm(x) if stop == depth else x
