"""The user-facing xTrimoGene model: scvi-tools API over the asymmetric transformer."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, NumericalObsField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin
from scvi.train import TrainRunner

from scxtrimo._settings import settings
from scxtrimo.data._matrix import get_matrix
from scxtrimo.data._tokens import MaskingSpec, TargetDepth
from scxtrimo.data._validation import scan_cells
from scxtrimo.data._vocabulary import log_overlap, map_genes
from scxtrimo.module import XTrimoGeneConfig, XTrimoGeneModule, get_config
from scxtrimo.train._finetune import FinetuneMode
from scxtrimo.train._plan import XTrimoGeneTrainingPlan

from . import _inference
from ._inference import SETUP_DEFAULTS, InvalidCells, Pooling, PreparedInput
from ._io import (
    METADATA_FILE,
    MODEL_FILE,
    classifier_info,
    empty_registry,
    load_state_dict_checked,
    read_metadata,
    read_state_dict,
    registered_labels,
    registry_from_json,
    restore_saved_attributes,
    saved_metadata,
    write_model_files,
)

logger = logging.getLogger("scxtrimo")

__all__ = ["PreparedInput", "XTrimoGene"]

TOTAL_COUNTS_KEY = "total_counts"


class XTrimoGene(UnsupervisedTrainingMixin, BaseModelClass):
    """xTrimoGene / scFoundation single-cell foundation model.

    An asymmetric transformer: the encoder attends only over a cell's non-zero genes (plus the
    read-depth tokens T and S), a Performer decoder reconstructs the whole 19,264-gene axis,
    and expression values enter through a learned auto-discretisation embedding. Pretraining
    is masked regression with read-depth-aware down-sampling.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (raw counts). May be ``None`` for a
        model used only for inference (e.g. from :meth:`from_scfoundation`). When it was
        registered with ``labels_key``, the module gets a classification head with one output
        per label category, trained by ``train(finetune=...)``; its classes are
        :attr:`label_categories`.
    config
        Name of a configuration (``"tiny"``, ``"small"``, ``"base"``, ``"scfoundation"``), a
        mapping of fields, or an :class:`~scxtrimo.module.XTrimoGeneConfig`.
    seed
        Seed for the weight initialisation; ``None`` uses ``scxtrimo.settings.seed``.
    **overrides
        Configuration fields to change (e.g. ``encoder_depth=2``).

    Examples
    --------
    >>> import scxtrimo
    >>> adata = scxtrimo.datasets.pbmc4k()
    >>> scxtrimo.model.XTrimoGene.setup_anndata(adata)
    >>> model = scxtrimo.model.XTrimoGene(adata, config="small")
    >>> model.train(max_epochs=5)
    >>> adata.obsm["X_scxtrimo"] = model.get_latent_representation()
    """

    _module_cls = XTrimoGeneModule
    _training_plan_cls = XTrimoGeneTrainingPlan
    _train_runner_cls = TrainRunner

    def __init__(
        self,
        adata: AnnData | None = None,
        config: str | dict | XTrimoGeneConfig = "small",
        *,
        seed: int | None = None,
        registry: dict | None = None,
        **overrides,
    ) -> None:
        if adata is None and registry is None:
            registry = empty_registry(type(self).__name__, SETUP_DEFAULTS)
        super().__init__(adata, registry=registry)
        cfg = get_config(config, **overrides)
        seed = settings.seed if seed is None else seed
        labels_key, categories = registered_labels(self.registry_)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = self._module_cls(cfg, n_labels=len(categories))
        self.module.eval()
        self.classifier_ = classifier_info(labels_key, categories) if categories else None
        self.config_ = cfg.to_dict()
        self.default_target_depth_ = "fold:1"
        # Cap on gene tokens per cell at inference: the cap the model was pretrained with.
        self.default_max_genes_: int | None = None
        self.source_ = "scxtrimo"
        self.seed_ = seed
        self._update_summary()
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------------------------
    # Registration
    # ------------------------------------------------------------------------------------

    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        *,
        gene_symbols_key: str | None = None,
        gene_ids_key: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        input_type: Literal["counts", "log1p"] = "counts",
        total_counts_key: str | None = None,
        **kwargs,
    ) -> None:
        """Register an AnnData for training with :class:`XTrimoGene`.

        The genes are matched to the 19,264-gene vocabulary (by symbol, or Ensembl ID) and the
        matrix is checked before anything is registered; errors say what is wrong and how to
        fix it. Registration adds scvi-tools' bookkeeping keys (``obs["_scvi_batch"]``,
        ``obs["_scvi_labels"]``, ``uns["_scvi_uuid"]``...) to ``adata``; embedding alone
        (:func:`scxtrimo.tl.embed`) needs no registration and changes nothing but its outputs.

        Parameters
        ----------
        adata
            Cells x genes, raw counts in ``.X`` or ``layer``; in memory or backed.
        layer
            Layer with the raw counts; ``None`` uses ``.X``.
        gene_symbols_key
            ``var`` column with gene symbols; ``None`` uses ``var_names``.
        gene_ids_key
            ``var`` column with Ensembl gene IDs (matched first).
        batch_key
            ``obs`` column of batches (recorded; the model itself is batch-agnostic).
        labels_key
            ``obs`` column of cell-type labels (for fine-tuning and evaluation).
        input_type
            ``"counts"`` (default): raw integer counts. ``"log1p"``: log-normalised values
            (``log1p(x / total * 1e4)``); give ``total_counts_key`` so that S is the cell's
            real depth.
        total_counts_key
            ``obs`` column of per-cell total counts, used as the read depth S for
            ``input_type="log1p"``.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        _inference.check_setup_arguments(
            adata,
            batch_key=batch_key,
            labels_key=labels_key,
            input_type=input_type,
            total_counts_key=total_counts_key,
        )
        mapping = map_genes(adata.var, gene_symbols_key=gene_symbols_key, gene_ids_key=gene_ids_key)
        stats = scan_cells(
            get_matrix(adata, layer),
            mapping.col_to_vocab,
            input_type=input_type,
            obs_names=adata.obs_names,
            var_names=adata.var_names,
        )
        log_overlap(mapping, stats.count_fraction)
        fields = [
            LayerField(
                REGISTRY_KEYS.X_KEY,
                layer,
                is_count_data=input_type == "counts",
                correct_data_format=False,  # never rewrite the user's matrix
            ),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
        ]
        if total_counts_key is not None:
            fields.append(NumericalObsField(TOTAL_COUNTS_KEY, total_counts_key))
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    # ------------------------------------------------------------------------------------
    # Properties
    # ------------------------------------------------------------------------------------

    @property
    def config(self) -> XTrimoGeneConfig:
        """The module's architecture."""
        return self.module.config

    @property
    def setup_args(self) -> dict:
        """How the model reads an AnnData (layer, gene keys, input type)."""
        args = dict(SETUP_DEFAULTS)
        saved = (self.registry_ or {}).get("setup_args", {}) or {}
        args.update({k: saved[k] for k in SETUP_DEFAULTS if k in saved})
        return args

    @property
    def label_categories(self) -> list | None:
        """Classes of the classification head, in the order of its outputs (``None``: no head)."""
        return None if not self.classifier_ else list(self.classifier_["categories"])

    # ------------------------------------------------------------------------------------
    # Classification head
    # ------------------------------------------------------------------------------------

    def add_classifier(
        self,
        adata: AnnData,
        labels_key: str,
        *,
        batch_key: str | None = None,
        seed: int | None = None,
    ) -> None:
        """Attach labelled data and a fresh classification head, keeping all other weights.

        This is how a pretrained model (:meth:`load`, :meth:`from_scfoundation`) is prepared
        for fine-tuning: ``adata`` is registered with the model's input settings and
        ``labels_key``, becomes the model's AnnData, and a new, randomly initialised linear
        head with one output per class replaces any existing one. Then call
        ``model.train(finetune="head" | "last_layers" | "full")``.

        Parameters
        ----------
        adata
            Labelled cells, with the same kind of input as the model (raw counts by default).
        labels_key
            ``obs`` column of cell-type labels; its categories become the head's classes.
        batch_key
            ``obs`` column of batches (recorded only).
        seed
            Seed of the head's initialisation (default: the model's seed).

        Examples
        --------
        >>> model = XTrimoGene.load("pretrained/")
        >>> model.add_classifier(adata, labels_key="cell_type")
        >>> model.train(max_epochs=5, finetune="head")
        >>> scxtrimo.tl.annotate(query, model)
        """
        args = {k: v for k, v in self.setup_args.items() if v is not None}
        type(self).setup_anndata(adata, labels_key=labels_key, batch_key=batch_key, **args)
        self._adata = adata
        self._adata_manager = self._get_most_recent_anndata_manager(adata, required=True)
        self._register_manager_for_instance(self._adata_manager)
        self.registry_ = self._adata_manager._registry
        self.summary_stats = AnnDataManager._get_summary_stats_from_registry(self.registry_)
        _, categories = registered_labels(self.registry_)
        self._set_classifier(categories, labels_key, seed=seed)

    def _update_summary(self) -> None:
        cfg, n_labels = self.config, self.module.n_labels
        n_params = sum(p.numel() for p in self.module.parameters())
        self._model_summary_string = (
            f"XTrimoGene: encoder {cfg.encoder_dim}-d x {cfg.encoder_depth} layers, Performer "
            f"decoder {cfg.decoder_dim}-d x {cfg.decoder_depth} layers, {n_params:,} parameters"
            + (f", classification head ({n_labels} classes)" if n_labels else "")
        )

    def _set_classifier(
        self,
        categories: Sequence,
        labels_key: str | None,
        *,
        seed: int | None = None,
        info: dict | None = None,
    ) -> None:
        """Replace the classification head by a fresh one for ``categories`` (none if empty)."""
        categories = list(categories)
        module = self.module
        if not categories:
            module.classifier, module.n_labels, self.classifier_ = None, 0, None
            self._update_summary()
            return
        seed = self.seed_ if seed is None else seed
        device = next(module.parameters()).device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = torch.nn.Linear(4 * self.config.encoder_dim, len(categories))
        module.classifier = head.to(device)
        module.n_labels = len(categories)
        self.classifier_ = {**classifier_info(labels_key, categories), **(info or {})}
        self._update_summary()

    # ------------------------------------------------------------------------------------
    # Input preparation
    # ------------------------------------------------------------------------------------

    @property
    def default_max_genes(self) -> int | None:
        """Cap on gene tokens per cell used at inference when none is given.

        The cap the model was pretrained with (``train(max_genes=...)``): a model that has
        only ever seen a cell's ``k`` highest-expressed genes embeds cells the same way, which
        also bounds the cost of deep cells. ``None`` (no cap) for scFoundation weights, as in
        the official code. Set it to change the default; every inference method also takes
        ``max_genes=`` (``"all"`` for no cap).
        """
        return self.default_max_genes_

    @default_max_genes.setter
    def default_max_genes(self, value: int | None) -> None:
        self.default_max_genes_ = _inference.check_max_genes(value)

    def prepare_input(
        self,
        adata: AnnData,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        target_depth: float | str | TargetDepth | None = None,
        max_genes: int | Literal["all"] | None = None,
        invalid: InvalidCells = "raise",
        min_overlap: float = 0.5,
        **setup_overrides,
    ) -> PreparedInput:
        """Check ``adata`` and work out everything needed to stream it through the model.

        Parameters
        ----------
        adata
            Any AnnData with the model's kind of input; it does not need to be registered and
            is not modified.
        indices
            Cells to use (default all).
        target_depth
            ``T``; see :class:`~scxtrimo.data.TargetDepth`. ``None`` uses the model default.
        max_genes
            Cap on gene tokens per cell (highest values kept). ``None`` uses the model's
            default (:attr:`default_max_genes`), ``"all"`` keeps every gene.
        invalid
            Cells with fewer than 2 in-vocabulary counts: ``"raise"`` an error listing them,
            or ``"skip"`` them.
        min_overlap
            Minimum share of genes that must map to the vocabulary.
        **setup_overrides
            ``layer``, ``gene_symbols_key``, ``gene_ids_key``, ``input_type``,
            ``total_counts_key``; default to the values the model was set up with.

        Returns
        -------
        The checked input; see :class:`PreparedInput`.

        Raises
        ------
        ValueError
            If the input fails a check (bad values, too few vocabulary genes, cells that cannot
            be embedded with ``invalid="raise"``); the message says how to fix it.
        """
        return _inference.prepare_input(
            adata,
            self.setup_args,
            setup_overrides,
            n_genes=self.config.n_genes,
            default_target_depth=self.default_target_depth_,
            default_max_genes=self.default_max_genes_,
            indices=indices,
            target_depth=target_depth,
            max_genes=max_genes,
            invalid=invalid,
            min_overlap=min_overlap,
        )

    # ------------------------------------------------------------------------------------
    # Inference
    # ------------------------------------------------------------------------------------

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
            bf16 autocast on CUDA (default on CUDA: True; ignored on CPU).
        progress_bar
            Show a progress bar (default ``scxtrimo.settings.progress_bar``).
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
        return self._latent_from_prepared(
            prep,
            batch_size=batch_size,
            pooling=pooling,
            max_tokens=max_tokens,
            device=device,
            autocast=autocast,
            progress_bar=progress_bar,
            rows=requested,
        )

    def _latent_from_prepared(
        self,
        prep: PreparedInput,
        *,
        batch_size: int | None,
        pooling: Pooling,
        max_tokens: int,
        device: str | torch.device | None,
        autocast: bool | None,
        progress_bar: bool | None,
        rows: np.ndarray | None = None,
    ) -> np.ndarray:
        """Embeddings of checked input: :func:`~scxtrimo.model._inference.latent_from_prepared`."""
        return _inference.latent_from_prepared(
            self.module,
            prep,
            batch_size=batch_size,
            pooling=pooling,
            max_tokens=max_tokens,
            device=device,
            autocast=autocast,
            progress_bar=progress_bar,
            rows=rows,
        )

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
            return _inference.gene_embedding_table(self.module, genes)
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
        yield from self._iter_decoder(adata, indices, output="embeddings", **kwargs)

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
            for _, part in self._iter_decoder(
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

    @torch.inference_mode()
    def _iter_decoder(
        self,
        adata: AnnData,
        indices=None,
        *,
        output: Literal["embeddings", "expression"],
        genes: Sequence[str] | None = None,
        batch_size: int = 4,
        target_depth: float | str | TargetDepth | None = None,
        key_stabilizer: Literal["cell", "batch"] = "cell",
        device: str | torch.device | None = None,
        progress_bar: bool | None = None,
        prep: PreparedInput | None = None,
        **setup_overrides,
    ):
        """Run encoder + decoder over ``indices`` in the requested order, ``batch_size`` cells at a time.

        ``prep``: the result of :meth:`prepare_input` for ``adata`` when the caller already has
        it (the checks then run once); ``indices`` (default: its ``cells``) are decoded.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        gene_positions = _inference.vocabulary_positions(genes)
        if prep is None:
            prep = self.prepare_input(
                adata, indices=indices, target_depth=target_depth, **setup_overrides
            )
        elif indices is not None:
            prep = dataclasses.replace(prep, cells=np.asarray(indices, dtype=np.int64))
        yield from _inference.iter_decoder(
            self.module,
            prep,
            output=output,
            gene_positions=gene_positions,
            batch_size=batch_size,
            key_stabilizer=key_stabilizer,
            device=device,
            progress_bar=progress_bar,
        )

    # ------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------

    def train(
        self,
        max_epochs: int = 10,
        *,
        corpus: Sequence[AnnData | str | os.PathLike] | None = None,
        batch_size: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int | None = None,
        train_size: float = 0.9,
        masking: MaskingSpec | dict | None = None,
        view_masking: MaskingSpec | dict | None = None,
        contrastive_weight: float = 1.0,
        temperature: float = 0.2,
        max_genes: int | None = 1024,
        seed: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        strategy: str | None = None,
        num_nodes: int | None = None,
        precision: str | int | None = None,
        gradient_clip_val: float = 1.0,
        num_workers: int = 0,
        invalid_cells: InvalidCells = "skip",
        drop_last: bool = False,
        plan_kwargs: dict | None = None,
        finetune: FinetuneMode | None = None,
        n_last_layers: int = 1,
        **trainer_kwargs,
    ):
        """Pretrain (read-depth-aware masked regression + a cell-level term) or fine-tune.

        The pretraining objective has two parts. **Read-depth-aware masked regression**
        (scFoundation): half of the cells are binomially down-sampled to a random fraction of
        their counts; the input carries the lower depth ``S``, ``T`` keeps the original one,
        and the decoder predicts the original cell's normalised values at masked non-zero
        genes, masked zero genes and the genes the encoder saw, so one cell at two depths maps
        to one state. **A cell-level contrastive term**: a second view of each cell, with
        independent down-sampling and masks (and ``T = S``, so depth cannot identify it), is
        encoded, and InfoNCE over the batch asks each view's pooled embedding to find its
        twin (weight ``contrastive_weight``; 0 turns it off). The masked-regression term alone
        teaches the encoder little cell identity; the contrastive term is what makes the
        embedding separate cell types (see the evaluation in the docs).

        Training can run over several studies (``corpus``), each with its own gene set:
        batches never mix studies, genes a study did not measure carry no loss and are given
        to the decoder as unknown (the mask embedding), never as zeros.

        Parameters
        ----------
        max_epochs
            Passes over the training cells (``max_steps=`` in ``trainer_kwargs`` caps steps).
        corpus
            Studies to pretrain on: AnnData objects (in memory, backed or views) or ``.h5ad``
            paths (read backed), each with raw counts and its own genes. ``None``: the
            registered AnnData. Every study is checked before training starts; an error names
            the study.
        batch_size
            Cells per step (the global batch: under data-parallel training each of ``N``
            ranks takes ``batch_size / N`` cells of it).
        lr, weight_decay, warmup_steps
            AdamW with linear warm-up (default 5% of steps) and cosine decay.
        train_size
            Share of cells for training; the rest are held out for validation
            (``validation_loss`` in :attr:`history`).
        masking
            :class:`~scxtrimo.data.MaskingSpec` (or a dict of its fields) of the regression
            view: masking rates and down-sampling (``downsample_prob=0`` turns off the
            read-depth pairs).
        view_masking
            The same for the contrastive view (default: always down-sampled, scFoundation
            masking rates).
        contrastive_weight
            Weight of the InfoNCE term; 0: masked regression only (no second view is built).
        temperature
            Softmax temperature of the InfoNCE term.
        max_genes
            Cap on visible gene tokens per cell (a cell's highest values are kept; ``None``: no
            cap). Attention costs grow with the square of a cell's tokens, so the cap bounds the
            cost of deep cells. After pretraining it becomes :attr:`default_max_genes`, the cap
            used at inference.
        seed
            Seed for masks, down-sampling, the split, batch order and dropout. Masks and
            down-sampling are drawn per cell from (seed, epoch, cell), independent of the
            batch and of the number of processes.
        accelerator, devices, strategy, num_nodes, precision, gradient_clip_val
            Passed to the Lightning trainer (e.g. ``accelerator="gpu", devices=4,
            strategy="ddp", precision="bf16-mixed"``; ``num_nodes`` for multi-node runs
            launched by ``torchrun`` or SLURM).
        num_workers
            DataLoader workers building batches in parallel (in-memory data only).
        invalid_cells
            Cells with < 2 in-vocabulary counts are ``"skip"``-ped (default) or ``"raise"``.
        drop_last
            Drop each study's incomplete last batch every epoch (equal batch sizes).
        plan_kwargs
            More arguments for :class:`~scxtrimo.train.XTrimoGeneTrainingPlan`.
        finetune
            ``None`` (default): pretraining. Otherwise fine-tune the
            classification head for the registered labels (``setup_anndata(...,
            labels_key=...)`` or :meth:`add_classifier`) with cross-entropy; batches hold the
            cells' encoder tokens and labels, nothing is masked and the decoder does not run.
            ``"head"``: only the head, on the frozen encoder (a linear probe; the cell
            embeddings are computed once, so epochs are almost free);
            ``"last_layers"``: the head, the last ``n_last_layers`` encoder layers and the
            encoder's final LayerNorm; ``"full"``: the head, the embeddings and the whole
            encoder. Frozen parts run without dropout; the decoder is never changed. The
            history then holds ``train_loss``/``validation_loss`` (cross-entropy) and
            ``train_accuracy``/``validation_accuracy``; predict with
            :func:`scxtrimo.tl.annotate`. ``masking`` and ``corpus`` are ignored.
        n_last_layers
            Encoder layers trained with ``finetune="last_layers"``.
        **trainer_kwargs
            More arguments for :class:`scvi.train.Trainer` / :class:`lightning.pytorch.Trainer`
            (``callbacks``, ``enable_checkpointing``, ``ckpt_path`` to resume, ``max_steps``,
            ``max_time``...).
        """
        if self.adata is None:
            raise ValueError(
                "Training needs registered data: XTrimoGene.setup_anndata(adata) and "
                "XTrimoGene(adata, ...), or model = XTrimoGene.load(path, adata=adata)."
            )
        seed = self.seed_ if seed is None else seed
        common = {
            "max_epochs": max_epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "warmup_steps": warmup_steps,
            "train_size": train_size,
            "max_genes": max_genes,
            "seed": seed,
            "accelerator": accelerator,
            "devices": devices,
            "precision": precision,
            "gradient_clip_val": gradient_clip_val,
            "num_workers": num_workers,
            "invalid_cells": invalid_cells,
            "plan_kwargs": plan_kwargs,
        }
        if finetune is not None:
            from scxtrimo.train._finetune import run_finetuning

            if strategy is not None:
                trainer_kwargs["strategy"] = strategy
            if num_nodes is not None:
                trainer_kwargs["num_nodes"] = num_nodes
            return run_finetuning(
                self,
                mode=finetune,
                n_last_layers=n_last_layers,
                trainer_kwargs=trainer_kwargs,
                **common,
            )
        from scxtrimo.train._pretrain import run_pretraining

        return run_pretraining(
            self,
            [self.adata] if corpus is None else corpus,
            masking=_masking_spec(masking, MaskingSpec()),
            view_masking=_masking_spec(view_masking, None),
            contrastive_weight=contrastive_weight,
            temperature=temperature,
            strategy=strategy,
            num_nodes=num_nodes,
            drop_last=drop_last,
            trainer_kwargs=trainer_kwargs,
            **common,
        )

    # ------------------------------------------------------------------------------------
    # Save / load
    # ------------------------------------------------------------------------------------

    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model: weights (``model.pt``) and metadata (``model.json``).

        The weights file holds only tensors, so :meth:`load` reads it with
        ``torch.load(weights_only=True)``; the metadata record the scxtrimo version, the
        architecture and how the model reads an AnnData.

        Parameters
        ----------
        dir_path
            Directory to write (created).
        prefix
            Prefix for the file names.
        overwrite
            Replace an existing directory's model files.
        save_anndata
            Also write the registered AnnData as ``adata.h5ad``.
        **anndata_write_kwargs
            Passed to :meth:`anndata.AnnData.write_h5ad`.
        """
        path = Path(dir_path)
        prefix = prefix or ""
        weights = path / f"{prefix}{MODEL_FILE}"
        if weights.exists() and not overwrite:
            raise FileExistsError(f"{weights} exists; pass overwrite=True to replace it.")
        path.mkdir(parents=True, exist_ok=True)
        if save_anndata:
            if self.adata is None:
                raise ValueError("save_anndata=True but the model has no AnnData.")
            self.adata.write_h5ad(path / f"{prefix}adata.h5ad", **anndata_write_kwargs)
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        write_model_files(weights, path / f"{prefix}{METADATA_FILE}", state, saved_metadata(self))

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | None = None,
        *,
        device: str | None = None,
        prefix: str | None = None,
    ) -> XTrimoGene:
        """Load a model written by :meth:`save`.

        Weights are read with ``torch.load(weights_only=True)``: a file crafted to run code on
        load is refused. The metadata and every tensor name and shape are checked against the
        architecture before anything is loaded.

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        adata
            AnnData to attach (set up with the saved arguments); ``None`` for inference only.
        device
            Device to put the model on (default ``scxtrimo.settings.device``).
        prefix
            File-name prefix used when saving.
        """
        path = Path(dir_path)
        prefix = prefix or ""
        metadata = read_metadata(path / f"{prefix}{METADATA_FILE}", expected_class=cls.__name__)
        config = XTrimoGeneConfig.from_dict(metadata["config"])
        state = read_state_dict(path / f"{prefix}{MODEL_FILE}")
        registry = registry_from_json(metadata.get("registry"), cls.__name__, SETUP_DEFAULTS)
        classifier = metadata.get("classifier") or None
        if adata is not None:
            setup = {k: v for k, v in metadata["setup_args"].items() if v is not None}
            key = (classifier or {}).get("labels_key")
            if key in adata.obs.columns and adata.obs[key].notna().all():
                setup["labels_key"] = key  # labelled data: ready to fine-tune further
            cls.setup_anndata(adata, **setup)
            model = cls(adata, config=config, seed=metadata.get("seed"))
        else:
            model = cls(None, config=config, seed=metadata.get("seed"), registry=registry)
            model.registry_["setup_args"] = dict(metadata["setup_args"])
        # The head is the one that was saved, whatever the attached data registers.
        model._set_classifier(
            (classifier or {}).get("categories") or [],
            (classifier or {}).get("labels_key"),
            info=classifier,
        )
        load_state_dict_checked(model.module, state, source=str(path / f"{prefix}{MODEL_FILE}"))
        restore_saved_attributes(model, metadata)
        model.to_device(settings.resolve_device(device))
        model.module.eval()
        return model

    @classmethod
    def from_scfoundation(
        cls,
        path: str | os.PathLike,
        adata: AnnData | None = None,
        *,
        checkpoint: Literal["cell", "rde", "gene"] = "cell",
        device: str | None = None,
    ) -> XTrimoGene:
        """Load the official scFoundation checkpoint (``models.ckpt``).

        The file holds three sub-models: ``"cell"`` for cell embeddings, ``"rde"`` for
        read-depth-enhanced cell embeddings (use with ``target_depth`` above the cell's depth,
        e.g. ``"add:1"``), ``"gene"`` for gene embeddings and predicted expression. The file is
        read with ``torch.load(weights_only=True, mmap=True)`` (never unpickling code, and
        reading only the chosen sub-model from disk); its structure and every tensor shape are
        validated before loading. The scFoundation weights are for non-commercial research
        only (scFoundation License); scxtrimo does not ship them.

        Parameters
        ----------
        path
            Path to ``models.ckpt``.
        adata
            AnnData with raw counts to attach (optional).
        checkpoint
            Which sub-model to load.
        device
            Device to put the model on.
        """
        from ._scfoundation import LICENSE_NOTICE, read_scfoundation_checkpoint

        config, state, _meta = read_scfoundation_checkpoint(path, checkpoint=checkpoint)
        logger.info(LICENSE_NOTICE)
        if adata is not None:
            cls.setup_anndata(adata)
            model = cls(adata, config=config)
        else:
            model = cls(None, config=config)
        load_state_dict_checked(model.module, state, source=f"{path} [{checkpoint}]")
        model.default_target_depth_ = "t4"  # the official default (--tgthighres t4)
        model.source_ = f"scfoundation:{checkpoint}"
        model.is_trained_ = True
        model.to_device(settings.resolve_device(device))
        model.module.eval()
        return model


def _masking_spec(
    masking: MaskingSpec | dict | None, default: MaskingSpec | None
) -> MaskingSpec | None:
    """A :class:`~scxtrimo.data.MaskingSpec` from a spec, a dict of its fields, or ``None``."""
    if masking is None:
        return default
    return masking if isinstance(masking, MaskingSpec) else MaskingSpec(**masking)
