"""Architecture configuration of the xTrimoGene / scFoundation model."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["CONFIGS", "XTrimoGeneConfig", "get_config"]

_ACTIVATIONS = ("relu", "gelu")
# The size fields: one row of the named-configuration table (see CONFIGS).
_SIZE_FIELDS = (
    "encoder_dim",
    "encoder_depth",
    "encoder_heads",
    "encoder_ff_dim",
    "decoder_dim",
    "decoder_depth",
    "decoder_heads",
    "decoder_dim_head",
    "decoder_ff_dim",
)


def _past_vocabulary(offset: int, doc: str) -> property:
    """A read-only ``n_genes + offset``: a position of the token layout past the genes."""

    def get(self: XTrimoGeneConfig) -> int:
        return self.n_genes + offset

    get.__doc__ = doc
    return property(get, doc=doc)


@dataclass(frozen=True)
class XTrimoGeneConfig:
    """Hyper-parameters of an xTrimoGene encoder/decoder model.

    The defaults are the sizes of the ``"small"`` named configuration with scFoundation's
    training recipe (post-LN encoder, dropout 0.1, no gene bias); the named ``tiny``, ``small``
    and ``base`` configurations use pre-LN, no dropout and a gene bias (see :data:`CONFIGS`).
    Token indices derive from ``n_genes``:
    the target-resolution token **T** has gene index ``n_genes``, the source-depth token **S**
    ``n_genes + 1`` and padded encoder positions ``n_genes + 2``, so the gene-embedding table has
    ``n_genes + 3`` rows and the decoder runs over ``n_genes + 2`` positions.

    Parameters
    ----------
    n_genes
        Size of the gene vocabulary (19,264 for scFoundation).
    bin_num
        Number of bins of the auto-discretisation value embedding.
    bin_alpha
        Weight of the first bin-logit layer in the residual ``alpha * h + mix(h)``.
    encoder_dim
        Width of the encoder (and of the value and gene embeddings).
    encoder_depth
        Number of encoder transformer layers.
    encoder_heads
        Number of attention heads of the encoder; must divide ``encoder_dim``.
    encoder_ff_dim
        Hidden width of the encoder feed-forward blocks.
    encoder_norm_first
        ``False`` for post-LN blocks (scFoundation), ``True`` for pre-LN blocks.
    encoder_activation
        Feed-forward activation of the encoder.
    encoder_dropout
        Dropout rate of the encoder's residual branches and feed-forward blocks; active only in
        training mode.
    encoder_attention_dropout
        Dropout rate on the encoder's attention weights (training only). scFoundation used 0.1;
        our configurations use 0, which lets PyTorch use its memory-efficient fused attention
        kernel in training (the weights matrix is never materialised), several times faster on
        long cells.
    decoder_dim
        Width of the Performer decoder.
    decoder_depth
        Number of Performer layers.
    decoder_heads
        Number of attention heads of the decoder.
    decoder_dim_head
        Width of one decoder attention head (``decoder_heads * decoder_dim_head`` need not equal
        ``decoder_dim``).
    decoder_ff_dim
        Hidden width of the decoder feed-forward blocks.
    decoder_nb_features
        Number of FAVOR+ random features; ``None`` uses ``int(dim_head * ln(dim_head))``
        (266 for a head width of 64).
    decoder_feature_redraw_interval
        If set, the Performer redraws its random projections every this many forward passes in
        training mode (the official pretraining used 1000). ``None`` never redraws automatically;
        call :meth:`~scxtrimo.module.PerformerDecoder.redraw_projections` instead. Projections are
        never redrawn in evaluation mode.
    layer_norm_eps
        Epsilon of every LayerNorm.
    expression_gene_bias
        Add a learned bias per gene position to the expression head's output. Pretraining a
        fresh model starts it at each gene's expected masked value in the training cells, so
        the network only has to learn how a cell's context moves a gene away from it (a short
        CPU pretraining otherwise spends most of its steps learning 19,264 gene means through
        the embedding table). Not part of scFoundation.
    visible_loss_weight
        Weight of a second pretraining loss term: the MSE between the decoder's predictions at
        the genes the encoder saw and their full-depth values. 0 (scFoundation) scores masked
        positions only, which leaves predictions at a cell's own expressed genes untrained
        (what read-depth enhancement reads) and gives the encoder a weak training signal.
    cell_head_dim
        Width of the cell head's output (:class:`~scxtrimo.module.CellHead`, added by
        :func:`scxtrimo.tl.adapt`); 0: no cell head (cells are embedded by the pooled vector).
    cell_head_hidden
        Hidden width of the cell head.
    """

    n_genes: int = 19264
    bin_num: int = 100
    bin_alpha: float = 1.0
    encoder_dim: int = 128
    encoder_depth: int = 4
    encoder_heads: int = 4
    encoder_ff_dim: int = 512
    encoder_norm_first: bool = False
    encoder_activation: Literal["relu", "gelu"] = "relu"
    encoder_dropout: float = 0.1
    encoder_attention_dropout: float = 0.0
    decoder_dim: int = 32
    decoder_depth: int = 1
    decoder_heads: int = 4
    decoder_dim_head: int = 8
    decoder_ff_dim: int = 64
    decoder_nb_features: int | None = None
    decoder_feature_redraw_interval: int | None = None
    layer_norm_eps: float = 1e-5
    expression_gene_bias: bool = False
    visible_loss_weight: float = 0.0
    cell_head_dim: int = 0
    cell_head_hidden: int = 512

    def __post_init__(self) -> None:
        positive = ("n_genes", "bin_num", *_SIZE_FIELDS)
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("decoder_nb_features", "decoder_feature_redraw_interval"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
        if self.encoder_dim % self.encoder_heads != 0:
            raise ValueError(
                f"`encoder_dim` ({self.encoder_dim}) must be divisible by `encoder_heads` "
                f"({self.encoder_heads})."
            )
        if self.encoder_activation not in _ACTIVATIONS:
            raise ValueError(
                f"`encoder_activation` must be one of {_ACTIVATIONS}, got "
                f"{self.encoder_activation!r}."
            )
        if not 0.0 <= self.encoder_attention_dropout < 1.0:
            raise ValueError(
                "`encoder_attention_dropout` must be in [0, 1), got "
                f"{self.encoder_attention_dropout!r}."
            )
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"`encoder_dropout` must be in [0, 1), got {self.encoder_dropout!r}.")
        if self.decoder_nb_features is None and self.decoder_dim_head < 2:
            # int(d * ln d) is 0 for d = 1, which would leave the kernel without features.
            raise ValueError("`decoder_dim_head` must be >= 2 when `decoder_nb_features` is None.")
        if not self.visible_loss_weight >= 0.0:
            raise ValueError(
                f"`visible_loss_weight` must be >= 0, got {self.visible_loss_weight!r}."
            )
        for name in ("cell_head_dim", "cell_head_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"`layer_norm_eps` must be positive, got {self.layer_norm_eps!r}.")

    # -- derived constants ------------------------------------------------------------------------
    # The layout past the gene vocabulary, as a table of offsets from ``n_genes``.
    t_token_index = _past_vocabulary(0, "Gene index of the target-resolution token **T**.")
    s_token_index = _past_vocabulary(1, "Gene index of the source read-depth token **S**.")
    padding_index = _past_vocabulary(2, "Gene index of padded encoder positions.")
    seq_len = _past_vocabulary(
        2, "Number of decoder positions: every gene plus the T and S tokens."
    )
    n_gene_embeddings = _past_vocabulary(
        3, "Rows of the gene-embedding table (genes, T, S and the padding row)."
    )

    @property
    def nb_features(self) -> int:
        """Number of FAVOR+ random features actually used by the decoder."""
        if self.decoder_nb_features is not None:
            return self.decoder_nb_features
        return int(self.decoder_dim_head * math.log(self.decoder_dim_head))

    @property
    def decoder_inner_dim(self) -> int:
        """Width of the concatenated decoder attention heads."""
        return self.decoder_heads * self.decoder_dim_head

    def n_parameters(self, include_buffers: bool = False) -> int:
        """Number of trainable parameters of :class:`~scxtrimo.module.XTrimoGeneModule`.

        Parameters
        ----------
        include_buffers
            Also count the buffers of the state dict (random projections and the redraw counter).

        Returns
        -------
        The count, without a classification head.
        """
        d, b = self.encoder_dim, self.bin_num
        value_embedding = 2 * b + (b * b + b) + b * d + 2 * d
        gene_embedding = self.n_gene_embeddings * d
        encoder_layer = (4 * d * d + 4 * d) + (2 * self.encoder_ff_dim * d) + self.encoder_ff_dim
        encoder_layer += d + 4 * d
        encoder = self.encoder_depth * encoder_layer + 2 * d
        dd, inner, ff = self.decoder_dim, self.decoder_inner_dim, self.decoder_ff_dim
        decoder_layer = 3 * (dd * inner + inner) + (inner * dd + dd) + 4 * dd
        decoder_layer += 2 * ff * dd + ff + dd
        decoder = self.decoder_depth * decoder_layer + 2 * dd
        head = 2 * dd + dd + 1 + (self.seq_len if self.expression_gene_bias else 0)
        total = value_embedding + gene_embedding + encoder + (d * dd + dd) + decoder + head
        if self.cell_head_dim:
            hidden = self.cell_head_hidden
            total += 4 * d * hidden + hidden + hidden * self.cell_head_dim + self.cell_head_dim
        if include_buffers:
            total += self.decoder_depth * self.nb_features * self.decoder_dim_head + 1
        return total

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dictionary of all fields (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> XTrimoGeneConfig:
        """Build a configuration from a mapping of field names to values.

        Parameters
        ----------
        values
            Field values; missing fields take their defaults.

        Returns
        -------
        The configuration.

        Raises
        ------
        ValueError
            If ``values`` contains a key that is not a field.
        """
        field_names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - field_names)
        if unknown:
            raise ValueError(
                f"Unknown XTrimoGeneConfig field(s) {unknown}; valid fields are "
                f"{sorted(field_names)}."
            )
        return cls(**dict(values))

    def replace(self, **overrides: Any) -> XTrimoGeneConfig:
        """Copy of this configuration with some fields replaced (unknown fields raise)."""
        return type(self).from_dict({**self.to_dict(), **overrides})


# The named configurations as a table: the sizes, then the recipe each one follows.
_SIZES = {
    # name:        encoder dim, depth, heads, ff; decoder dim, depth, heads, head width, ff
    "tiny": (32, 2, 2, 64, 16, 1, 2, 8, 32),
    "small": (128, 4, 4, 512, 32, 1, 4, 8, 64),
    "base": (256, 6, 8, 1024, 64, 2, 4, 16, 128),
    "scfoundation": (768, 12, 12, 3072, 512, 6, 8, 64, 2048),
}
_SHORT_CPU_RECIPE = {
    "encoder_norm_first": True,
    "encoder_dropout": 0.0,
    "expression_gene_bias": True,
    "visible_loss_weight": 1.0,
}
# Spelled out in full, so that the released model does not move with the field defaults.
_SCFOUNDATION_RECIPE = {
    "n_genes": 19264,
    "bin_num": 100,
    "bin_alpha": 1.0,
    "encoder_norm_first": False,
    "encoder_activation": "relu",
    "encoder_dropout": 0.1,
    "encoder_attention_dropout": 0.1,
    "decoder_nb_features": 266,
    "expression_gene_bias": False,
    "visible_loss_weight": 0.0,
}


#: Named configurations (``n_genes`` = 19,264). Trainable parameters without a classifier, and
#: state-dict buffers (random projections + redraw counter):
#:
#: ============== ============ ========= ===================================================
#: name           parameters   buffers   layout
#: ============== ============ ========= ===================================================
#: ``tiny``           669,359        129 enc 32/2 layers/2 heads/ff 64; dec 16/1/2×8/ff 32
#: ``small``        3,314,975        129 enc 128/4/4/ff 512; dec 32/1/4×8/ff 64
#: ``base``         9,810,815      1,409 enc 256/6/8/ff 1024; dec 64/2/4×16/ff 128
#: ``scfoundation`` 119,252,285  102,145 enc 768/12/12/ff 3072; dec 512/6/8×64/ff 2048, m=266
#: ============== ============ ========= ===================================================
#:
#: The gene-embedding table (``(n_genes + 3) × encoder_dim``) dominates the small configurations.
#: Their Performer decoders are deliberately light: the decoder runs over all 19,266 positions
#: of every cell and is memory-bound on CPUs (a 64-d, 2-layer decoder made a 32-cell
#: pretraining step 5-8x slower than this 32-d, 1-layer one on 2 cores), while cell embeddings
#: come from the encoder alone;
#: ``scfoundation`` is the released 100M model (post-LN, ReLU, 100 bins, alpha 1).
#:
#: Our configurations (``tiny``, ``small``, ``base``) differ from scFoundation's recipe in four
#: ways meant for short pretraining on CPUs: pre-LN encoder blocks (with post-LN blocks and a
#: few hundred steps, the four-layer ``small`` encoder collapsed every cell onto nearly the
#: same embedding: spread across cells 4.5e-5 vs 0.061 untrained), no dropout (a few epochs
#: of a small model are far from over-fitting), a per-gene expression bias
#: (``expression_gene_bias``) and a loss on the visible genes too (``visible_loss_weight``).
CONFIGS: dict[str, XTrimoGeneConfig] = {
    name: XTrimoGeneConfig(
        **dict(zip(_SIZE_FIELDS, sizes)),
        **(_SCFOUNDATION_RECIPE if name == "scfoundation" else _SHORT_CPU_RECIPE),
    )
    for name, sizes in _SIZES.items()
}


def get_config(
    config: str | Mapping[str, Any] | XTrimoGeneConfig = "small", **overrides: Any
) -> XTrimoGeneConfig:
    """Resolve a configuration from a name, a mapping or a config object.

    Parameters
    ----------
    config
        A name from :data:`CONFIGS` (``"tiny"``, ``"small"``, ``"base"``, ``"scfoundation"``), a
        mapping of field values (see :meth:`XTrimoGeneConfig.from_dict`) or a configuration.
    **overrides
        Fields to replace.

    Returns
    -------
    The configuration.

    Raises
    ------
    ValueError
        For an unknown name or unknown fields.
    """
    if isinstance(config, XTrimoGeneConfig):
        resolved = config
    elif isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(
                f"Unknown configuration name {config!r}; valid names are {sorted(CONFIGS)}."
            )
        resolved = CONFIGS[config]
    elif isinstance(config, Mapping):
        resolved = XTrimoGeneConfig.from_dict(config)
    else:
        raise TypeError(
            "`config` must be a configuration name, a mapping or an XTrimoGeneConfig, got "
            f"{type(config).__name__}."
        )
    return resolved.replace(**overrides) if overrides else resolved
