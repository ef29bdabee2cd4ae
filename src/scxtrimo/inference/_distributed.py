"""Lightning pieces of multi-process embedding: a predict-only module, chunks, a store writer.

Imports Lightning; :mod:`scxtrimo.inference` loads this room only when it is used.

Every rank gets ``pending[rank::world_size]`` of the unfinished chunks (no padding, so no chunk
is computed twice); ``predict_step`` embeds one chunk on the rank's device and the
:class:`StoreWriter` (a ``BasePredictionWriter``) writes it to its rows of the zarr store and
commits it. Chunks are aligned with the zarr chunks, so ranks never write to the same file.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from ._quiet import quiet_lightning
from ._store import EmbeddingStore


class ChunkPredictor(pl.LightningModule):
    """Predict-only LightningModule over a :class:`ChunkEngine`: ``predict_step(chunk id) -> (chunk id, embedding, #skipped)``."""

    def __init__(self, engine: Any) -> None:
        super().__init__()
        self.engine = engine
        self.net = engine.module  # registered, so Lightning moves it to the rank's device

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """Embed chunk ``batch`` on this rank's device (``None`` for a rank's placeholder)."""
        k = int(batch)
        if k < 0:  # placeholder of a rank without chunks (Lightning needs one batch per rank)
            return None
        self.engine.module = self.net
        emb, n_skipped = self.engine.embed_chunk(k, self.device)
        return k, emb, n_skipped


def _first(items: list) -> Any:
    return items[0]


class ChunkDataModule(pl.LightningDataModule):
    """The unfinished chunk ids, split across ranks without padding."""

    def __init__(self, pending: list[int]) -> None:
        super().__init__()
        self.pending = [int(k) for k in pending]

    def predict_dataloader(self) -> DataLoader:
        """The chunk ids of this rank, one per batch (``pending[rank::world_size]``)."""
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        mine = self.pending[rank::world] or [-1]
        return DataLoader(mine, batch_size=1, shuffle=False, collate_fn=_first)


class StoreWriter(BasePredictionWriter):
    """Writes each predicted chunk into the embedding store and commits it."""

    def __init__(self, path: str | Path, key: str) -> None:
        super().__init__(write_interval="batch")
        self.path = str(path)
        self.key = key
        self.run = uuid.uuid4().hex
        self._store = None

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Write the predicted chunk to its rows of the store and commit it."""
        if prediction is None:
            return
        if self._store is None:
            self._store = EmbeddingStore(Path(self.path), self.key)
        k, emb, n_skipped = prediction
        start, _ = pl_module.engine.chunk_rows(k)
        info = {"n_skipped": int(n_skipped), "run": self.run, "rank": int(trainer.global_rank)}
        self._store.write_chunk(k, start, np.asarray(emb), info)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_store"] = None
        return state


def predict_chunks(
    engine: Any,
    store: EmbeddingStore,
    pending: list[int],
    *,
    devices: int,
    accelerator: str,
    strategy: str,
    num_nodes: int,
) -> None:
    """Embed the ``pending`` chunks of ``engine`` into ``store`` with Lightning prediction.

    Each of the ``devices`` x ``num_nodes`` processes embeds ``pending[rank::world_size]`` and
    writes its chunks through a :class:`StoreWriter`.
    """
    with quiet_lightning():  # no "GPU available: ..." notices; real warnings still pass
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy=strategy,
            callbacks=[StoreWriter(store.path, store.key)],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            inference_mode=True,
        )
        trainer.predict(
            ChunkPredictor(engine),
            datamodule=ChunkDataModule(pending),
            return_predictions=False,
        )


__all__ = ["ChunkDataModule", "ChunkPredictor", "StoreWriter", "predict_chunks"]
