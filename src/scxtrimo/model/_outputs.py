"""What a model computes for cells: embeddings from the encoder, gene embeddings and expression from the decoder."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from scxtrimo.data._tokens import TargetDepth
from scxtrimo.inference import (
    DecoderOutput,
    InvalidCells,
    Pooling,
    embed_prepared,
    gene_embedding_table,
    iter_decoder,
)


class OutputsMixin:
    """The output methods of :class:`~scxtrimo.model.XTrimoGene`, over :mod:`scxtrimo.inference`.

    Each method checks its input once with ``prepare_input`` and hands the module and the
    checked input to the inference engine; nothing here runs the network itself.
    """

    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        batch_size: int | None = None,
        pooling: Pooling = "all",
        *,
        target_depth: float | str | TargetDepth | None = None,
        max_tokens: int = 16_384,
        max_genes: int | Literal["all"] | None = None,
        invalid_cells: InvalidCells = "raise",
        device: str | torch.device | None = None,
        autocast: bool | None = None,
        progress_bar: bool | None = None,
        precision: Literal["fp32", "bf16", "int8"] = "fp32",
        **setup_overrides,
    ) -> np.ndarray:
        """Cell embeddings from the encoder (the decoder never runs).

        Cells are sorted into length buckets, batched under a token budget and streamed in
        row chunks (also from backed files); the result is in the original cell order. A cell's
        embedding does not depend on the batch size or on the other cells of its batch.

        Parameters
        ----------
        adata
            AnnData to embed; defaults to the registered one. Need not be registered.
        indices
            Cells to embed (default all); the output has one row per index, in that order.
        batch_size
            Maximum cells per batch; ``None`` lets ``max_tokens`` decide.
        pooling
            ``"all"``: ``[h(S), h(T), max over genes, mean over genes]`` (4 x encoder width,
            3,072 for scFoundation); ``"max"``: element-wise max over all tokens incl. T and S;
            ``"mean"``: mean over gene tokens.
        target_depth
            The ``T`` token (see :class:`~scxtrimo.data.TargetDepth`); ``None`` uses the
            model's default (``"t4"`` for scFoundation weights, ``"fold:1"`` for models
            pretrained by scxtrimo).
        max_tokens
            Token budget per batch (memory bound).
        max_genes
            Cap on gene tokens per cell (highest values kept); ``None`` uses
            :attr:`default_max_genes` (the cap the model was pretrained with), ``"all"`` keeps
            every gene.
        invalid_cells
            ``"raise"`` (default) or ``"skip"`` cells with < 2 in-vocabulary counts; skipped
            cells get NaN rows.
        device
            Where to compute; defaults to the model's device.
        autocast
            bf16 autocast on CUDA with ``precision="fp32"`` (default on CUDA: True; ignored on
            CPU).
        progress_bar
            Show a progress bar (default ``scxtrimo.settings.progress_bar``).
        precision
            ``"fp32"`` (default), ``"bf16"`` (autocast, CPU with AVX512-BF16/AMX or CUDA) or
            ``"int8"`` (CPU: the encoder's linear layers in int8 with dynamically quantised
            activations, on a cached copy of the module; the model is not changed). Refused
            with a clear error where the hardware lacks it.
        **setup_overrides
            ``layer``, ``gene_symbols_key``, ``gene_ids_key``, ``input_type``,
            ``total_counts_key`` for this AnnData.

        Returns
        -------
        ``float32`` array, cells x embedding width.
        """
        adata = self.adata if adata is None else adata
        if adata is None:
            raise ValueError("No AnnData: pass adata=... (the model was created without one).")
        prep = self.prepare_input(
            adata,
            indices=indices,
            target_depth=target_depth,
            max_genes=max_genes,
            invalid=invalid_cells,
            **setup_overrides,
        )
        requested = (
            np.arange(adata.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
        )
        return embed_prepared(
            self.module,
            prep,
            batch_size=batch_size,
            pooling=pooling,
            max_tokens=max_tokens,
            device=device,
            autocast=autocast,
            progress_bar=progress_bar,
            rows=requested,
            precision=precision,
        )

    def predict(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        soft: bool = False,
        batch_size: int | None = None,
        *,
        max_tokens: int = 16_384,
        max_genes: int | Literal["all"] | None = None,
        invalid_cells: InvalidCells = "raise",
        device: str | torch.device | None = None,
        progress_bar: bool | None = None,
        **setup_overrides,
    ) -> np.ndarray | pd.DataFrame:
        """Cell types from the fine-tuned classification head (as scvi-tools' ``SCANVI.predict``).

        Parameters
        ----------
        adata
            Cells to classify; defaults to the registered AnnData. Not modified, need not be
            registered.
        indices
            Cells of ``adata`` (default all), in output order.
        soft
            ``False``: the most probable class of each cell; ``True``: the probability of
            every class.
        batch_size, max_tokens, invalid_cells, device, progress_bar
            As in :meth:`get_latent_representation`; skipped cells get ``None`` (hard) or NaN
            rows (soft).
        max_genes
            Cap on gene tokens per cell; ``None`` uses the cap the head was fine-tuned with.
        **setup_overrides
            ``layer``, ``gene_symbols_key``, ``gene_ids_key``, ``input_type``,
            ``total_counts_key`` for this AnnData; ``None`` keeps the model's.

        Returns
        -------
        With ``soft=False``, an object array of class labels (``None`` for skipped cells);
        with ``soft=True``, a ``float32`` DataFrame ``cells x classes`` (index: the cells'
        ``obs_names``; columns: :attr:`label_categories`, in the head's order).

        Raises
        ------
        ValueError
            If the model has no classification head, or it has not been trained.
        """
        adata = self.adata if adata is None else adata
        if adata is None:
            raise ValueError("No AnnData: pass adata=... (the model was created without one).")
        info = self.classifier_
        if self.module.classifier is None or not info:
            raise ValueError(
                "This model has no classification head. Fine-tune one: "
                "model.add_classifier(adata, labels_key=...) then model.train(finetune='head'), "
                "or annotate from a labelled reference AnnData instead of the model."
            )
        if not info.get("trained"):
            raise ValueError(
                "The model's classification head has not been trained; run "
                "model.train(finetune='head' | 'last_layers' | 'full') first."
            )
        max_genes = info.get("max_genes") if max_genes is None else max_genes
        prep = self.prepare_input(
            adata, indices=indices, max_genes=max_genes, invalid=invalid_cells, **setup_overrides
        )
        rows = np.arange(adata.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
        z = embed_prepared(
            self.module,
            prep,
            batch_size=batch_size,
            max_tokens=max_tokens,
            device=device,
            progress_bar=progress_bar,
            rows=rows,
        )
        head = self.module.classifier
        weight = head.weight.detach().double().cpu()  # float64: heads fitted on standardised
        bias = head.bias.detach().double().cpu()  # features can have large, cancelling weights
        probabilities = np.full((z.shape[0], weight.shape[0]), np.nan, dtype=np.float32)
        valid = np.flatnonzero(np.isfinite(z).all(axis=1))
        for start in range(0, valid.size, 4096):
            chunk = valid[start : start + 4096]
            with torch.inference_mode():
                logits = torch.from_numpy(z[chunk].astype(np.float64)) @ weight.T + bias
                probabilities[chunk] = torch.softmax(logits, dim=-1).numpy()
        classes = self.label_categories
        if soft:
            return pd.DataFrame(
                probabilities, index=adata.obs_names[rows], columns=pd.Index(classes)
            )
        labels = np.full(len(rows), None, dtype=object)
        labels[valid] = np.asarray(classes, dtype=object)[probabilities[valid].argmax(axis=1)]
        return labels

    def get_gene_embeddings(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        *,
        genes: Sequence[str] | None = None,
        batch_size: int = 4,
        target_depth: float | str | TargetDepth | None = None,
        key_stabilizer: Literal["cell", "batch"] = "cell",
        dtype: np.dtype | type = np.float32,
        device: str | torch.device | None = None,
        progress_bar: bool | None = None,
        **setup_overrides,
    ) -> pd.DataFrame | np.ndarray:
        """Gene embeddings: context-free (no ``adata``) or per cell from the decoder.

        Without ``adata``, returns the model's gene-embedding table (one row per vocabulary
        gene). With ``adata``, runs encoder and decoder and returns each cell's context-specific
        gene embeddings (scFoundation's "gene" output), ``cells x genes x decoder width``; for
        the released model that is 19,264 x 512 floats (39 MB) per cell, so pass ``genes``
        and/or use :meth:`iter_gene_embeddings` to stream.

        Parameters
        ----------
        adata
            Cells to embed the genes of; ``None`` for the context-free table.
        indices
            Cells of ``adata`` (default all).
        genes
            Vocabulary gene symbols to return (default all 19,264).
        batch_size
            Cells per decoder pass.
        target_depth
            ``T``; ``None`` uses the model default.
        key_stabilizer
            ``"cell"`` (default): batch-independent results. ``"batch"``: the official batched
            (``gene_batch``) numerics, which depend on the other cells of the batch.
        dtype
            Output dtype (``np.float16`` halves the memory).
        device
            Where to compute.
        progress_bar
            Show a progress bar.
        **setup_overrides
            ``layer``, ``gene_symbols_key``... for this AnnData.

        Returns
        -------
        DataFrame (context-free) or array ``[cells, genes, decoder_dim]``.
        """
        if adata is None:
            return gene_embedding_table(self.module, genes)
        parts = [
            part
            for _, part in self.iter_gene_embeddings(
                adata,
                indices,
                genes=genes,
                batch_size=batch_size,
                target_depth=target_depth,
                key_stabilizer=key_stabilizer,
                device=device,
                progress_bar=progress_bar,
                **setup_overrides,
            )
        ]
        return np.concatenate(parts).astype(dtype, copy=False)

    def iter_gene_embeddings(self, adata: AnnData, indices=None, **kwargs):
        """Stream per-cell gene embeddings: yields ``(cell indices, [cells, genes, d])`` chunks.

        Takes the arguments of :meth:`get_gene_embeddings`; memory stays bounded by
        ``batch_size`` x genes x decoder width.
        """
        yield from self._decode(adata, indices, output="embeddings", **kwargs)

    def get_expression(
        self,
        adata: AnnData,
        indices: Sequence[int] | np.ndarray | None = None,
        *,
        genes: Sequence[str] | None = None,
        target_depth: float | str | TargetDepth | None = None,
        batch_size: int = 8,
        key_stabilizer: Literal["cell", "batch"] = "cell",
        device: str | torch.device | None = None,
        progress_bar: bool | None = None,
        **setup_overrides,
    ) -> np.ndarray:
        """Expression predicted by the decoder, on the ``log1p(x / total * 1e4)`` scale.

        With ``target_depth`` above the cell's own depth (e.g. ``"fold:10"`` or ``"add:1"``)
        this is scFoundation's read-depth enhancement: the profile the model expects had the
        cell been sequenced deeper.

        Parameters
        ----------
        adata
            Cells (raw counts by default).
        indices
            Cells to predict (default all), in output order.
        genes
            Vocabulary gene symbols to return (default all 19,264, in vocabulary order).
        target_depth
            ``T``; ``None`` uses the model default.
        batch_size
            Cells per decoder pass (the decoder spans all 19,266 positions per cell).
        key_stabilizer, device, progress_bar, **setup_overrides
            As in :meth:`get_gene_embeddings`.

        Returns
        -------
        ``float32`` array ``[cells, genes]``.
        """
        parts = [
            part
            for _, part in self._decode(
                adata,
                indices,
                output="expression",
                genes=genes,
                batch_size=batch_size,
                target_depth=target_depth,
                key_stabilizer=key_stabilizer,
                device=device,
                progress_bar=progress_bar,
                **setup_overrides,
            )
        ]
        return np.concatenate(parts)

    def _decode(
        self,
        adata: AnnData,
        indices: Sequence[int] | np.ndarray | None = None,
        *,
        output: DecoderOutput,
        genes: Sequence[str] | None = None,
        batch_size: int = 4,
        target_depth: float | str | TargetDepth | None = None,
        key_stabilizer: Literal["cell", "batch"] = "cell",
        device: str | torch.device | None = None,
        progress_bar: bool | None = None,
        **setup_overrides,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Check ``adata``, then :func:`~scxtrimo.inference.iter_decoder` over ``indices``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        prep = self.prepare_input(
            adata, indices=indices, target_depth=target_depth, **setup_overrides
        )
        yield from iter_decoder(
            self.module,
            prep,
            output=output,
            genes=genes,
            batch_size=batch_size,
            key_stabilizer=key_stabilizer,
            device=device,
            progress_bar=progress_bar,
        )
