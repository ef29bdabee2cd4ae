"""A training DataLoader that a Lightning checkpoint taken mid-epoch resumes at the next batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` over a batch sampler that can skip batches.

    Lightning saves the ``state_dict`` of a training loader that has one in its checkpoints and
    hands it back to ``load_state_dict`` on ``Trainer.fit(ckpt_path=...)``. The state is the
    sampler's epoch and the number of batches this loader delivered in it; the resumed epoch
    skips those batches (the sampler's ``skip``), so training goes on with the batch that
    followed the checkpoint instead of restarting the epoch's batch order. Batches are counted
    where the loader hands them to Lightning, after any worker prefetching, so the count is
    what was trained on.

    The sampler (:class:`~scxtrimo.train.LengthBucketBatchSampler`) must rebuild the same
    batch order from its seed and epoch; it does.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch = 0
        self._delivered = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: runs at the first batch, after Lightning's set_epoch for this epoch.
        sampler = self.sampler
        epoch = int(getattr(sampler, "epoch", 0))
        skip = 0
        if self._resume is not None:
            if self._resume["epoch"] == epoch:
                skip = self._resume["batches"]
            self._resume = None
        sampler.skip = skip
        self._epoch, self._delivered = epoch, skip
        for batch in super().__iter__():
            self._delivered += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: where in its batch order training stands."""
        return {"epoch": self._epoch, "batches": self._delivered}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume the epoch ``state["epoch"]`` after its first ``state["batches"]`` batches."""
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}


class ResumableTrainLoaderMixin:
    """Mixin of a ``LightningDataModule``: its checkpoint state is where the training loader is.

    Lightning restores a data module's ``state_dict`` before it asks for the training loader
    (the learning-rate schedule asks for it early, to count the steps), which is before the
    state it saved for the loader itself would be applied; so the data module keeps the
    loader's state and hands it to the loader it makes next. The data module calls
    :meth:`resumable` on each training :class:`ResumableDataLoader` it makes.
    """

    _train_loader: ResumableDataLoader | None = None
    _train_resume: dict[str, int] | None = None

    def resumable(self, loader: ResumableDataLoader) -> ResumableDataLoader:
        """Track ``loader`` as the training loader; resume it if a checkpoint was restored."""
        self._train_loader = loader
        if self._train_resume is not None:  # kept: a loader made for a later epoch ignores it
            loader.load_state_dict(self._train_resume)
        return loader

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position (saved in Lightning checkpoints)."""
        if self._train_loader is None:
            return {}
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training loader (made now or next) where the checkpoint was taken."""
        state = state_dict.get("train_loader")
        if state is None:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state)
        else:
            self._train_resume = dict(state)
