"""The preamble every tool shares: copy, pick the modality, resolve the model, record the call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from anndata import AnnData

from scxtrimo._version import __version__

if TYPE_CHECKING:
    from mudata import MuData

    from scxtrimo.model import XTrimoGene


def load_model(model: Any = None, *, device: str | None = None) -> XTrimoGene:
    """:func:`scxtrimo.model.resolve_model`, looked up when called (tests replace it there)."""
    import scxtrimo.model

    return scxtrimo.model.resolve_model(model, device=device)


def _mudata_class() -> type | tuple:
    try:
        from mudata import MuData
    except ImportError:  # pragma: no cover - mudata is a dependency
        return ()
    return MuData


def is_data(obj: Any) -> bool:
    """Whether ``obj`` is an AnnData or a MuData (rather than a model)."""
    return isinstance(obj, AnnData | _mudata_class())


def target_of(adata: AnnData | MuData, mod: str | None) -> AnnData:
    """The AnnData a tool reads and writes: ``adata`` itself, or its modality ``mod``."""
    if isinstance(adata, _mudata_class()):
        if mod not in adata.mod:
            raise KeyError(
                f"mod={mod!r} is not a modality of this MuData; modalities: {list(adata.mod)}."
            )
        return adata.mod[mod]
    if not isinstance(adata, AnnData):
        raise TypeError(f"Expected an AnnData or MuData, got {type(adata).__name__}.")
    return adata


def copied_if(adata: AnnData | MuData, copy: bool) -> AnnData | MuData:
    """``adata``, or a copy of it with ``copy=True`` (refused for backed data)."""
    if not copy:
        return adata
    if getattr(adata, "isbacked", False):
        raise ValueError("copy=True is not possible for a backed AnnData; use copy=False.")
    return adata.copy()


def record(target: AnnData, key_added: str, params: dict[str, Any]) -> None:
    """Write a tool's parameters to ``target.uns["scxtrimo"][key_added]``, with the version."""
    target.uns.setdefault("scxtrimo", {})[key_added] = {**params, "scxtrimo_version": __version__}


def skipped_cells(target: AnnData, rows: np.ndarray) -> dict[str, Any]:
    """What ``.uns["scxtrimo"][key]`` records of the cells a tool left out (``invalid_cells="skip"``).

    ``rows`` are positions in ``target``; the record holds their count and their ``obs_names``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    return {
        "n_skipped_cells": int(rows.size),
        "skipped_cells": np.asarray(target.obs_names[rows], dtype=object).astype(str),
    }


def start_tool(
    adata: AnnData | MuData, model: Any, *, mod: str | None, copy: bool, device: str | None = None
) -> tuple[AnnData | MuData, AnnData, XTrimoGene]:
    """Copy if asked, pick the modality and resolve the model, in that order (errors first).

    Returns
    -------
    What the tool returns with ``copy=True`` (the copy, else ``adata``), the AnnData it reads
    and writes (``adata`` or its MuData modality), and the model. The tool then checks its
    input with ``model.prepare_input(target, ..., **overrides)`` itself, so that the input
    warnings point at the user's call.
    """
    adata = copied_if(adata, copy)
    return adata, target_of(adata, mod), load_model(model, device=device)


def gene_columns(
    target: AnnData, col_to_vocab: np.ndarray, genes: Sequence[str] | str | None
) -> tuple[np.ndarray, np.ndarray]:
    """The columns of the requested ``genes`` (``var_names``; ``None``: every mapped gene).

    Returns the sorted columns that map to the vocabulary and those that do not.

    Raises
    ------
    KeyError
        If a requested gene is not in ``var_names``.
    """
    if genes is None:
        return np.flatnonzero(col_to_vocab >= 0), np.empty(0, dtype=np.int64)
    genes = [genes] if isinstance(genes, str) else list(genes)
    missing = [g for g in genes if g not in target.var_names]
    if missing:
        raise KeyError(
            f"{len(missing)} of the requested genes are not in var_names, e.g. {missing[:5]}."
        )
    cols = np.unique(target.var_names.get_indexer(genes))
    mapped = col_to_vocab[cols] >= 0
    return cols[mapped], cols[~mapped]
