"""The user-facing xTrimoGene model: what a user calls, each method delegating to its room."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, NumericalObsField
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner

from scxtrimo._docs import DOCS, doc_params
from scxtrimo._settings import settings
from scxtrimo.data._matrix import get_matrix
from scxtrimo.data._tokens import TargetDepth
from scxtrimo.data._validation import scan_cells
from scxtrimo.data._vocabulary import log_overlap, map_genes
from scxtrimo.inference import (
    InputSettings,
    InvalidCells,
    PreparedInput,
    check_max_genes,
    check_setup_arguments,
    prepare_input,
    resolve_max_genes,
)
from scxtrimo.module import XTrimoGeneConfig, XTrimoGeneModule, get_config
from scxtrimo.train._plan import XTrimoGeneTrainingPlan

from ._adaptation import AdaptationMixin
from ._io import SaveLoadMixin, classifier_info, empty_registry, registered_labels
from ._outputs import OutputsMixin
from ._training import TrainingMixin

__all__ = ["PreparedInput", "XTrimoGene"]

TOTAL_COUNTS_KEY = "total_counts"


# Like a scvi-tools model, the class takes most of its methods from mixins, each in its room:
# _outputs (embeddings, gene embeddings, expression), _training (train, the classification head)
# and _io (save, load, from_scfoundation). What stays here is registration and checked input.
class XTrimoGene(OutputsMixin, TrainingMixin, AdaptationMixin, SaveLoadMixin, BaseModelClass):
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
            registry = empty_registry(type(self).__name__, InputSettings().to_dict())
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
        check_setup_arguments(
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
    def input_settings(self) -> InputSettings:
        """How the model reads an AnnData (layer, gene keys, input type), as set up."""
        return InputSettings.from_mapping((self.registry_ or {}).get("setup_args"))

    @property
    def setup_args(self) -> dict:
        """:attr:`input_settings` as a dict (layer, gene keys, input type, total counts key)."""
        return self.input_settings.to_dict()

    @property
    def label_categories(self) -> list | None:
        """Classes of the classification head, in the order of its outputs (``None``: no head)."""
        return None if not self.classifier_ else list(self.classifier_["categories"])

    # ------------------------------------------------------------------------------------
    # Summary
    # ------------------------------------------------------------------------------------

    def _update_summary(self) -> None:
        cfg, n_labels = self.config, self.module.n_labels
        n_params = sum(p.numel() for p in self.module.parameters())
        self._model_summary_string = (
            f"XTrimoGene: encoder {cfg.encoder_dim}-d x {cfg.encoder_depth} layers, Performer "
            f"decoder {cfg.decoder_dim}-d x {cfg.decoder_depth} layers, {n_params:,} parameters"
            + (f", classification head ({n_labels} classes)" if n_labels else "")
        )

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
        self.default_max_genes_ = check_max_genes(value)

    @doc_params(**DOCS)
    def prepare_input(
        self,
        adata: AnnData,
        *,
        input_settings: InputSettings | None = None,
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
        input_settings
            How to read ``adata`` (default: :attr:`input_settings`, the model's); the keyword
            settings below change it.
        **setup_overrides
            Any of the input settings below; ``None`` keeps the model's value.

            {doc_input_settings}

        Returns
        -------
        The checked input; see :class:`~scxtrimo.inference.PreparedInput`.

        Raises
        ------
        ValueError
            If the input fails a check (bad values, too few vocabulary genes, cells that cannot
            be embedded with ``invalid="raise"``); the message says how to fix it.
        """
        base = self.input_settings if input_settings is None else input_settings
        return prepare_input(
            adata,
            base.merge(**setup_overrides),
            n_genes=self.config.n_genes,
            target_depth=self.default_target_depth_ if target_depth is None else target_depth,
            max_genes=resolve_max_genes(max_genes, self.default_max_genes_),
            indices=indices,
            invalid=invalid,
            min_overlap=min_overlap,
        )
