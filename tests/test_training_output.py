"""A training run's output: Lightning's start-up notices are quiet, real warnings are kept."""

import logging
import warnings

import pytest
from lightning.pytorch.utilities.rank_zero import rank_zero_info

import scxtrimo
from scxtrimo.inference._quiet import NOTICE_LOGGERS, quiet_lightning

LEAFSPEC = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`"


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def notices():
    log = logging.getLogger(NOTICE_LOGGERS[0])
    handler, level = _Records(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler.messages
    log.removeHandler(handler)
    log.setLevel(level)


def test_notices_dropped_warnings_kept(notices):
    log = logging.getLogger(NOTICE_LOGGERS[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_lightning():
            rank_zero_info("GPU available: False, used: False")
            log.warning("a real Lightning warning")
            warnings.warn(LEAFSPEC, FutureWarning, stacklevel=1)
            warnings.warn("a real problem", UserWarning, stacklevel=1)
        rank_zero_info("after the run")
        warnings.warn(LEAFSPEC, FutureWarning, stacklevel=1)
    assert notices == ["a real Lightning warning", "after the run"]
    assert [str(w.message) for w in caught] == ["a real problem", LEAFSPEC]
    assert log.level == logging.INFO
    assert log.filters == []


def test_debug_verbosity_shows_notices(notices):
    before = scxtrimo.settings.verbosity
    scxtrimo.settings.verbosity = "debug"
    try:
        with quiet_lightning():
            rank_zero_info("GPU available: False, used: False")
    finally:
        scxtrimo.settings.verbosity = before
    assert notices == ["GPU available: False, used: False"]
