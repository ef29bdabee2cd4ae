"""Honest, simple evaluation: kNN label accuracy, classification scores and PCA baselines."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier


def knn_accuracy(
    embedding: np.ndarray,
    labels: np.ndarray,
    *,
    k: int = 15,
    n_folds: int = 5,
    seed: int = 0,
) -> dict[str, float | list[float]]:
    """Cross-validated k-nearest-neighbour classification of ``labels`` from ``embedding``.

    The same folds (stratified, seeded) are used for any embedding of the same cells, so two
    embeddings can be compared fold by fold.

    Parameters
    ----------
    embedding
        Cells x dimensions; rows with NaN are left out.
    labels
        One label per cell.
    k
        Neighbours (Euclidean distance, majority vote).
    n_folds
        Folds of the cross-validation.
    seed
        Seed of the fold assignment.

    Returns
    -------
    ``accuracy`` and ``macro_f1`` (means over folds) and the per-fold ``fold_accuracy``.
    """
    X = np.asarray(embedding, dtype=np.float64)
    y = np.asarray(labels).astype(str)
    keep = np.isfinite(X).all(axis=1)
    X, y = X[keep], y[keep]
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    accs, f1s = [], []
    for train, test in folds.split(X, y):
        clf = KNeighborsClassifier(n_neighbors=k).fit(X[train], y[train])
        pred = clf.predict(X[test])
        accs.append(float((pred == y[test]).mean()))
        f1s.append(float(f1_score(y[test], pred, average="macro")))
    return {
        "accuracy": float(np.mean(accs)),
        "macro_f1": float(np.mean(f1s)),
        "fold_accuracy": accs,
    }


def pca_baseline(
    adata, *, n_comps: int = 50, n_top_genes: int = 2000, layer: str | None = None
) -> np.ndarray:
    """The standard scanpy PCA of raw counts, for comparison with a foundation-model embedding.

    ``normalize_total`` (1e4) → ``log1p`` → 2,000 highly variable genes → ``scale`` (max 10)
    → PCA with ``n_comps`` components, on a copy (``adata`` is not modified).
    """
    import scanpy as sc

    work = sc.AnnData(X=(adata.layers[layer] if layer else adata.X).astype(np.float32))
    work.var_names = adata.var_names
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    sc.pp.highly_variable_genes(work, n_top_genes=min(n_top_genes, work.n_vars))
    work = work[:, work.var["highly_variable"]].copy()
    if hasattr(work.X, "toarray"):
        # Scaling centres every gene, so the matrix becomes dense anyway (cells x HVGs); doing
        # it here says so instead of scanpy warning about it.
        work.X = work.X.toarray()
    sc.pp.scale(work, max_value=10)
    sc.pp.pca(work, n_comps=min(n_comps, min(work.shape) - 1))
    return np.asarray(work.obsm["X_pca"])


def classification_scores(
    true: np.ndarray | Sequence, pred: np.ndarray | Sequence
) -> dict[str, float]:
    """Accuracy and macro-F1 of predicted labels, the F1 averaged over the true classes.

    Parameters
    ----------
    true, pred
        One label per cell; compared as strings.

    Returns
    -------
    ``accuracy`` and ``macro_f1``.
    """
    true, pred = np.asarray(true).astype(str), np.asarray(pred).astype(str)
    labels = sorted(set(true))
    return {
        "accuracy": float((true == pred).mean()),
        "macro_f1": float(f1_score(true, pred, labels=labels, average="macro", zero_division=0)),
    }


def log_normalized(counts: np.ndarray | sp.spmatrix) -> np.ndarray:
    """Dense ``log1p(x / total * 1e4)`` of a cells x genes counts matrix, as ``float32``.

    Computed in float64; a cell without counts keeps zeros.
    """
    x = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    x = x.astype(np.float64)
    totals = np.maximum(x.sum(axis=1, keepdims=True), 1.0)
    return np.log1p(x / totals * 1e4).astype(np.float32)


def pca_fit_transform(
    train_counts: np.ndarray | sp.spmatrix,
    test_counts: np.ndarray | sp.spmatrix,
    *,
    n_comps: int = 50,
    n_top_genes: int = 2000,
) -> tuple[np.ndarray, np.ndarray]:
    """The scanpy PCA recipe fitted on training cells only, then applied to test cells.

    ``log1p(x / total * 1e4)`` → the ``n_top_genes`` genes most variable in the training
    cells (variance of the log values) → z-scores with the training mean and sd (clipped at
    10) → PCA fitted on the training cells. Unlike :func:`pca_baseline`, nothing of the test
    cells enters the fit, as a classifier trained on the training cells requires.

    Returns
    -------
    Training and test cells in the principal components.
    """
    from sklearn.decomposition import PCA

    train, test = log_normalized(train_counts), log_normalized(test_counts)
    variance = train.var(axis=0)
    genes = np.argsort(-variance)[: min(n_top_genes, train.shape[1])]
    genes = genes[variance[genes] > 0]
    mean, sd = train[:, genes].mean(axis=0), train[:, genes].std(axis=0) + 1e-8

    def scale(x: np.ndarray) -> np.ndarray:
        return np.clip((x[:, genes] - mean) / sd, -10, 10)

    pca = PCA(n_components=min(n_comps, len(genes) - 1), random_state=0)
    return pca.fit_transform(scale(train)), pca.transform(scale(test))
