"""Plots for training curves and vocabulary overlap."""

from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from scxtrimo.model import XTrimoGene


def training_history(
    model: XTrimoGene,
    *,
    keys: list[str] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes:
    """Plot the per-epoch training and validation losses of a trained model.

    Parameters
    ----------
    model
        A model trained with :meth:`~scxtrimo.model.XTrimoGene.train`.
    keys
        History entries to draw; default every loss entry (``train_loss``,
        ``validation_loss``...) and, after fine-tuning, ``train_accuracy`` and
        ``validation_accuracy`` (on a second y axis).
    ax
        Axes to draw into; a new figure by default.
    show
        Call :func:`matplotlib.pyplot.show` (default: only when no ``ax`` was given and
        matplotlib is interactive).

    Returns
    -------
    The axes.
    """
    history = model.history_ or {}
    if not history:
        raise ValueError("The model has no training history; train it first.")
    keys = keys or sorted(k for k in history if "loss" in k or "mse" in k or "accuracy" in k)
    missing = [k for k in keys if k not in history]
    if missing:
        raise KeyError(f"Not in the history: {missing}; available: {sorted(history)}.")
    finetuned = any("accuracy" in k for k in history)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    accuracy_keys = [k for k in keys if "accuracy" in k]
    twin = ax.twinx() if accuracy_keys and len(accuracy_keys) < len(keys) else None
    for key in keys:
        frame = history[key]
        target = twin if twin is not None and key in accuracy_keys else ax
        target.plot(
            np.asarray(frame.index),
            frame[key].to_numpy(dtype=float),
            marker="o",
            ms=3,
            ls="--" if target is twin else "-",
            color=_split_color(key, keys),
            label=key,
        )
    ax.set_xlabel("epoch")
    if finetuned:
        ax.set_ylabel("accuracy" if len(accuracy_keys) == len(keys) else "cross-entropy")
    else:
        ax.set_ylabel("masked MSE (log1p scale)")
    if twin is not None:
        twin.set_ylabel("accuracy")
        handles = ax.get_legend_handles_labels()
        extra = twin.get_legend_handles_labels()
        ax.legend(handles[0] + extra[0], handles[1] + extra[1], frameon=False, fontsize=8)
    else:
        ax.legend(frameon=False)
    ax.set_title("xTrimoGene training")
    if show or (show is None and plt.isinteractive()):
        plt.show()
    return ax


def _split_color(key: str, keys: list[str]) -> str:
    """Same colour for a split's loss and accuracy: training blue, validation orange."""
    if "accuracy" in key:
        twin = key.replace("accuracy", "loss")
        if twin in keys:
            key = twin
    return f"C{keys.index(key) % 10}"


def gene_overlap(
    adata: AnnData, key: str = "X_scxtrimo", *, ax: Axes | None = None, show: bool | None = None
) -> Axes:
    """Bar chart of how the dataset's genes and counts cover the model vocabulary.

    Parameters
    ----------
    adata
        AnnData embedded with :func:`scxtrimo.tl.embed` (reads ``.uns["scxtrimo"][key]``).
    key
        The ``key_added`` used when embedding.
    ax
        Axes to draw into.
    show
        Call :func:`matplotlib.pyplot.show`.

    Returns
    -------
    The axes.
    """
    try:
        report = adata.uns["scxtrimo"][key]["gene_overlap"]
    except KeyError:
        raise KeyError(
            f"No overlap report at adata.uns['scxtrimo'][{key!r}]; run scxtrimo.tl.embed first."
        ) from None
    labels = [
        "dataset genes\nin vocabulary",
        "vocabulary genes\nin dataset",
        "counts on\nvocabulary genes",
    ]
    values = [
        report["column_fraction"],
        report["vocabulary_fraction"],
        report.get("count_fraction", np.nan),
    ]
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    bars = ax.bar(labels, values, color=["#4C72B0", "#55A868", "#C44E52"])
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v + 0.02, f"{v:.1%}", ha="center")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("share")
    ax.set_title(
        f"{report['n_vocabulary_genes_present']:,} of {report['n_vocabulary_genes']:,} vocabulary genes"
    )
    if show or (show is None and plt.isinteractive()):
        plt.show()
    return ax
