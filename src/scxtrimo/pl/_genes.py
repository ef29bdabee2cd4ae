"""Plots of gene modules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def gene_module_heatmap(
    adata: AnnData,
    key: str = "scxtrimo_module",
    *,
    modules: Sequence[str] | None = None,
    max_genes_per_module: int | None = 50,
    show_gene_labels: bool | None = None,
    cmap: str = "RdBu_r",
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes:
    """Cosine similarity of the clustered genes' embeddings, ordered and boxed by module.

    Parameters
    ----------
    adata
        AnnData processed with :func:`scxtrimo.tl.gene_modules` (reads ``.var[key]`` and
        ``.uns["scxtrimo"][key]``).
    key
        The ``key_added`` of :func:`~scxtrimo.tl.gene_modules`.
    modules
        Modules to draw (default all).
    max_genes_per_module
        Draw at most this many genes of each module (the first in column order); ``None``:
        all.
    show_gene_labels
        Label the rows and columns with gene names (default: when at most 80 genes are drawn).
    cmap
        Colour map (similarities from -1 to 1).
    ax
        Axes to draw into.
    show
        Call :func:`matplotlib.pyplot.show`.

    Returns
    -------
    The axes.
    """
    try:
        info = adata.uns["scxtrimo"][key]
        column = adata.var[key]
    except KeyError:
        raise KeyError(
            f"No gene modules under {key!r}; run scxtrimo.tl.gene_modules(adata, "
            f"key_added={key!r}) first."
        ) from None
    genes = list(info["genes"])
    emb = np.asarray(info["embedding"], dtype=np.float64)
    position = {g: i for i, g in enumerate(genes)}
    module_of = column.loc[genes].astype(str).to_numpy()
    names = list(column.cat.categories) if hasattr(column, "cat") else sorted(set(module_of))
    if modules is not None:
        unknown = [m for m in modules if str(m) not in names]
        if unknown:
            raise KeyError(f"Modules {unknown} not found; modules: {names}.")
        names = [str(m) for m in modules]
    order, bounds = [], []
    for name in names:
        members = [g for g, m in zip(genes, module_of) if m == name]
        if max_genes_per_module is not None:
            members = members[:max_genes_per_module]
        if members:
            bounds.append((name, len(order), len(order) + len(members)))
            order.extend(position[g] for g in members)
    if not order:
        raise ValueError("No genes to draw.")
    x = emb[order]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    similarity = x @ x.T
    n = len(order)
    if ax is None:
        size = min(10.0, max(4.0, 0.12 * n + 3.0))
        _, ax = plt.subplots(figsize=(size + 1.0, size), layout="constrained")
    image = ax.imshow(similarity, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    for _, start, stop in bounds:
        ax.add_patch(
            plt.Rectangle(
                (start - 0.5, start - 0.5), stop - start, stop - start, fill=False, lw=1.2, ec="k"
            )
        )
    labels = [genes[i] for i in order]
    if show_gene_labels or (show_gene_labels is None and n <= 80):
        ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(n), labels, fontsize=6)
    else:
        mids = [(start + stop - 1) / 2 for _, start, stop in bounds]
        ax.set_xticks(mids, [f"M{name}" for name, _, _ in bounds], rotation=90, fontsize=7)
        ax.set_yticks(mids, [f"M{name}" for name, _, _ in bounds], fontsize=7)
    ax.set_title(f"gene modules ({info.get('use', '?')} embeddings, {len(bounds)} modules)")
    if show or (show is None and plt.isinteractive()):
        plt.show()
    return ax
