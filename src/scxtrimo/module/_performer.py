"""Performer decoder: FAVOR+ linear attention with a softmax kernel."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PerformerDecoder",
    "PerformerLayer",
    "PerformerSelfAttention",
    "favor_softmax_features",
    "gaussian_orthogonal_random_matrix",
    "linear_attention",
    "replaced_row_attention",
]

KeyStabilizer = Literal["cell", "batch"]
_KEY_STABILIZERS = ("cell", "batch")

#: Additive constant of the random features; keeps the normaliser away from zero.
FAVOR_EPS = 1e-4


def gaussian_orthogonal_random_matrix(
    nb_rows: int,
    nb_columns: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw orthogonal Gaussian random features.

    Rows come in blocks of ``nb_columns`` mutually orthogonal unit vectors (Q factors of Gaussian
    matrices); each row is then scaled by the norm of an independent Gaussian vector, so rows are
    marginally Gaussian but orthogonal within a block.

    Parameters
    ----------
    nb_rows
        Number of random features ``m``.
    nb_columns
        Dimension of the projected vectors (the head width).
    generator
        Random generator; its device is used for sampling.
    device
        Device of the result (default: the generator's device, or CPU).
    dtype
        Floating dtype of the result.

    Returns
    -------
    Projection matrix ``[nb_rows, nb_columns]``.
    """
    sample_device = generator.device if generator is not None else device
    n_blocks = math.ceil(nb_rows / nb_columns)
    gaussian = torch.randn(
        n_blocks,
        nb_columns,
        nb_columns,
        generator=generator,
        device=sample_device,
        dtype=torch.float32,
    )
    orthogonal, _ = torch.linalg.qr(gaussian, mode="reduced")
    # The transposed Q factor's rows are orthonormal; stack the blocks and keep nb_rows rows.
    rows = orthogonal.transpose(-1, -2).reshape(n_blocks * nb_columns, nb_columns)[:nb_rows]
    norms = torch.randn(
        nb_rows, nb_columns, generator=generator, device=sample_device, dtype=torch.float32
    ).norm(dim=1)
    matrix = norms.unsqueeze(-1) * rows
    return matrix.to(device=device if device is not None else matrix.device, dtype=dtype)


def favor_softmax_features(
    data: torch.Tensor,
    projection_matrix: torch.Tensor,
    *,
    is_query: bool,
    key_stabilizer: KeyStabilizer = "cell",
    eps: float = FAVOR_EPS,
) -> torch.Tensor:
    """Positive random features approximating the softmax kernel (FAVOR+).

    With head width ``d`` and ``m`` features: ``dash = (d^-0.25 x) Pᵀ``,
    ``diag = ‖x‖² d^-0.5 / 2`` and ``φ(x) = m^-0.5 (exp(dash - diag - stab) + eps)``. The
    stabiliser ``stab`` is a constant that cancels between numerator and normaliser of the
    attention (up to ``eps``); it only prevents overflow and is not differentiated through.

    Parameters
    ----------
    data
        Queries or keys ``[B, H, N, d]``.
    projection_matrix
        Random features ``[m, d]``.
    is_query
        Queries use the maximum over features of each row as stabiliser.
    key_stabilizer
        Stabiliser of keys: ``"cell"`` = maximum over heads, positions and features of each batch
        element (outputs independent of the other cells in the batch; equals the official code
        for a single-cell batch); ``"batch"`` = maximum over the whole tensor (the official
        batched behaviour, so results depend slightly on the batch composition).
    eps
        Additive constant.

    Returns
    -------
    Features ``[B, H, N, m]``.
    """
    if key_stabilizer not in _KEY_STABILIZERS:
        raise ValueError(
            f"`key_stabilizer` must be one of {_KEY_STABILIZERS}, got {key_stabilizer!r}."
        )
    head_dim = data.shape[-1]
    nb_features = projection_matrix.shape[0]
    data_normalizer = head_dim**-0.25
    ratio = nb_features**-0.5
    projection = projection_matrix.to(dtype=data.dtype)
    data_dash = torch.einsum("...nd,md->...nm", data_normalizer * data, projection)
    diag = (data**2).sum(dim=-1, keepdim=True) / 2.0 * data_normalizer**2
    if is_query:
        stabilizer = data_dash.amax(dim=-1, keepdim=True)
    elif key_stabilizer == "batch":
        stabilizer = data_dash.amax()
    else:
        stabilizer = data_dash.amax(dim=tuple(range(1, data_dash.ndim)), keepdim=True)
    return ratio * (torch.exp(data_dash - diag - stabilizer.detach()) + eps)


def linear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Non-causal linear attention ``φ(q) (φ(k)ᵀ v) / (φ(q) · Σ_n φ(k_n))``.

    Parameters
    ----------
    query
        Query features ``[B, H, N, m]``.
    key
        Key features ``[B, H, N, m]``.
    value
        Values ``[B, H, N, e]``.

    Returns
    -------
    Attention output ``[B, H, N, e]``.
    """
    key_sum = key.sum(dim=-2)
    normalizer = 1.0 / torch.einsum("...nm,...m->...n", query, key_sum.type_as(query))
    context = torch.einsum("...nm,...ne->...me", key, value)
    return torch.einsum("...me,...nm,...n->...ne", context, query, normalizer)


def replaced_row_attention(
    attention: PerformerSelfAttention,
    constant: torch.Tensor,
    rows: torch.Tensor,
    row_index: torch.Tensor,
    row_valid: torch.Tensor,
    query_slots: torch.Tensor,
) -> torch.Tensor:
    """FAVOR+ self-attention of sequences that equal one shared sequence except at a few rows.

    Cell ``b``'s sequence is ``constant`` (``[N, D]``, the same for every cell) with row
    ``row_index[b, r]`` replaced by ``rows[b, r]`` wherever ``row_valid[b, r]``. The result
    equals ``attention(x)[b, row_index[b, query_slots]]`` of the full ``[B, N, D]`` sequence
    with the per-cell key stabiliser, but costs ``O(N + B R)`` instead of ``O(B N)``: the
    random-feature sums of the constant rows are computed once per call and each cell only
    swaps its own rows in and out. The key stabiliser (the cell's maximum key projection) is
    reproduced exactly, including over the constant rows a cell keeps, so the ``eps`` term of
    the features gives the same result as the dense computation (up to float rounding).

    Parameters
    ----------
    attention
        The attention module (its projections and random features are used).
    constant
        Shared (already normalised) input rows ``[N, D]``.
    rows
        Replacement (already normalised) rows ``[B, R, D]``.
    row_index
        Position of each replacement row ``[B, R]``; unique among a cell's valid rows.
    row_valid
        ``[B, R]``; ``False`` slots are ignored (their ``row_index`` may be anything).
    query_slots
        Slots of ``rows`` whose attention output is returned ``[Q]``.

    Returns
    -------
    Attention output at the queried rows ``[B, Q, D]``.
    """
    heads, dim_head = attention.heads, attention.dim_head
    n_positions = constant.shape[0]
    batch_size = rows.shape[0]
    projection = attention.projection_matrix.to(dtype=constant.dtype)
    nb_features = projection.shape[0]
    normalizer = dim_head**-0.25
    ratio = nb_features**-0.5

    def split(x: torch.Tensor) -> torch.Tensor:  # [..., L, H*dh] -> [..., H, L, dh]
        return x.unflatten(-1, (heads, dim_head)).transpose(-3, -2)

    def dash_diag(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dash = torch.einsum("...nd,md->...nm", normalizer * k, projection)
        diag = (k**2).sum(dim=-1, keepdim=True) / 2.0 * normalizer**2
        return dash, diag

    # Shared rows: keys and values once for all cells.
    key_c = split(attention.k_proj(constant))  # [H, N, dh]
    value_c = split(attention.v_proj(constant))  # [H, N, dh]
    dash_c, diag_c = dash_diag(key_c)  # [H, N, m], [H, N, 1]
    shift_c = dash_c.amax().detach()
    exp_c = torch.exp(dash_c - diag_c - shift_c)  # <= 1
    kv_c = torch.einsum("hnm,hne->hme", exp_c, value_c)
    ksum_c = exp_c.sum(dim=1)  # [H, m]
    vsum_c = value_c.sum(dim=1)  # [H, dh]

    # Each cell's replacement rows.
    index = row_index.masked_fill(~row_valid, 0)
    valid = row_valid.to(constant.dtype)[:, None, :, None]  # [B, 1, R, 1]
    key_r = split(attention.k_proj(rows))  # [B, H, R, dh]
    value_r = split(attention.v_proj(rows))
    dash_r, diag_r = dash_diag(key_r)

    # Per-cell stabiliser: max over the cell's own rows and the shared rows it keeps.
    with torch.no_grad():
        row_max_r = dash_r.amax(dim=(1, 3)).masked_fill(~row_valid, float("-inf"))  # [B, R]
        row_max_c = dash_c.amax(dim=(0, 2))  # [N]
        order = torch.argsort(row_max_c, descending=True)
        # Unused slots scatter into an extra, discarded column.
        replaced = torch.zeros(batch_size, n_positions + 1, dtype=torch.bool, device=rows.device)
        replaced.scatter_(1, row_index.masked_fill(~row_valid, n_positions), True)
        replaced = replaced[:, :n_positions]
        first_kept = (~replaced[:, order]).to(torch.int8).argmax(dim=1)
        kept_max = row_max_c[order[first_kept]]
        kept_max = kept_max.masked_fill(replaced.all(dim=1), float("-inf"))
        stabilizer = torch.maximum(row_max_r.amax(dim=1), kept_max)  # [B]
    n_kept = n_positions - row_valid.sum(dim=1).to(constant.dtype)  # [B]

    # Shared-row sums minus the rows each cell replaces (features of the shared rows).
    exp_removed = exp_c[:, index].permute(1, 0, 2, 3) * valid  # [B, H, R, m]
    value_removed = value_c[:, index].permute(1, 0, 2, 3) * valid  # [B, H, R, dh]
    scale = torch.exp(shift_c - stabilizer)[:, None, None]  # [B, 1, 1]
    kv_kept = kv_c - torch.einsum("bhrm,bhre->bhme", exp_removed, value_removed)
    ksum_kept = ksum_c - exp_removed.sum(dim=2)
    vsum_kept = vsum_c - value_removed.sum(dim=2)
    kv = ratio * (scale[..., None] * kv_kept + FAVOR_EPS * vsum_kept[:, :, None, :])
    ksum = ratio * (scale * ksum_kept + FAVOR_EPS * n_kept[:, None, None])

    # The cell's own rows as keys.
    feat_r = ratio * (torch.exp(dash_r - diag_r - stabilizer[:, None, None, None]) + FAVOR_EPS)
    feat_r = feat_r * valid
    kv = kv + torch.einsum("bhrm,bhre->bhme", feat_r, value_r)
    ksum = ksum + feat_r.sum(dim=2)

    # Queries only where outputs are wanted.
    query = split(attention.q_proj(rows[:, query_slots]))
    query = favor_softmax_features(query, projection, is_query=True)  # [B, H, Q, m]
    numerator = torch.einsum("bhqm,bhme->bhqe", query, kv)
    denominator = torch.einsum("bhqm,bhm->bhq", query, ksum)
    out = numerator / denominator.unsqueeze(-1)
    out = out.transpose(1, 2).reshape(batch_size, -1, heads * dim_head)
    return attention.out_proj(out)


class PerformerSelfAttention(nn.Module):
    """Multi-head FAVOR+ self-attention (queries, keys, values and output with bias).

    Parameters
    ----------
    dim
        Model width.
    heads
        Number of heads.
    dim_head
        Width of one head.
    nb_features
        Number of random features.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, nb_features: int) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.q_proj = nn.Linear(dim, inner_dim)
        self.k_proj = nn.Linear(dim, inner_dim)
        self.v_proj = nn.Linear(dim, inner_dim)
        self.out_proj = nn.Linear(inner_dim, dim)
        # A buffer (saved with the model): inference must use the trained projections.
        self.register_buffer(
            "projection_matrix", gaussian_orthogonal_random_matrix(nb_features, dim_head)
        )

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, length, _ = x.shape
        return x.view(batch_size, length, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_stabilizer: KeyStabilizer = "cell") -> torch.Tensor:
        """Attend.

        Parameters
        ----------
        x
            Tokens ``[B, N, dim]``.
        key_stabilizer
            See ``favor_softmax_features``.

        Returns
        -------
        Attention output ``[B, N, dim]``.
        """
        batch_size, length, _ = x.shape
        query = self._split_heads(self.q_proj(x))
        key = self._split_heads(self.k_proj(x))
        value = self._split_heads(self.v_proj(x))
        query = favor_softmax_features(query, self.projection_matrix, is_query=True)
        key = favor_softmax_features(
            key, self.projection_matrix, is_query=False, key_stabilizer=key_stabilizer
        )
        out = linear_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch_size, length, self.heads * self.dim_head)
        return self.out_proj(out)


class PerformerLayer(nn.Module):
    """Pre-LN Performer block: ``x += Attn(LN(x)); x += FF(LN(x))`` with an exact-GELU FF.

    Parameters
    ----------
    dim
        Model width.
    heads
        Number of heads.
    dim_head
        Width of one head.
    ff_dim
        Feed-forward hidden width.
    nb_features
        Number of random features.
    layer_norm_eps
        LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        ff_dim: int,
        nb_features: int,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.attention = PerformerSelfAttention(dim, heads, dim_head, nb_features)
        self.ff_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.ff_in = nn.Linear(dim, ff_dim)
        self.ff_out = nn.Linear(ff_dim, dim)

    def forward(self, x: torch.Tensor, key_stabilizer: KeyStabilizer = "cell") -> torch.Tensor:
        """Apply the block to ``x`` ``[B, N, dim]``."""
        x = x + self.attention(self.attention_norm(x), key_stabilizer=key_stabilizer)
        return x + self.ff_out(F.gelu(self.ff_in(self.ff_norm(x))))


class PerformerDecoder(nn.Module):
    """Stack of ``PerformerLayer`` followed by a final LayerNorm.

    The random projections are buffers: they are loaded with a checkpoint and never change in
    evaluation mode. For training, call :meth:`redraw_projections` (e.g. every 1,000 steps as in
    the official pretraining), or set ``feature_redraw_interval`` to redraw automatically from the
    global random state every that many training forward passes. ``calls_since_last_redraw``
    counts training forward passes since the last redraw.

    Parameters
    ----------
    dim
        Model width.
    depth
        Number of layers.
    heads
        Number of heads.
    dim_head
        Width of one head.
    ff_dim
        Feed-forward hidden width.
    nb_features
        Number of random features (``None``: ``int(dim_head * ln(dim_head))``).
    feature_redraw_interval
        Automatic redraw interval in training mode; ``None`` disables automatic redraws.
    layer_norm_eps
        LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        ff_dim: int,
        nb_features: int | None = None,
        feature_redraw_interval: int | None = None,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if nb_features is None:
            nb_features = int(dim_head * math.log(dim_head))
        self.nb_features = nb_features
        self.feature_redraw_interval = feature_redraw_interval
        self.layers = nn.ModuleList(
            PerformerLayer(dim, heads, dim_head, ff_dim, nb_features, layer_norm_eps)
            for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.register_buffer("calls_since_last_redraw", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def redraw_projections(self, generator: torch.Generator | None = None) -> None:
        """Draw new random projections for every layer (in place) and reset the counter.

        Parameters
        ----------
        generator
            Random generator (default: the global random state).
        """
        for layer in self.layers:
            buffer = layer.attention.projection_matrix
            new = gaussian_orthogonal_random_matrix(
                buffer.shape[0],
                buffer.shape[1],
                generator=generator,
                device=buffer.device,
                dtype=buffer.dtype,
            )
            buffer.copy_(new)
        self.calls_since_last_redraw.zero_()

    def _count_training_call(self) -> None:
        if self.training:
            if (
                self.feature_redraw_interval is not None
                and int(self.calls_since_last_redraw) >= self.feature_redraw_interval
            ):
                self.redraw_projections()
            self.calls_since_last_redraw += 1

    def forward_replaced_rows(
        self,
        constant: torch.Tensor,
        rows: torch.Tensor,
        row_index: torch.Tensor,
        row_valid: torch.Tensor,
        query_slots: torch.Tensor,
    ) -> torch.Tensor:
        """Decode sequences that differ from a shared sequence at a few rows (one layer only).

        Equals ``forward(x, key_stabilizer="cell")[b, row_index[b, query_slots]]`` where ``x``
        is ``constant`` with cell ``b``'s rows replaced (the algebra is in this module's
        ``replaced_row_attention``),
        at a cost that grows with the replaced rows instead of the sequence length. This is the
        pretraining path of single-layer decoders, where only masked positions are scored and
        every other position holds the same "value 0" input in every cell.

        Parameters
        ----------
        constant
            Shared input rows ``[N, dim]``.
        rows
            Replacement rows ``[B, R, dim]``.
        row_index
            Positions of the replacement rows ``[B, R]`` (unique among a cell's valid rows).
        row_valid
            ``[B, R]``, ``False`` = unused slot.
        query_slots
            Slots of ``rows`` to return ``[Q]``.

        Returns
        -------
        Decoded rows ``[B, Q, dim]`` after the final LayerNorm.

        Raises
        ------
        ValueError
            If the decoder has more than one layer (its middle layers need every position).
        """
        if len(self.layers) != 1:
            raise ValueError(
                "forward_replaced_rows needs a single-layer decoder; this one has "
                f"{len(self.layers)} layers (use forward)."
            )
        self._count_training_call()
        layer = self.layers[0]
        attended = replaced_row_attention(
            layer.attention,
            layer.attention_norm(constant),
            layer.attention_norm(rows),
            row_index,
            row_valid,
            query_slots,
        )
        x = rows[:, query_slots] + attended
        x = x + layer.ff_out(F.gelu(layer.ff_in(layer.ff_norm(x))))
        return self.final_norm(x)

    def forward(self, x: torch.Tensor, key_stabilizer: KeyStabilizer = "cell") -> torch.Tensor:
        """Decode.

        Parameters
        ----------
        x
            Tokens ``[B, N, dim]`` (no padding: every position is a real gene or token).
        key_stabilizer
            See ``favor_softmax_features``.

        Returns
        -------
        Decoded tokens ``[B, N, dim]`` after the final LayerNorm.
        """
        if key_stabilizer not in _KEY_STABILIZERS:
            raise ValueError(
                f"`key_stabilizer` must be one of {_KEY_STABILIZERS}, got {key_stabilizer!r}."
            )
        self._count_training_call()
        for layer in self.layers:
            x = layer(x, key_stabilizer=key_stabilizer)
        return self.final_norm(x)
