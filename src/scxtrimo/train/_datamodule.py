"""Lightning data module for masked-regression pretraining on (backed or in-memory) AnnData."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from scxtrimo.data._matrix import as_row_accessible, is_backed_sparse
from scxtrimo.data._tokens import MaskingSpec, TokenIndex, pretraining_batch, row_seeds


class LengthBucketBatchSampler(Sampler[tuple[int, np.ndarray]]):
    """Shuffled batches of cells of similar length, reproducible from ``(seed, epoch)``.

    Each epoch the cells are shuffled, cut into pools of ``pool_batches`` batches, sorted by
    length inside a pool (less padding) and the batches are shuffled again. Yields
    ``(epoch, cell indices)``; the epoch makes the masks of a cell differ between epochs but
    never depend on the batch it lands in. Under distributed training each rank takes every
    ``world_size``-th batch.
    """

    def __init__(
        self,
        cells: np.ndarray,
        n_tokens: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        pool_batches: int = 50,
        drop_last: bool = False,
        follow_epoch: bool = True,
    ) -> None:
        self.cells = np.asarray(cells, dtype=np.int64)
        self.n_tokens = np.asarray(n_tokens)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = seed
        self.pool = pool_batches * self.batch_size
        self.drop_last = drop_last
        self.follow_epoch = follow_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch (also when resuming)."""
        if self.follow_epoch:  # validation keeps the same masks every epoch
            self.epoch = int(epoch)

    def _batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        cells = rng.permutation(self.cells) if self.shuffle else self.cells
        batches = []
        for start in range(0, len(cells), self.pool):  # loop over pools, not cells
            pool = cells[start : start + self.pool]
            pool = pool[np.argsort(self.n_tokens[pool], kind="stable")]
            batches.extend(
                pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)
            )
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            usable = (len(batches) // world) * world  # equal step counts on every rank
            batches = batches[rank:usable:world]
        return batches

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        for batch in self._batches():
            yield self.epoch, batch

    def __len__(self) -> int:
        n = len(self.cells) // self.batch_size
        if not self.drop_last and len(self.cells) % self.batch_size:
            n += 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            n //= torch.distributed.get_world_size()
        return n


class PretrainingDataset(Dataset):
    """Builds a whole pretraining batch per ``__getitem__((epoch, cells))`` call."""

    def __init__(
        self,
        matrix: Any,
        col_to_vocab: np.ndarray,
        index: TokenIndex,
        masking: MaskingSpec,
        *,
        seed: int = 0,
        max_genes: int | None = None,
        labels: np.ndarray | None = None,
    ) -> None:
        self.matrix = as_row_accessible(matrix)
        self.col_to_vocab = col_to_vocab
        self.index = index
        self.masking = masking
        self.seed = seed
        self.max_genes = max_genes
        self.labels = labels

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def _rows(self, cells: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
        if sp.issparse(self.matrix) and self.matrix.format == "csr":
            return self.matrix, cells
        # Backed files and dense arrays: read the batch's rows in sorted order (h5py needs it).
        order = np.argsort(cells)
        block = self.matrix[cells[order]]
        block = sp.csr_matrix(block) if not sp.issparse(block) else block.tocsr()
        local = np.empty_like(order)
        local[order] = np.arange(len(cells))
        return block, local

    def __getitem__(self, item: tuple[int, np.ndarray]) -> dict[str, torch.Tensor]:
        epoch, cells = item
        block, rows = self._rows(np.asarray(cells, dtype=np.int64))
        batch = pretraining_batch(
            block,
            rows,
            self.col_to_vocab,
            self.index,
            self.masking,
            row_seeds(self.seed, epoch, cells),
            self.max_genes,
        )
        out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
        out["cell_index"] = torch.from_numpy(np.asarray(cells, dtype=np.int64))
        if self.labels is not None:
            out["labels"] = torch.from_numpy(self.labels[cells].astype(np.int64))
        return out


class PretrainingDataModule(pl.LightningDataModule):
    """Train/validation split of the cells and their pretraining loaders.

    Parameters
    ----------
    dataset
        The batch builder.
    n_tokens
        Gene tokens per cell, for length bucketing.
    cells
        Cells that may be used (e.g. all valid cells).
    batch_size
        Cells per batch.
    train_size
        Share of ``cells`` used for training; the rest is the validation set.
    seed
        Seed of the split and of the batch order.
    num_workers
        DataLoader worker processes building batches in parallel with training.
    pin_memory
        Pin batches in page-locked memory (faster host-to-GPU copies).
    """

    def __init__(
        self,
        dataset: PretrainingDataset,
        n_tokens: np.ndarray,
        cells: np.ndarray,
        *,
        batch_size: int = 32,
        train_size: float = 0.9,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < train_size <= 1.0:
            raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
        self.dataset = dataset
        self.n_tokens = n_tokens
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        perm = np.random.default_rng(seed).permutation(np.asarray(cells, dtype=np.int64))
        n_train = len(perm) if train_size >= 1.0 else max(1, round(train_size * len(perm)))
        self.train_idx = np.sort(perm[:n_train])
        self.val_idx = np.sort(perm[n_train:])
        self.test_idx = np.array([], dtype=np.int64)
        if is_backed_sparse(dataset.matrix) and num_workers > 0:
            # h5py handles cannot be shared by forked workers.
            raise ValueError(
                "num_workers > 0 is not supported with backed AnnData; use num_workers=0."
            )

    @property
    def n_train(self) -> int:
        """Number of training cells."""
        return len(self.train_idx)

    @property
    def n_val(self) -> int:
        """Number of validation cells."""
        return len(self.val_idx)

    def _loader(self, cells: np.ndarray, shuffle: bool) -> DataLoader:
        sampler = LengthBucketBatchSampler(
            cells,
            self.n_tokens,
            self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            follow_epoch=shuffle,
        )
        return DataLoader(
            self.dataset,
            sampler=sampler,
            batch_size=None,  # the sampler yields whole batches
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, length-bucketed training batches."""
        return self._loader(self.train_idx, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches (fixed masks per epoch); empty when there is no validation set."""
        if self.n_val == 0:
            return []
        return self._loader(self.val_idx, shuffle=False)
