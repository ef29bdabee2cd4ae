"""Interrupting ``embed_to_store`` after some committed chunks (a monkeypatch, not a parameter)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from scxtrimo.inference import EmbeddingStore


class StopForTest(RuntimeError):
    """Raised after the requested number of committed chunks (simulates an interrupted run)."""


@contextmanager
def stopped_after_chunks(n: int) -> Iterator[None]:
    """Run the body with ``embed_to_store`` stopping after ``n`` committed chunks."""
    commit = EmbeddingStore.write_chunk
    done = []

    def write_chunk(self, *args, **kwargs):
        commit(self, *args, **kwargs)
        done.append(1)
        if len(done) >= n:
            raise StopForTest(f"stopped after {len(done)} chunks (test hook)")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EmbeddingStore, "write_chunk", write_chunk)
        with pytest.raises(StopForTest):
            yield
