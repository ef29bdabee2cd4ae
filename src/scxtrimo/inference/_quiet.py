"""Lightning's per-run notices kept out of a run's output; its real warnings kept.

Used by training and by multi-process prediction (:mod:`scxtrimo.inference._distributed`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

#: The loggers of Lightning's start-up notices ("GPU available: False, used: False", "TPU
#: available", the litlogger tip, "Loading `train_dataloader` to estimate number of stepping
#: batches", "`Trainer.fit` stopped: `max_epochs=1` reached", CUDA_VISIBLE_DEVICES).
NOTICE_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")

#: Warnings about Lightning's own code, not the user's run: Lightning still calls torch's
#: deprecated ``LeafSpec`` (``lightning/pytorch/utilities/_pytree.py``) on every batch.
IGNORED_WARNINGS = ((FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),)


class _NoticeFilter(logging.Filter):
    """Drops records below WARNING unless scxtrimo's verbosity is ``"debug"``."""

    def filter(self, record: logging.LogRecord) -> bool:
        from scxtrimo._settings import settings

        return record.levelno >= logging.WARNING or settings.verbosity <= logging.DEBUG


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Run Lightning (Trainer construction and ``fit``) without its informational notices.

    Records of :data:`NOTICE_LOGGERS` below WARNING are filtered out (their loggers' levels are
    left as they are; ``scxtrimo.settings.verbosity = "debug"`` shows them), and the warnings of
    :data:`IGNORED_WARNINGS` are ignored; every other warning and log record passes, as
    scvi-tools' ``Trainer.fit`` does with its own list.
    """
    notice_filter = _NoticeFilter()
    loggers = [logging.getLogger(name) for name in NOTICE_LOGGERS]
    for log in loggers:
        log.addFilter(notice_filter)
    try:
        with warnings.catch_warnings():
            for category, message in IGNORED_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for log in loggers:
            log.removeFilter(notice_filter)
