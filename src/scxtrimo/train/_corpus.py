"""A pretraining corpus: several studies, each with its own gene set, as one stream of cells."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CorpusPart:
    """One study of a pretraining corpus, checked and mapped onto the vocabulary.

    Attributes
    ----------
    name
        What the user passed (a file name or ``"AnnData #i"``), for messages.
    matrix
        Raw counts, cells x the study's genes (in memory or backed; never copied).
    col_to_vocab
        Column-to-vocabulary map of the study (``-1`` = not in the vocabulary).
    cells
        Rows of ``matrix`` that may be trained on (valid cells, in the caller's order).
    n_tokens
        In-vocabulary non-zero genes of every row of ``matrix`` (for length bucketing).
    """

    name: str
    matrix: Any
    col_to_vocab: np.ndarray
    cells: np.ndarray
    n_tokens: np.ndarray

    def measured(self, n_genes: int) -> np.ndarray:
        """Vocabulary genes this study measured: ``bool [n_genes]``.

        A gene absent from the study's ``var`` is unknown there, not zero: it carries no loss
        and is never shown to the model as a zero.
        """
        out = np.zeros(n_genes, dtype=bool)
        mapped = self.col_to_vocab[self.col_to_vocab >= 0]
        out[mapped] = True
        return out


class PretrainingCorpus:
    """Studies laid end to end on one global cell index.

    Global cell ``i`` of part ``p`` is ``offsets[p] + row``; seeds of masks and down-sampling
    are drawn from the global index, so a cell's draws do not depend on the batch it lands in,
    on the number of processes or on the other studies.

    Parameters
    ----------
    parts
        The studies, in order.
    n_genes
        Vocabulary size of the model.
    """

    def __init__(self, parts: Sequence[CorpusPart], n_genes: int) -> None:
        if len(parts) == 0:
            raise ValueError("A pretraining corpus needs at least one study.")
        self.parts = list(parts)
        self.n_genes = int(n_genes)
        sizes = np.array([p.matrix.shape[0] for p in self.parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.measured = np.stack([p.measured(self.n_genes) for p in self.parts])

    @property
    def n_cells(self) -> int:
        """Rows of all studies together (valid or not)."""
        return int(self.offsets[-1])

    @property
    def cells(self) -> np.ndarray:
        """Global indices of the trainable cells of every study."""
        return np.concatenate([p.cells + self.offsets[i] for i, p in enumerate(self.parts)])

    @property
    def n_tokens(self) -> np.ndarray:
        """Non-zero vocabulary genes of every global cell."""
        return np.concatenate([p.n_tokens for p in self.parts])

    def part_of(self, cells: np.ndarray) -> np.ndarray:
        """Study index of each global cell."""
        return np.searchsorted(self.offsets, np.asarray(cells, dtype=np.int64), side="right") - 1

    def local(self, cells: np.ndarray) -> tuple[int, np.ndarray]:
        """``(study, rows)`` of global cells that all belong to one study."""
        cells = np.asarray(cells, dtype=np.int64)
        parts = self.part_of(cells)
        if parts.size and (parts != parts[0]).any():
            raise ValueError("A pretraining batch must hold cells of a single study.")
        part = int(parts[0]) if parts.size else 0
        return part, cells - self.offsets[part]

    def summary(self) -> list[dict[str, Any]]:
        """Cells and measured genes per study (recorded in the model's training arguments)."""
        return [
            {
                "name": p.name,
                "n_cells": len(p.cells),
                "n_measured_genes": int(self.measured[i].sum()),
            }
            for i, p in enumerate(self.parts)
        ]
