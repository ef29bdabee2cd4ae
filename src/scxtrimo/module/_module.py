"""The xTrimoGene asymmetric encoder/decoder as a scvi-tools module."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from scvi.module.base import BaseModuleClass, LossOutput
from torch import nn

from ._cell_head import CellHead
from ._configs import XTrimoGeneConfig, get_config
from ._embedding import AutoDiscretizationEmbedding
from ._encoder import TransformerEncoder
from ._loss import objective
from ._performer import KeyStabilizer, PerformerDecoder

__all__ = ["XTrimoGeneModule"]

Pooling = Literal["all", "max", "mean"]
_POOLINGS = ("all", "max", "mean")


class XTrimoGeneModule(BaseModuleClass):
    """xTrimoGene / scFoundation: auto-discretised values, transformer encoder, Performer decoder.

    The encoder sees only each cell's non-zero genes plus the read-depth tokens; the decoder sees
    every gene position. Batches are dictionaries of tensors (``B`` cells, ``L`` encoder tokens,
    ``M`` masked slots):

    - ``gene_index`` int64 ``[B, L]``, ``value`` float32 ``[B, L]``, ``padding_mask`` bool
      ``[B, L]`` (``True`` = padding). Column 0 is the **T** token (gene index ``n_genes``),
      column 1 the **S** token (``n_genes + 1``), then the cell's non-zero genes, then padding.
    - Pretraining adds ``masked_index`` int64 ``[B, M]`` (gene indices), ``masked_value`` float32
      ``[B, M]`` (decoder input value where not a mask token), ``masked_token`` bool ``[B, M]``
      (``True`` = learned mask embedding), ``masked_pad`` bool ``[B, M]`` (``True`` = unused slot)
      and ``target_value`` float32 ``[B, M]``. Masked genes must not be visible to the encoder.
    - Fine-tuning with ``n_labels > 0`` adds ``labels`` int64 ``[B]`` or ``[B, 1]``.

    Parameters
    ----------
    config
        Configuration: a name from :data:`~scxtrimo.module.CONFIGS`, a mapping of fields or an
        :class:`~scxtrimo.module.XTrimoGeneConfig`.
    n_labels
        Number of classes of an optional linear classification head on the ``"all"`` cell
        embedding; 0 for none.
    **overrides
        Configuration fields to replace.
    """

    def __init__(
        self,
        config: XTrimoGeneConfig | str | Mapping[str, Any] = "small",
        n_labels: int = 0,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self.config = get_config(config, **overrides)
        self.n_labels = int(n_labels)
        cfg = self.config
        self.value_embedding = AutoDiscretizationEmbedding(
            cfg.bin_num, cfg.encoder_dim, alpha=cfg.bin_alpha
        )
        self.gene_embedding = nn.Embedding(cfg.n_gene_embeddings, cfg.encoder_dim)
        self.encoder = TransformerEncoder(
            cfg.encoder_dim,
            cfg.encoder_depth,
            cfg.encoder_heads,
            cfg.encoder_ff_dim,
            dropout=cfg.encoder_dropout,
            attention_dropout=cfg.encoder_attention_dropout,
            activation=cfg.encoder_activation,
            norm_first=cfg.encoder_norm_first,
            layer_norm_eps=cfg.layer_norm_eps,
        )
        self.decoder_embed = nn.Linear(cfg.encoder_dim, cfg.decoder_dim)
        self.decoder = PerformerDecoder(
            cfg.decoder_dim,
            cfg.decoder_depth,
            cfg.decoder_heads,
            cfg.decoder_dim_head,
            cfg.decoder_ff_dim,
            nb_features=cfg.nb_features,
            feature_redraw_interval=cfg.decoder_feature_redraw_interval,
            layer_norm_eps=cfg.layer_norm_eps,
        )
        self.head_norm = nn.LayerNorm(cfg.decoder_dim, eps=cfg.layer_norm_eps)
        self.expression_head = nn.Linear(cfg.decoder_dim, 1)
        # Per-position offset of the prediction (config.expression_gene_bias); see
        # scxtrimo.train.expected_masked_values for its data-driven start.
        self.expression_bias = (
            nn.Parameter(torch.zeros(cfg.seq_len)) if cfg.expression_gene_bias else None
        )
        self.classifier = (
            nn.Linear(4 * cfg.encoder_dim, self.n_labels) if self.n_labels > 0 else None
        )
        self.cell_head = (
            CellHead(4 * cfg.encoder_dim, cfg.cell_head_hidden, cfg.cell_head_dim)
            if cfg.cell_head_dim
            else None
        )

    def add_cell_head(self, out_dim: int = 64, hidden_dim: int = 512) -> CellHead:
        """Give the module a new, untrained :class:`CellHead`, replacing any.

        The head's size is recorded in ``config``, so that saved models rebuild it.
        """
        self.config = self.config.replace(cell_head_dim=out_dim, cell_head_hidden=hidden_dim)
        device = next(self.parameters()).device
        self.cell_head = CellHead(4 * self.config.encoder_dim, hidden_dim, out_dim).to(device)
        return self.cell_head

    def embedding_width(self, pooling: Pooling = "all") -> int:
        """Width of :meth:`cell_embedding`'s output for ``pooling``."""
        if pooling == "all":
            return self.config.cell_head_dim or 4 * self.config.encoder_dim
        return self.config.encoder_dim

    def cell_embedding(
        self, h: torch.Tensor, padding_mask: torch.Tensor, pooling: Pooling = "all"
    ) -> torch.Tensor:
        """Cell embeddings from encoder outputs: :meth:`pool`, then the cell head if there is one.

        With a cell head (an adapted model), ``pooling="all"`` gives the head's output
        (``config.cell_head_dim`` wide); ``"max"`` and ``"mean"`` always give the pooled vector.
        """
        z = self.pool(h, padding_mask, pooling)
        if pooling == "all" and self.cell_head is not None:
            return self.cell_head(z)
        return z

    def gene_embedding_table(self) -> torch.Tensor:
        """The context-free gene-embedding table ``[n_genes + 3, encoder_dim]``.

        Rows ``0 .. n_genes - 1`` are genes in vocabulary order, then T, S and the padding row.
        """
        return self.gene_embedding.weight

    # -- encoder ----------------------------------------------------------------------------------
    def encode(
        self, gene_index: torch.Tensor, value: torch.Tensor, padding_mask: torch.Tensor
    ) -> torch.Tensor:
        """Encode the gathered tokens of each cell.

        Parameters
        ----------
        gene_index
            Gene indices ``[B, L]`` (int64).
        value
            Values ``[B, L]`` (log1p-normalised expression; read-depth tokens in log10).
        padding_mask
            ``[B, L]``, ``True`` = padding.

        Returns
        -------
        Encoder outputs ``[B, L, encoder_dim]`` (meaningless at padded positions).
        """
        padding_mask = padding_mask.to(torch.bool)
        return self.encoder(self.token_embeddings(gene_index, value, padding_mask), padding_mask)

    def token_embeddings(
        self, gene_index: torch.Tensor, value: torch.Tensor, padding_mask: torch.Tensor
    ) -> torch.Tensor:
        """The encoder's input: value embedding plus gene embedding of each token.

        Parameters
        ----------
        gene_index, value, padding_mask
            As in :meth:`encode`.

        Returns
        -------
        ``[B, L, encoder_dim]``; :meth:`encode` is ``encoder(token_embeddings(...))``.
        """
        padding_mask = padding_mask.to(torch.bool)
        # Padded slots may carry any index; point them at the padding row so lookups are valid.
        gene_index = gene_index.masked_fill(padding_mask, self.config.padding_index)
        return self.value_embedding(value, padding=padding_mask) + self.gene_embedding(gene_index)

    @staticmethod
    def pool(h: torch.Tensor, padding_mask: torch.Tensor, pooling: Pooling = "all") -> torch.Tensor:
        """Pool encoder outputs into one vector per cell.

        Parameters
        ----------
        h
            Encoder outputs ``[B, L, d]`` (column 0 = T, column 1 = S).
        padding_mask
            ``[B, L]``, ``True`` = padding; padded positions never contribute.
        pooling
            ``"all"``: ``[h_S, h_T, max over genes, mean over genes]`` (``4 d``, the official
            default); ``"max"``: element-wise max over all non-padded positions including T and S
            (official ``pool_type=max``, ``d``); ``"mean"``: mean over genes (``d``). A cell
            without genes gets zeros for the gene max and mean.

        Returns
        -------
        Cell embeddings ``[B, 4 d]`` or ``[B, d]``.
        """
        if pooling not in _POOLINGS:
            raise ValueError(f"`pooling` must be one of {_POOLINGS}, got {pooling!r}.")
        valid = ~padding_mask.to(torch.bool)
        if pooling == "max":
            return h.masked_fill(~valid.unsqueeze(-1), float("-inf")).amax(dim=1)
        is_gene_column = torch.arange(h.shape[1], device=h.device) >= 2
        gene_valid = (valid & is_gene_column).unsqueeze(-1)
        n_genes = gene_valid.sum(dim=1)
        gene_mean = h.masked_fill(~gene_valid, 0.0).sum(dim=1) / n_genes.clamp(min=1)
        if pooling == "mean":
            return gene_mean
        gene_max = h.masked_fill(~gene_valid, float("-inf")).amax(dim=1)
        gene_max = gene_max.masked_fill(n_genes == 0, 0.0)
        return torch.cat([h[:, 1], h[:, 0], gene_max, gene_mean], dim=-1)

    # -- decoder ----------------------------------------------------------------------------------
    # Each decoder method names its tensors in its signature, as torch modules do; the calls pass
    # the masked ones on as one tuple (docs/architecture.md, "Kept twice, and why").
    def _decoder_rows(
        self,
        h: torch.Tensor,
        gene_index: torch.Tensor,
        padding_mask: torch.Tensor,
        masked_index: torch.Tensor | None,
        masked_value: torch.Tensor | None,
        masked_token: torch.Tensor | None,
        masked_pad: torch.Tensor | None,
        measured: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder input as shared rows plus each cell's own rows (after ``decoder_embed``).

        Returns ``constant`` ``[n_genes + 3, d_dec]`` (the input of a position that holds the
        value 0, the same in every cell; the last row is a dump row for unused slots; with
        ``measured`` ``[n_genes + 3]`` bool, the genes a study did not measure hold the mask
        embedding instead: unknown, not zero), ``rows``
        ``[B, L + M, d_dec]`` (visible positions, then masked positions), their positions
        ``[B, L + M]`` (unused slots point at the dump row ``n_genes + 2``) and validity.
        """
        cfg = self.config
        dump_row = cfg.padding_index  # == n_genes + 2: scatter target for unused slots
        gene_table = self.gene_embedding.weight
        if measured is None:
            zero_value = torch.zeros(1, device=h.device, dtype=gene_table.dtype)
            constant_value = self.value_embedding(zero_value)
        else:
            measured = measured.to(device=h.device, dtype=torch.bool).reshape(-1)
            zeros = torch.zeros(measured.shape, device=h.device, dtype=gene_table.dtype)
            constant_value = self.value_embedding(zeros, mask_token=~measured)
        constant = self.decoder_embed(constant_value + gene_table)

        padding_mask = padding_mask.to(torch.bool)
        visible_index = gene_index.masked_fill(padding_mask, dump_row)
        # Encoder outputs receive the gene embedding a second time (as in scFoundation).
        indices = [visible_index]
        valid = [~padding_mask]
        rows = [self.decoder_embed(h + self.gene_embedding(visible_index))]
        if masked_index is not None:
            unused = (
                masked_pad.to(torch.bool)
                if masked_pad is not None
                else torch.zeros_like(masked_index, dtype=torch.bool)
            )
            masked_index = masked_index.masked_fill(unused, dump_row)
            if masked_value is None:
                masked_value = torch.zeros(masked_index.shape, device=h.device, dtype=h.dtype)
            if masked_token is not None:
                masked_token = masked_token.to(torch.bool)
            masked_rows = self.value_embedding(masked_value, mask_token=masked_token)
            indices.append(masked_index)
            valid.append(~unused)
            rows.append(self.decoder_embed(masked_rows + self.gene_embedding(masked_index)))
        return constant, torch.cat(rows, dim=1), torch.cat(indices, dim=1), torch.cat(valid, dim=1)

    def _decoder_input(
        self,
        h: torch.Tensor,
        gene_index: torch.Tensor,
        padding_mask: torch.Tensor,
        masked_index: torch.Tensor | None,
        masked_value: torch.Tensor | None,
        masked_token: torch.Tensor | None,
        masked_pad: torch.Tensor | None,
        measured: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder input ``[B, n_genes + 2, decoder_dim]`` (after ``decoder_embed``)."""
        masked = (masked_index, masked_value, masked_token, masked_pad)
        constant, source, index, _ = self._decoder_rows(
            h, gene_index, padding_mask, *masked, measured
        )
        decoder_input = constant.unsqueeze(0).expand(h.shape[0], -1, -1)
        decoder_input = decoder_input.scatter(
            1, index.unsqueeze(-1).expand(-1, -1, source.shape[-1]), source
        )
        return decoder_input[:, : self.config.seq_len]

    def masked_expression(
        self,
        h: torch.Tensor,
        gene_index: torch.Tensor,
        padding_mask: torch.Tensor,
        masked_index: torch.Tensor,
        masked_value: torch.Tensor | None = None,
        masked_token: torch.Tensor | None = None,
        masked_pad: torch.Tensor | None = None,
        *,
        with_visible: bool = False,
        measured: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predicted expression at the masked positions only, without decoding every gene.

        Equal (up to float rounding) to ``expression(..., genes=masked_index)`` with the
        per-cell key stabiliser, for single-layer decoders: every position a cell neither shows
        the encoder nor masks holds the same input in every cell, so the decoder's attention
        sums over those positions are computed once per batch
        (:meth:`~scxtrimo.module.PerformerDecoder.forward_replaced_rows`). A pretraining step
        then costs ``O(n_genes + B (L + M))`` in the decoder instead of ``O(B n_genes)``.

        Parameters
        ----------
        h, gene_index, padding_mask, masked_index, masked_value, masked_token, masked_pad
            As in :meth:`decode`.
        with_visible
            Also return the predictions at the encoder's positions ``[B, L]``.
        measured
            ``[n_genes + 3]`` bool: genes of the batch's study (``None``: all); the others are
            fed the mask embedding, never the value 0.

        Returns
        -------
        Predictions ``[B, M]`` (meaningless in unused slots), and with ``with_visible`` the
        predictions at the encoder's positions ``[B, L]`` (meaningless at padding).
        """
        masked = (masked_index, masked_value, masked_token, masked_pad)
        constant, rows, index, valid = self._decoder_rows(
            h, gene_index, padding_mask, *masked, measured
        )
        n_visible = gene_index.shape[1]
        first = 0 if with_visible else n_visible
        query_slots = torch.arange(first, rows.shape[1], device=rows.device)
        decoded = self.decoder.forward_replaced_rows(
            constant[: self.config.seq_len], rows, index, valid, query_slots
        )
        prediction = self.expression_head(self.head_norm(decoded)).squeeze(-1)
        if self.expression_bias is not None:
            positions = index[:, first:].masked_fill(~valid[:, first:], 0)
            prediction = prediction + self.expression_bias[positions]
        if with_visible:
            return prediction[:, n_visible:], prediction[:, :n_visible]
        return prediction

    def decode(
        self,
        h: torch.Tensor,
        gene_index: torch.Tensor,
        padding_mask: torch.Tensor,
        masked_index: torch.Tensor | None = None,
        masked_value: torch.Tensor | None = None,
        masked_token: torch.Tensor | None = None,
        masked_pad: torch.Tensor | None = None,
        key_stabilizer: KeyStabilizer = "cell",
        measured: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the decoder over every gene position.

        The decoder input at each of the ``n_genes + 2`` positions is: the encoder output plus the
        gene embedding where the encoder saw the position (incl. T and S); the value embedding of
        ``masked_value`` (or the mask embedding where ``masked_token``) plus the gene embedding at
        masked positions; the embedding of the value 0 plus the gene embedding elsewhere. It is
        then projected by ``decoder_embed`` and passed through the Performer.

        Parameters
        ----------
        h
            Encoder outputs ``[B, L, encoder_dim]``.
        gene_index
            Encoder gene indices ``[B, L]``.
        padding_mask
            Encoder padding ``[B, L]``.
        masked_index
            Masked gene indices ``[B, M]`` (never visible to the encoder), or ``None``.
        masked_value
            Decoder input values at masked positions ``[B, M]`` (``None``: 0).
        masked_token
            ``[B, M]``, ``True`` = use the learned mask embedding (``None``: no mask tokens).
        masked_pad
            ``[B, M]``, ``True`` = unused slot (``None``: all slots used).
        key_stabilizer
            ``"cell"`` (outputs independent of the other cells in the batch) or ``"batch"`` (the
            official batched behaviour); see ``module._performer.favor_softmax_features``.
        measured
            ``[n_genes + 3]`` bool: genes the cells' study measured (``None``: all); the
            others hold the mask embedding instead of the value 0.

        Returns
        -------
        Decoder outputs ``[B, n_genes + 2, decoder_dim]`` after the Performer's final LayerNorm.
        """
        masked = (masked_index, masked_value, masked_token, masked_pad)
        decoder_input = self._decoder_input(h, gene_index, padding_mask, *masked, measured)
        return self.decoder(decoder_input, key_stabilizer=key_stabilizer)

    @staticmethod
    def _select_positions(decoded: torch.Tensor, genes: torch.Tensor | None) -> torch.Tensor:
        if genes is None:
            return decoded
        genes = genes.to(device=decoded.device, dtype=torch.long)
        if genes.ndim == 1:
            return decoded.index_select(1, genes)
        return decoded.gather(1, genes.unsqueeze(-1).expand(-1, -1, decoded.shape[-1]))

    def gene_embeddings(
        self,
        h: torch.Tensor,
        gene_index: torch.Tensor,
        padding_mask: torch.Tensor,
        masked_index: torch.Tensor | None = None,
        masked_value: torch.Tensor | None = None,
        masked_token: torch.Tensor | None = None,
        masked_pad: torch.Tensor | None = None,
        key_stabilizer: KeyStabilizer = "cell",
        genes: torch.Tensor | None = None,
        measured: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Context-specific gene embeddings (decoder output after the head LayerNorm).

        Parameters
        ----------
        h, gene_index, padding_mask, masked_index, masked_value, masked_token, masked_pad, key_stabilizer, measured
            As in :meth:`decode`.
        genes
            Positions to return: int64 ``[G]`` (same for every cell) or ``[B, G]``; ``None``
            returns all ``n_genes + 2`` positions (callers usually keep ``[:, :n_genes]``).

        Returns
        -------
        Gene embeddings ``[B, n_genes + 2 or G, decoder_dim]``.
        """
        masked = (masked_index, masked_value, masked_token, masked_pad)
        decoded = self.decode(
            h, gene_index, padding_mask, *masked, key_stabilizer=key_stabilizer, measured=measured
        )
        return self.head_norm(self._select_positions(decoded, genes))

    def expression(
        self,
        h: torch.Tensor,
        gene_index: torch.Tensor,
        padding_mask: torch.Tensor,
        masked_index: torch.Tensor | None = None,
        masked_value: torch.Tensor | None = None,
        masked_token: torch.Tensor | None = None,
        masked_pad: torch.Tensor | None = None,
        key_stabilizer: KeyStabilizer = "cell",
        genes: torch.Tensor | None = None,
        measured: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted expression (log1p-normalised scale) at every or selected positions.

        Parameters
        ----------
        h, gene_index, padding_mask, masked_index, masked_value, masked_token, masked_pad, key_stabilizer, genes, measured
            As in :meth:`gene_embeddings`.

        Returns
        -------
        Predictions ``[B, n_genes + 2 or G]``.
        """
        masked = (masked_index, masked_value, masked_token, masked_pad)
        embeddings = self.gene_embeddings(
            h, gene_index, padding_mask, *masked, key_stabilizer, genes=genes, measured=measured
        )
        prediction = self.expression_head(embeddings).squeeze(-1)
        if self.expression_bias is not None:
            bias = self.expression_bias
            if genes is None:
                prediction = prediction + bias
            else:
                prediction = prediction + bias[genes.to(device=bias.device, dtype=torch.long)]
        return prediction

    # -- scvi-tools hooks -------------------------------------------------------------------------
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {
            "gene_index": tensors["gene_index"],
            "value": tensors["value"],
            "padding_mask": tensors["padding_mask"],
        }
        if "view2_gene_index" in tensors:  # pretraining with the cell-level contrastive term
            inputs["view2"] = (
                tensors["view2_gene_index"],
                tensors["view2_value"],
                tensors["view2_padding_mask"],
            )
        return inputs

    def inference(
        self,
        gene_index: torch.Tensor,
        value: torch.Tensor,
        padding_mask: torch.Tensor,
        pooling: Pooling = "all",
        view2: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode and pool.

        Parameters
        ----------
        gene_index, value, padding_mask
            Encoder batch, see :meth:`encode`.
        pooling
            Pooling of the returned ``z`` (see :meth:`pool`); the classifier always uses
            ``"all"``.
        view2
            ``(gene_index, value, padding_mask)`` of a second view of the same cells, encoded
            and pooled the same way into ``"z_view2"`` (pretraining's contrastive term).

        Returns
        -------
        ``{"h": encoder outputs [B, L, d], "z": cell embeddings}`` plus ``"logits"`` ``[B,
        n_labels]`` when the module has a classification head and ``"z_view2"`` with
        ``view2``.
        """
        h = self.encode(gene_index, value, padding_mask)
        z_all = self.pool(h, padding_mask, "all")
        outputs = {"h": h, "z": z_all if pooling == "all" else self.pool(h, padding_mask, pooling)}
        if view2 is not None:
            h2 = self.encode(*view2)
            outputs["z_view2"] = self.pool(h2, view2[2], pooling)
        if self.classifier is not None:
            outputs["logits"] = self.classifier(z_all)
        return outputs

    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor | None]:
        return {
            "h": inference_outputs["h"],
            "gene_index": tensors["gene_index"],
            "padding_mask": tensors["padding_mask"],
            "masked_index": tensors.get("masked_index"),
            "masked_value": tensors.get("masked_value"),
            "masked_token": tensors.get("masked_token"),
            "masked_pad": tensors.get("masked_pad"),
            "measured": tensors.get("measured"),
            # Predictions at the encoder's genes only when the loss uses them.
            "with_visible": self.config.visible_loss_weight > 0 and "visible_target" in tensors,
        }

    def generative(
        self,
        h: torch.Tensor,
        gene_index: torch.Tensor,
        padding_mask: torch.Tensor,
        masked_index: torch.Tensor | None = None,
        masked_value: torch.Tensor | None = None,
        masked_token: torch.Tensor | None = None,
        masked_pad: torch.Tensor | None = None,
        key_stabilizer: KeyStabilizer = "cell",
        with_visible: bool = False,
        measured: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Predict the values at the masked positions.

        The prediction at a masked position depends on every position of the cell, but only the
        ``M`` masked ones are computed: single-layer decoders with the per-cell stabiliser use
        :meth:`masked_expression` (shared positions summed once per batch), deeper decoders run
        over every position. Without ``masked_index`` (e.g. classification fine-tuning) the
        decoder is skipped.

        Parameters
        ----------
        h, gene_index, padding_mask, masked_index, masked_value, masked_token, masked_pad, key_stabilizer
            As in :meth:`decode`.
        with_visible
            Also predict the values at the encoder's positions (``"visible_prediction"``
            ``[B, L]``), for the loss term weighted by ``config.visible_loss_weight``.
        measured
            Genes of the batch's study, see :meth:`decode`.

        Returns
        -------
        ``{"prediction": [B, M]}`` (``None`` without masked positions; padded slots hold
        meaningless values).
        """
        if masked_index is None:
            return {"prediction": None}
        unused = (
            masked_pad.to(torch.bool)
            if masked_pad is not None
            else torch.zeros_like(masked_index, dtype=torch.bool)
        )
        args = (h, gene_index, padding_mask, masked_index, masked_value, masked_token, masked_pad)
        if key_stabilizer == "cell" and self.config.decoder_depth == 1:
            if with_visible:
                prediction, visible = self.masked_expression(
                    *args, with_visible=True, measured=measured
                )
                return {"prediction": prediction, "visible_prediction": visible}
            return {"prediction": self.masked_expression(*args, measured=measured)}
        positions = masked_index.masked_fill(unused, 0)
        if with_visible:
            positions = torch.cat([positions, gene_index.masked_fill(padding_mask, 0)], dim=1)
        prediction = self.expression(
            *args, key_stabilizer=key_stabilizer, genes=positions, measured=measured
        )
        if with_visible:
            n_masked = masked_index.shape[1]
            return {
                "prediction": prediction[:, :n_masked],
                "visible_prediction": prediction[:, n_masked:],
            }
        return {"prediction": prediction}

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        generative_outputs: dict[str, torch.Tensor | None],
        classification_weight: float = 1.0,
        cell_mean: bool = False,
    ) -> LossOutput:
        """Masked-regression loss and, with labels and a classifier, cross-entropy.

        Parameters
        ----------
        tensors
            The batch.
        inference_outputs
            Output of :meth:`inference`.
        generative_outputs
            Output of :meth:`generative`.
        classification_weight
            Weight of the cross-entropy term in ``loss``.
        cell_mean
            Average the squared errors within each cell first, then over cells (every cell
            weighs the same whatever its study's gene count; the mean of equal-sized shards is
            the mean of the whole batch, so data-parallel steps equal one-process steps).
            ``False``: one mean over all used slots of the batch.

        Returns
        -------
        ``loss`` = mean squared error over all used masked slots (+ ``visible_loss_weight`` x
        the MSE at the encoder's genes against ``tensors["visible_target"]``, when the config
        asks for it; + weighted cross-entropy); ``reconstruction_loss`` = per-cell masked MSE
        ``[B]``; ``extra_metrics``: ``masked_mse_nonzero``/``masked_mse_zero`` (MSE over slots
        with non-zero / zero target) and ``visible_mse``.
        """
        return objective(
            tensors,
            inference_outputs,
            generative_outputs,
            classifier=self.classifier,
            visible_loss_weight=self.config.visible_loss_weight,
            classification_weight=classification_weight,
            cell_mean=cell_mean,
        )

    @torch.inference_mode()
    def sample(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Not available: xTrimoGene is not a generative model one can sample from."""
        raise NotImplementedError(
            "XTrimoGeneModule is a masked-regression foundation model and has no likelihood to "
            "sample from; use `expression()` for predicted (log1p-normalised) expression."
        )
