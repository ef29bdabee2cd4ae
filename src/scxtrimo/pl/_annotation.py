"""Plots of cell-type annotation results."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def confusion_matrix(
    adata: AnnData,
    true_key: str,
    pred_key: str,
    *,
    normalize: Literal["true", "pred", "all"] | None = "true",
    annotate: bool = True,
    cmap: str = "Blues",
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes:
    """Heatmap of true against predicted labels, with accuracy and macro-F1 in the title.

    Rows are the classes of ``obs[true_key]``, columns those of ``obs[pred_key]`` (they may
    differ, e.g. a model trained on other classes); cells with either label missing are left
    out. Accuracy and macro-F1 (over the true classes) compare the labels as strings, over
    all cells with both labels.

    Parameters
    ----------
    adata
        AnnData with both label columns.
    true_key
        ``obs`` column of the true labels.
    pred_key
        ``obs`` column of the predictions (e.g. from :func:`scxtrimo.tl.annotate`).
    normalize
        ``"true"``: each row sums to 1 (recall per class); ``"pred"``: each column sums to 1
        (precision); ``"all"``: the whole matrix sums to 1; ``None``: cell counts.
    annotate
        Write the value in each square.
    cmap
        Colour map.
    ax
        Axes to draw into; a new figure by default.
    show
        Call :func:`matplotlib.pyplot.show` (default: only when no ``ax`` was given and
        matplotlib is interactive).

    Returns
    -------
    The axes.
    """
    from sklearn.metrics import f1_score

    for key in (true_key, pred_key):
        if key not in adata.obs.columns:
            raise KeyError(f"{key!r} is not a column of obs.")
    if normalize not in ("true", "pred", "all", None):
        raise ValueError(f"normalize must be 'true', 'pred', 'all' or None, not {normalize!r}.")
    true, pred = adata.obs[true_key], adata.obs[pred_key]
    both = (true.notna() & pred.notna()).to_numpy()
    if not both.any():
        raise ValueError("No cell has both a true and a predicted label.")
    true_s, pred_s = true[both].astype(str), pred[both].astype(str)

    def order(series: pd.Series, present: pd.Series) -> list[str]:
        if isinstance(series.dtype, pd.CategoricalDtype):
            used = set(present)
            return [str(c) for c in series.cat.categories if str(c) in used]
        return sorted(set(present))

    rows, cols = order(true, true_s), order(pred, pred_s)
    counts = pd.crosstab(true_s, pred_s).reindex(index=rows, columns=cols, fill_value=0)
    values = counts.to_numpy(dtype=float)
    if normalize == "true":
        values = values / np.maximum(values.sum(axis=1, keepdims=True), 1)
    elif normalize == "pred":
        values = values / np.maximum(values.sum(axis=0, keepdims=True), 1)
    elif normalize == "all":
        values = values / values.sum()
    accuracy = float((true_s.to_numpy() == pred_s.to_numpy()).mean())
    macro_f1 = float(f1_score(true_s, pred_s, labels=rows, average="macro", zero_division=0))
    if ax is None:
        width = max(4.0, 0.55 * len(cols) + 2.5)
        height = max(3.5, 0.45 * len(rows) + 2.0)
        _, ax = plt.subplots(figsize=(width, height), layout="constrained")
    image = ax.imshow(values, cmap=cmap, aspect="auto", vmin=0)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(f"predicted ({pred_key})")
    ax.set_ylabel(f"true ({true_key})")
    ax.set_title(f"accuracy {accuracy:.3f}, macro-F1 {macro_f1:.3f} (n = {int(both.sum()):,})")
    if annotate:
        top = values.max() if values.size else 1.0
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                v = values[i, j]
                text = f"{int(v)}" if normalize is None else f"{v:.2f}"
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v > 0.6 * top else "black",
                )
    if show or (show is None and plt.isinteractive()):
        plt.show()
    return ax
