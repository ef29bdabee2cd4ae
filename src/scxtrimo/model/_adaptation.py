"""AdaptationMixin: ``XTrimoGene.adapt`` (self-supervised, on a user's cells) and ``copy``."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from anndata import AnnData

from scxtrimo._settings import settings
from scxtrimo.data._matrix import rows_as_csr
from scxtrimo.inference import InputSettings, resolve_device
from scxtrimo.train import (
    AdaptationSpec,
    adapt_module,
    cache_frozen_layers,
    expression_features,
    positive_pairs,
)
from scxtrimo.train._adapt import cache_bytes_per_cell

if TYPE_CHECKING:
    from ._model import XTrimoGene

logger = logging.getLogger("scxtrimo")

#: Fewest cells :meth:`AdaptationMixin.adapt` accepts: fewer define no neighbourhoods worth
#: learning.
MIN_CELLS = 50


class AdaptationMixin:
    """Adaptation of a model to a user's own unlabelled cells; see :meth:`adapt`."""

    #: What the last :meth:`adapt` did (settings, loss curve, wall time); ``None`` if never.
    adaptation_: dict[str, Any] | None = None

    def copy(self) -> XTrimoGene:
        """An independent copy of the model for inference and further training.

        The weights, input settings, defaults, training record and classification head are
        copied; no AnnData is attached (the copy behaves like a loaded model).
        """
        from ._io import restore_saved_attributes, saved_metadata

        metadata = saved_metadata(self)
        twin = type(self)(None, config=self.config, seed=self.seed_, registry=self.registry_)
        twin._set_classifier(
            (self.classifier_ or {}).get("categories") or [],
            (self.classifier_ or {}).get("labels_key"),
            info=self.classifier_,
        )
        twin.module.load_state_dict(self.module.state_dict())
        restore_saved_attributes(twin, metadata)
        twin.adaptation_ = None if self.adaptation_ is None else dict(self.adaptation_)
        twin.module.to(next(self.module.parameters()).device)
        twin.module.eval()
        return twin

    def adapt(
        self,
        adata: AnnData,
        *,
        batch_key: str | None = None,
        input_settings: InputSettings | None = None,
        max_steps: int = 1000,
        max_time: float | None = None,
        n_layers: int = 0,
        method: Literal["full", "lora"] = "full",
        lora_rank: int = 8,
        head_dim: int = 64,
        batch_size: int = 256,
        lr: float = 1e-3,
        n_neighbors: int = 10,
        cross_batch_share: float = 0.5,
        token_keep: float = 0.5,
        noise: float = 0.1,
        temperature: float = 0.2,
        max_genes: int | Literal["all"] | None = None,
        max_cells: int = 20_000,
        max_memory_gb: float = 4.0,
        checkpoint_dir: str | os.PathLike | None = None,
        invalid_cells: Literal["raise", "skip"] = "skip",
        seed: int = 0,
        device: str | None = None,
        progress_bar: bool | None = None,
    ) -> None:
        """Adapt this model, in place, to ``adata``'s unlabelled cells.

        :func:`scxtrimo.tl.adapt` is the usual entry point (it adapts a copy and documents
        every argument); this method is what it runs. ``input_settings`` is how ``adata`` is
        read (default: the model's ``input_settings``). Sets ``adaptation_``.
        """
        started = time.perf_counter()
        if method not in ("full", "lora"):
            raise ValueError(f"method must be 'full' or 'lora', got {method!r}.")
        if method == "lora":
            if n_layers < 1:
                raise ValueError(
                    "method='lora' adapts encoder layers with low-rank adapters; pass "
                    "n_layers >= 1 (e.g. n_layers=2), or method='full' for the head alone."
                )
            from scxtrimo.train._lora import require_peft

            require_peft()
        spec = AdaptationSpec(
            n_layers=n_layers,
            lora_rank=lora_rank if method == "lora" else None,
            head_dim=head_dim,
            batch_size=batch_size,
            lr=lr,
            temperature=temperature,
            token_keep=token_keep,
            noise=noise,
            cross_batch_share=cross_batch_share,
            max_steps=max_steps,
            max_time=max_time,
            seed=seed,
        )
        if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int | np.integer):
            raise TypeError(f"n_neighbors must be an integer >= 0, got {n_neighbors!r}.")
        if n_neighbors < 0:
            raise ValueError(f"n_neighbors must be an integer >= 0, got {n_neighbors!r}.")
        if max_cells < MIN_CELLS:
            raise ValueError(f"max_cells must be at least {MIN_CELLS}, got {max_cells}.")
        depth = self.config.encoder_depth
        if n_layers > depth:
            raise ValueError(f"n_layers={n_layers}, but this model's encoder has {depth} layers.")
        batches = batch_labels(adata, batch_key)
        prep = self.prepare_input(
            adata,
            input_settings=input_settings or self.input_settings,
            max_genes=max_genes,
            invalid=invalid_cells,
        )
        cells = np.unique(prep.cells)
        if cells.size < MIN_CELLS:
            raise ValueError(
                f"adapt needs at least {MIN_CELLS} cells with >= 2 in-vocabulary counts; this "
                f"AnnData has {cells.size} ({prep.skipped.size} skipped). Embed small data "
                "with the model as it is: scxtrimo.tl.embed(adata)."
            )
        per_cell = cache_bytes_per_cell(
            self.module, prep.spec.max_genes, prep.stats.n_tokens[cells], n_layers
        )
        limit = min(max_cells, int(max_memory_gb * 2**30 // per_cell))
        if limit < MIN_CELLS:
            raise ValueError(
                f"max_memory_gb={max_memory_gb} holds the frozen-layer cache of only {limit} "
                "cells at this depth; raise max_memory_gb or lower max_genes."
            )
        if cells.size > limit:
            why = "max_cells" if limit == max_cells else "max_memory_gb"
            logger.warning(
                "Adapting on %d of %d cells (a seeded random subset; limit set by %s).",
                limit,
                cells.size,
                why,
            )
            rng = np.random.default_rng(seed)
            cells = np.sort(rng.choice(cells, limit, replace=False))

        features = expression_features(
            rows_as_csr(prep.matrix, cells),
            log_normalised=prep.spec.input_type == "log1p",
            seed=seed,
        )
        pairs = positive_pairs(
            features, None if batches is None else batches[cells], n_neighbors=n_neighbors
        )
        if batches is not None:
            logger.info(
                "%d of %d cells have a mutual nearest neighbour in another batch.",
                pairs.n_with_partners,
                cells.size,
            )
        dev = resolve_device(self.module, device)
        show = settings.progress_bar if progress_bar is None else progress_bar
        cache_started = time.perf_counter()
        cache = cache_frozen_layers(
            self.module, prep, cells, depth - n_layers, device=dev, progress_bar=show
        )
        cache_seconds = time.perf_counter() - cache_started
        source = self.source_
        result = adapt_module(
            self.module,
            cache,
            pairs,
            spec,
            device=dev,
            checkpoint_dir=checkpoint_dir,
            progress_bar=show,
            cells=cells,
        )
        result.cache_seconds = cache_seconds
        self.adaptation_ = {
            "settings": spec.to_dict(),
            "n_neighbors": n_neighbors,
            "batch_key": batch_key,
            "max_genes": prep.spec.max_genes,
            "input_type": prep.spec.input_type,
            "n_cells": int(cells.size),
            "started_from": source,
            "wall_seconds": round(time.perf_counter() - started, 2),
            "result": result.to_dict(),
        }
        if not source.endswith("+adapted"):
            self.source_ = f"{source}+adapted"
        self.config_ = self.module.config.to_dict()  # now with the cell head
        self._update_summary()
        self.is_trained_ = True


def batch_labels(adata: AnnData, batch_key: str | None) -> np.ndarray | None:
    """``obs[batch_key]`` as strings, checked; ``None`` without a key."""
    if batch_key is None:
        return None
    if batch_key not in adata.obs.columns:
        raise KeyError(
            f"batch_key={batch_key!r} is not a column of adata.obs. Available columns: "
            f"{list(adata.obs.columns) or 'none'}."
        )
    column = adata.obs[batch_key]
    if column.isna().any():
        raise ValueError(
            f"obs[{batch_key!r}] has {int(column.isna().sum())} missing values; give those "
            "cells a batch of their own or drop them."
        )
    return column.astype(str).to_numpy()
