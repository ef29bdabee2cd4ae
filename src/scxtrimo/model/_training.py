"""Training a model: pretraining or fine-tuning (the ``train`` method) and its classification head."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager

from scxtrimo.data._tokens import MaskingSpec
from scxtrimo.inference import InvalidCells
from scxtrimo.train import PretrainingObjective, TrainingSettings
from scxtrimo.train._finetune import FinetuneMode

from ._io import classifier_info, registered_labels


class TrainingMixin:
    """The training methods of :class:`~scxtrimo.model.XTrimoGene`, over :mod:`scxtrimo.train`.

    ``train`` checks and gathers its arguments into a
    :class:`~scxtrimo.train.TrainingSettings` and hands the module, the checked data and the
    settings to :func:`~scxtrimo.train.run_pretraining` or
    :func:`~scxtrimo.train.run_finetuning`, which run Lightning through ``_fit`` (the
    scvi-tools train runner) and return a :class:`~scxtrimo.train.TrainingResult`; this mixin
    writes the result onto the model (``training_args_``, ``classifier_``...).
    """

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
        # scvi-tools 1.4 has no public call that gives an existing model a new registration
        # (its ``adata`` setter transfers the old one, without the labels): these two are
        # private; the rest is scvi-tools' public manager API.
        manager = self._get_most_recent_anndata_manager(adata, required=True)
        self._register_manager_for_instance(manager)
        self._adata, self._adata_manager = adata, manager
        self.registry_ = manager.registry
        self.summary_stats = manager.summary_stats
        _, categories = registered_labels(self.registry_)
        self._set_classifier(categories, labels_key, seed=seed)

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
        positives: Literal["views", "neighbours"] = "views",
        n_neighbors: int = 10,
        cell_head_dim: int = 0,
        regression_every: int = 1,
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
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_targets: Sequence[str] | None = None,
        gradient_checkpointing: bool = False,
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
            paths, SOMA experiments, ``.zarr`` stores, row sources (raw counts). ``None``: the
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
        positives
            What the InfoNCE term pairs. ``"views"`` (above): two views of each cell, two
            encoder passes per cell. ``"neighbours"``: each batch is ``batch_size // 2`` cells
            and, for each, one of its ``n_neighbors`` nearest training cells in a PCA of its
            own study (the neighbourhoods a PCA user sees); every cell is encoded once and
            trained by masked regression, and InfoNCE asks each cell to find its neighbour.
            No labels are used. Half the encoder work of ``"views"`` per cell (see the
            training-step benchmark in the docs).
        n_neighbors
            Neighbours per cell with ``positives="neighbours"``.
        cell_head_dim
            With ``positives="neighbours"``: train a new cell head
            (:class:`~scxtrimo.module.CellHead`, the one :func:`~scxtrimo.tl.adapt` trains) of
            this width together with the encoder; the InfoNCE term is taken on its output,
            which becomes the model's cell embedding. 0: none (the pooled vector).
        regression_every
            With ``positives="neighbours"``: run the masked-regression term (the decoder) on
            every ``regression_every``-th step only; the steps between are encoder-only
            InfoNCE steps, about half the cost of a full step (with ``strategy="ddp"`` the
            decoder's missing gradients are allowed for). 1: every step.
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
            encoder; ``"lora"``: the head and low-rank adapters (peft LoRA) on the encoder's
            linear layers, every base weight frozen (needs ``pip install scxtrimo[lora]``;
            after training the adapters are merged into the weights, so the model embeds as
            fast as before, and :meth:`save` also writes them beside a fingerprint of their
            base; see :meth:`apply_lora`). Frozen parts run without dropout; the decoder is
            never changed. The
            history then holds ``train_loss``/``validation_loss`` (cross-entropy) and
            ``train_accuracy``/``validation_accuracy``; predict with
            :func:`scxtrimo.tl.annotate`. ``masking`` is ignored; ``corpus`` is refused.
        n_last_layers
            Encoder layers trained with ``finetune="last_layers"``.
        lora_rank, lora_alpha, lora_dropout
            ``finetune="lora"``: rank ``r`` of each adapter, the scale numerator (the update
            is ``alpha / r * B A``) and dropout on the adapters' input.
        lora_targets
            ``finetune="lora"``: the linear layers of every encoder layer to adapt (names
            inside a layer); default ``("attention.qkv_proj", "attention.out_proj", "ff_in",
            "ff_out")``, all the attention projections and the feed-forward layers.
        gradient_checkpointing
            Fine-tuning (not ``"head"``): keep only each encoder layer's input during the
            forward pass and recompute the layer in the backward pass (same gradients, about
            one more forward pass of time). Activations, not weights, dominate the memory of
            a training step at long gene lists; with LoRA this is what makes fine-tuning the
            100M model fit a laptop (see the LoRA table in the docs). Ignored by pretraining.
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
        settings = TrainingSettings(
            max_epochs=max_epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            train_size=train_size,
            max_genes=max_genes,
            seed=seed,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            num_nodes=num_nodes,
            precision=precision,
            gradient_clip_val=gradient_clip_val,
            num_workers=num_workers,
            invalid_cells=invalid_cells,
            drop_last=drop_last,
            gradient_checkpointing=gradient_checkpointing,
            plan_kwargs=plan_kwargs,
            trainer_kwargs=trainer_kwargs,
        )
        if finetune is not None:
            if corpus is not None:
                raise ValueError(
                    "corpus= is for pretraining; fine-tuning trains on the registered, labelled "
                    "AnnData (model.add_classifier(adata, labels_key=...)). Drop corpus=."
                )
            lora = None
            if finetune == "lora":
                from scxtrimo.train._lora import LoraSpec, require_peft

                require_peft()
                lora = LoraSpec(
                    rank=lora_rank,
                    alpha=lora_alpha,
                    dropout=lora_dropout,
                    targets=None if lora_targets is None else tuple(lora_targets),
                )
            return self._finetune(settings, finetune, n_last_layers, lora=lora)
        return self._pretrain(
            settings,
            [self.adata] if corpus is None else corpus,
            PretrainingObjective(
                masking=_masking_spec(masking, MaskingSpec()),
                view_masking=_masking_spec(view_masking, None),
                contrastive_weight=contrastive_weight,
                temperature=temperature,
                positives=positives,
                n_neighbors=n_neighbors,
                cell_head_dim=cell_head_dim,
                regression_every=regression_every,
            ),
        )

    def _fit(
        self,
        plan: Any,
        datamodule: Any,
        *,
        max_epochs: int,
        accelerator: str,
        devices: Any,
        trainer_kwargs: dict[str, Any],
    ) -> Any:
        """Run the scvi-tools train runner over ``plan`` and ``datamodule`` (the recipes' ``fit``).

        The runner records the history on the model; it is kept as plain floats afterwards
        (Lightning logs 0-d tensors), for JSON and plotting. Lightning's start-up notices are
        kept out of the output (:func:`~scxtrimo.inference._quiet.quiet_lightning`).
        """
        from scxtrimo.inference._quiet import quiet_lightning

        with quiet_lightning():
            runner = self._train_runner_cls(
                self,
                training_plan=plan,
                data_splitter=datamodule,
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                **trainer_kwargs,
            )
            out = runner()
        if self.history_:
            self.history_ = {k: v.astype(float) for k, v in self.history_.items()}
        return out

    def _pretrain(
        self, settings: TrainingSettings, sources: Sequence[Any], objective: PretrainingObjective
    ) -> Any:
        from scxtrimo.train import build_corpus, run_pretraining

        corpus = build_corpus(
            self.module,
            sources,
            input_settings=self.input_settings,
            max_genes=settings.max_genes,
            invalid_cells=settings.invalid_cells,
        )
        result = run_pretraining(
            self.module,
            corpus,
            settings,
            objective,
            fit=self._fit,
            init_expression_bias=not self.is_trained_,
            plan_cls=self._training_plan_cls,
        )
        self.training_args_ = result.training_args
        self.default_max_genes_ = result.default_max_genes
        if objective.cell_head_dim:  # the new head is part of the configuration now
            self.config_ = self.module.config.to_dict()
        return result.output

    def _finetune(
        self,
        settings: TrainingSettings,
        mode: FinetuneMode,
        n_last_layers: int,
        lora: Any = None,
    ) -> Any:
        from scxtrimo.train import run_finetuning

        if self.module.classifier is None or not self.classifier_:
            raise ValueError(
                "Fine-tuning needs labels: XTrimoGene.setup_anndata(adata, labels_key=...) "
                "before creating the model, or model.add_classifier(adata, labels_key=...) for "
                "a pretrained or loaded model."
            )
        labels = registered_label_codes(self.adata_manager, self.classifier_["categories"])
        prep = self.prepare_input(
            self.adata, invalid=settings.invalid_cells, max_genes=settings.max_genes
        )
        previous = getattr(self, "training_args_", None) or {}
        history, was_trained = self.history_, self.is_trained_
        if previous.get("finetune") is None:
            # The history of a pretraining run holds other metrics: start a fresh one.
            self.history_, self.is_trained_ = None, False
        try:
            result = run_finetuning(
                self.module,
                prep,
                labels,
                settings,
                mode=mode,
                n_last_layers=n_last_layers,
                fit=self._fit,
                lora=lora,
            )
        except BaseException:
            self.is_trained_ = was_trained
            if self.history_ is None:
                self.history_ = history
            raise
        self.classifier_ = {**self.classifier_, **result.classifier}
        self.training_args_ = result.training_args
        # The adapters of a LoRA run (merged into the module), written by save() beside it.
        self.lora_state_ = result.adapter_state
        return result.output

    def apply_lora(self, dir_path: str | os.PathLike, *, prefix: str | None = None) -> None:
        """Apply LoRA adapters saved by :meth:`save` to this model, the base they were trained on.

        A model fine-tuned with ``train(finetune="lora")`` saves its merged weights
        (``model.pt``, loaded by :meth:`load` like any model) and, beside them, the adapters
        and the classification head alone (``lora_adapter.pt``, a few MB) with the SHA-256 of
        the base weights they were trained on (``model.json``, ``classifier["lora"]``). This
        method rebuilds the fine-tuned model from the base (e.g.
        ``XTrimoGene.from_scfoundation()``) and the small adapter file: the base's
        fingerprint is checked, peft's adapters are injected with the saved rank, scale and
        targets, loaded, and merged into the weights; the saved head and its classes replace
        this model's head. The model then embeds and annotates like the saved one, as fast as
        the base.

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save` for a LoRA fine-tuned model.
        prefix
            File-name prefix used when saving.

        Raises
        ------
        ValueError
            If the folder holds no adapters, or this model's weights are not the base the
            adapters were trained on (the two fingerprints are named); nothing is changed then.
        ImportError
            Without peft (``pip install scxtrimo[lora]``).
        """
        from scxtrimo.train._lora import (
            LoraSpec,
            base_fingerprint,
            discard_lora,
            inject_lora,
            load_lora_state,
            merge_lora,
            require_peft,
        )

        from ._io import read_lora_files

        require_peft()
        record, state, source = read_lora_files(dir_path, prefix)
        lora = record["classifier"]["lora"]
        expected = lora["base_weights_sha256"]
        actual = base_fingerprint(self.module)
        if actual != expected:
            raise ValueError(
                f"The LoRA adapters in {source} were trained on a base model with weights "
                f"SHA-256 {expected}, but this model's weights (without the classification "
                f"head) have SHA-256 {actual}: it is another model. Apply them to the base "
                "they were trained on (the source it records: "
                f"{record.get('source')!r}), or load the merged model with "
                "XTrimoGene.load(dir_path)."
            )
        head = {k[len("classifier.") :]: v for k, v in state.items() if k.startswith("classifier.")}
        adapters = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        inject_lora(self.module, LoraSpec.from_dict(lora))
        try:
            load_lora_state(self.module, adapters, source)
        except BaseException:
            discard_lora(self.module)
            raise
        merge_lora(self.module)
        classifier = record["classifier"]
        self._set_classifier(classifier["categories"], classifier["labels_key"], info=classifier)
        self.module.classifier.load_state_dict(head)
        self.module.eval()
        self.lora_state_ = {k: v.clone() for k, v in adapters.items()}


def registered_label_codes(manager: AnnDataManager, categories: Sequence[Any]) -> np.ndarray:
    """Class index (into ``categories``) of every cell registered with ``manager``.

    Cells whose label is missing get ``-1``; labels outside ``categories`` raise an error.
    """
    state = manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY)
    registered = list(state.categorical_mapping)
    codes = np.asarray(manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).reshape(-1)
    position = {c: i for i, c in enumerate(categories)}
    unknown = [c for c in registered if c not in position]
    present = np.unique(codes[codes >= 0])
    unknown_present = [registered[int(i)] for i in present if registered[int(i)] in unknown]
    if unknown_present:
        raise ValueError(
            f"Labels {unknown_present[:5]} are not classes of the model's classification head "
            f"({list(categories)[:10]}); attach a fresh head with model.add_classifier(adata, "
            "labels_key=...)."
        )
    lookup = np.array([position.get(c, -1) for c in registered], dtype=np.int64)
    out = np.full(codes.shape, -1, dtype=np.int64)
    valid = codes >= 0
    out[valid] = lookup[codes[valid].astype(np.int64)]
    return out


def _masking_spec(
    masking: MaskingSpec | dict | None, default: MaskingSpec | None
) -> MaskingSpec | None:
    """A :class:`~scxtrimo.data.MaskingSpec` from a spec, a dict of its fields, or ``None``."""
    if masking is None:
        return default
    return masking if isinstance(masking, MaskingSpec) else MaskingSpec(**masking)
