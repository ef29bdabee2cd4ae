"""Lightning data module for pretraining: study-pure length buckets, global batches split across ranks."""

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

from ._corpus import PretrainingCorpus
from ._resume import ResumableDataLoader, ResumableTrainLoaderMixin
from ._source_corpus import worker_start_method


class LengthBucketBatchSampler(Sampler[tuple[int, np.ndarray]]):
    """Shuffled batches of cells of similar length, reproducible from ``(seed, epoch)``.

    Each epoch the cells of each group (study) are shuffled, cut into pools of ``pool_batches``
    batches, sorted by length inside a pool (less padding); the batches of all groups are then
    shuffled together. A batch never mixes groups, so each holds cells with one gene set. Yields
    ``(epoch, cell indices)``; the epoch makes the masks of a cell differ between epochs but
    never depend on the batch it lands in.

    Under distributed training the batches are *global*: every rank walks the same list and
    takes ``batch[rank::world_size]``, so ranks see disjoint cells, take the same number of
    steps, and with a ``batch_size`` divisible by the world size a step averages the same cells
    as one process would. Global batches with fewer cells than ranks are dropped.

    With ``partners`` (neighbour pairs), a batch holds ``batch_size // 2`` bucketed anchors
    followed by one partner per anchor, drawn uniformly from the anchor's row of
    ``partners`` (seeded by ``(seed, epoch)``); under distributed training each rank takes
    the same slice of both halves, so its anchors and partners stay aligned.
    """

    def __init__(
        self,
        cells: np.ndarray,
        n_tokens: np.ndarray,
        batch_size: int,
        *,
        groups: np.ndarray | None = None,
        shuffle: bool = True,
        seed: int = 0,
        pool_batches: int = 50,
        drop_last: bool = False,
        follow_epoch: bool = True,
        partners: np.ndarray | None = None,
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if partners is not None and int(batch_size) < 4:
            raise ValueError(
                f"Neighbour pairs need batch_size >= 4 (two anchors and their partners), got "
                f"{batch_size}."
            )
        self.partners = None if partners is None else np.asarray(partners, dtype=np.int64)
        self.cells = np.asarray(cells, dtype=np.int64)
        self.n_tokens = np.asarray(n_tokens)
        self.groups = None if groups is None else np.asarray(groups, dtype=np.int64)
        # With partners, the bucketed part of a batch is its anchors: half of it.
        self.batch_size = int(batch_size) if partners is None else int(batch_size) // 2
        self.shuffle = shuffle
        self.seed = seed
        self.pool = pool_batches * self.batch_size
        self.drop_last = drop_last
        self.follow_epoch = follow_epoch
        self.epoch = 0
        self.skip = 0  # batches of the next epoch not to yield (set when resuming mid-epoch)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch (also when resuming)."""
        if self.follow_epoch:  # validation keeps the same masks every epoch
            self.epoch = int(epoch)

    def _group_batches(self, cells: np.ndarray) -> list[np.ndarray]:
        batches = []
        for start in range(0, len(cells), self.pool):  # loop over pools, not cells
            pool = cells[start : start + self.pool]
            pool = pool[np.argsort(self.n_tokens[pool], kind="stable")]
            batches.extend(
                pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)
            )
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def global_batches(self) -> list[np.ndarray]:
        """The batches of the current epoch, before they are split between ranks."""
        rng = np.random.default_rng([self.seed, self.epoch])
        cells = rng.permutation(self.cells) if self.shuffle else self.cells
        if self.groups is None:
            batches = self._group_batches(cells)
        else:
            group_of = self.groups[cells]
            batches = []
            for group in np.unique(group_of):  # a handful of studies
                batches.extend(self._group_batches(cells[group_of == group]))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.partners is not None:
            batches = [self._with_partners(b, rng) for b in batches]
        return batches

    def _with_partners(self, anchors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        options = self.partners[anchors]  # [A, k]
        if (options < 0).any():
            raise ValueError("A cell without neighbours was drawn as an anchor.")
        picked = options[np.arange(len(anchors)), rng.integers(0, options.shape[1], len(anchors))]
        return np.concatenate([anchors, picked])

    def _batches(self) -> list[np.ndarray]:
        batches = self.global_batches()
        rank, world = distributed_rank_and_world()
        if world > 1 and self.partners is not None:
            halves = [(b[: len(b) // 2], b[len(b) // 2 :]) for b in batches]
            batches = [
                np.concatenate([a[rank::world], p[rank::world]])
                for a, p in halves
                if len(a) >= world
            ]
        elif world > 1:
            batches = [b[rank::world] for b in batches if len(b) >= world]
        return batches

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        skip, self.skip = self.skip, 0
        for batch in self._batches()[skip:]:
            yield self.epoch, batch

    def __len__(self) -> int:
        return len(self._batches())


def distributed_rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` outside distributed training."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class PretrainingDataset(Dataset):
    """Builds a whole pretraining batch of one study per ``__getitem__((epoch, cells))`` call.

    The first view is the masked-regression input (down-sampled with ``masking``; ``T`` = the
    cell's full depth). With ``view_masking``, a second view of the same cells is drawn with
    independent down-sampling and masks (keys ``view2_*``, encoder tokens only, ``T = S``) for
    the cell-level contrastive term. Masked slots at genes the study did not measure are
    dropped and ``measured`` tells the decoder which genes are unknown rather than zero.

    Parameters
    ----------
    corpus
        The studies.
    index
        Special token indices.
    masking
        Masking and down-sampling of the regression view.
    seed
        Seed of every random draw (with the epoch and the cell's global index).
    max_genes
        Cap on visible gene tokens per cell.
    view_masking
        Masking and down-sampling of the second view; ``None``: no second view.
    """

    def __init__(
        self,
        corpus: PretrainingCorpus,
        index: TokenIndex,
        masking: MaskingSpec,
        *,
        seed: int = 0,
        max_genes: int | None = None,
        view_masking: MaskingSpec | None = None,
    ) -> None:
        self.corpus = corpus
        self.matrices = [as_row_accessible(p.matrix) for p in corpus.parts]
        self.index = index
        self.masking = masking
        self.view_masking = view_masking
        self.seed = seed
        self.max_genes = max_genes
        # T and S are always "measured"; the padding/dump row too.
        extra = np.ones((len(corpus.parts), 3), dtype=bool)
        self.measured = np.concatenate([corpus.measured, extra], axis=1)

    @property
    def matrix(self) -> Any:
        """The first study's matrix (for single-study checks such as backed files)."""
        return self.matrices[0]

    def __len__(self) -> int:
        return self.corpus.n_cells

    @staticmethod
    def _rows(matrix: Any, cells: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
        if sp.issparse(matrix) and matrix.format == "csr":
            return matrix, cells
        # Backed files and dense arrays: read the batch's rows in sorted order (h5py needs it).
        order = np.argsort(cells)
        block = matrix[cells[order]]
        block = sp.csr_matrix(block) if not sp.issparse(block) else block.tocsr()
        local = np.empty_like(order)
        local[order] = np.arange(len(cells))
        return block, local

    def __getitem__(self, item: tuple[int, np.ndarray]) -> dict[str, torch.Tensor]:
        epoch, cells = item
        cells = np.asarray(cells, dtype=np.int64)
        part, local = self.corpus.local(cells)
        part_info = self.corpus.parts[part]
        block, rows = self._rows(self.matrices[part], local)
        measured = self.measured[part]
        batch = pretraining_batch(
            block,
            rows,
            part_info.col_to_vocab,
            self.index,
            self.masking,
            row_seeds(self.seed, epoch, cells),
            self.max_genes,
        )
        # A gene the study did not measure is unknown, not zero: no loss there.
        batch["masked_pad"] = batch["masked_pad"] | ~measured[batch["masked_index"]]
        batch["measured"] = measured
        if self.view_masking is not None:
            view = pretraining_batch(
                block,
                rows,
                part_info.col_to_vocab,
                self.index,
                self.view_masking,
                row_seeds(self.seed, epoch, cells, stream=5),
                self.max_genes,
            )
            value = view["value"].copy()
            value[:, 0] = value[:, 1]  # T = S: the view's depth must not identify the cell
            batch["view2_gene_index"] = view["gene_index"]
            batch["view2_value"] = value
            batch["view2_padding_mask"] = view["padding_mask"]
        out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
        out["cell_index"] = torch.from_numpy(cells)
        return out


class PretrainingDataModule(ResumableTrainLoaderMixin, pl.LightningDataModule):
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
    groups
        Study of every cell (indexed like ``n_tokens``); batches never mix studies.
    drop_last
        Drop each study's last, incomplete training batch (equal batch sizes, e.g. for exact
        agreement between one and several processes).
    partners
        Neighbour pairs (:func:`~scxtrimo.train.corpus_neighbours`): training batches are
        anchors plus one neighbour each (see :class:`LengthBucketBatchSampler`); validation
        batches are plain.
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
        groups: np.ndarray | None = None,
        drop_last: bool = False,
        partners: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.partners = partners
        if not 0.0 < train_size <= 1.0:
            raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
        self.dataset = dataset
        self.n_tokens = n_tokens
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.groups = groups
        self.drop_last = drop_last
        perm = np.random.default_rng(seed).permutation(np.asarray(cells, dtype=np.int64))
        n_train = len(perm) if train_size >= 1.0 else max(1, round(train_size * len(perm)))
        self.train_idx = np.sort(perm[:n_train])
        self.val_idx = np.sort(perm[n_train:])
        self.test_idx = np.array([], dtype=np.int64)
        matrices = getattr(dataset, "matrices", [dataset.matrix])
        if num_workers > 0 and any(is_backed_sparse(m) for m in matrices):
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
            groups=self.groups,
            shuffle=shuffle,
            seed=self.seed,
            follow_epoch=shuffle,
            drop_last=self.drop_last and shuffle,
            partners=self.partners if shuffle else None,
        )
        loader = ResumableDataLoader if shuffle else DataLoader  # resumes mid-epoch
        return loader(
            self.dataset,
            sampler=sampler,
            batch_size=None,  # the sampler yields whole batches
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            multiprocessing_context=worker_start_method(self.dataset, self.num_workers),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, length-bucketed training batches."""
        return self.resumable(self._loader(self.train_idx, shuffle=True))

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches (fixed masks per epoch); empty when there is no validation set."""
        if self.n_val == 0:
            return []
        return self._loader(self.val_idx, shuffle=False)
