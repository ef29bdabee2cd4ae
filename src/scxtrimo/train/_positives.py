"""Positive pairs: neighbours within a batch, mutual nearest neighbours across batches."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from ._corpus import PretrainingCorpus


@dataclass(frozen=True)
class PositivePairs:
    """Which cells may stand in for a cell as its positive in the contrastive term.

    Attributes
    ----------
    neighbours
        ``int64 [n, k + 1]``: each cell itself (column 0) and its ``k`` nearest neighbours in
        expression space (a PCA of the user's own cells).
    partner_ptr
        ``int64 [n + 1]`` offsets of each cell's row in ``partners``.
    partners
        The cells of *other* batches that are mutual nearest neighbours of each cell (empty
        without batches), ragged: row ``i`` is ``partners[partner_ptr[i]:partner_ptr[i + 1]]``.
    """

    neighbours: np.ndarray
    partner_ptr: np.ndarray
    partners: np.ndarray

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return self.neighbours.shape[0]

    @property
    def n_with_partners(self) -> int:
        """Cells with at least one mutual nearest neighbour in another batch."""
        return int(np.count_nonzero(np.diff(self.partner_ptr)))

    def draw(
        self, anchors: np.ndarray, cross_batch_share: float, rng: np.random.Generator
    ) -> np.ndarray:
        """One positive per anchor: a uniform pick among the anchor and its neighbours, or
        (with probability ``cross_batch_share``, for anchors that have some) one of its
        cross-batch partners.
        """
        k = self.neighbours.shape[1]
        positive = self.neighbours[anchors, rng.integers(0, k, size=len(anchors))]
        counts = np.diff(self.partner_ptr)[anchors]
        cross = (counts > 0) & (rng.random(len(anchors)) < cross_batch_share)
        if cross.any():
            pick = (rng.random(int(cross.sum())) * counts[cross]).astype(np.int64)
            positive[cross] = self.partners[self.partner_ptr[anchors[cross]] + pick]
        return positive


def expression_features(
    counts: sp.csr_matrix,
    *,
    log_normalised: bool = False,
    n_top_genes: int = 2000,
    n_comps: int = 50,
    seed: int = 0,
) -> np.ndarray:
    """A PCA of the cells, as the scanpy tutorial pipeline makes it (the neighbourhoods PCA
    and scVI users see): depth-normalised to 10,000, log1p, the most variable genes, scaled,
    ``n_comps`` components.

    Parameters
    ----------
    counts
        Cells x genes raw counts (not modified).
    log_normalised
        ``counts`` already holds ``log1p``-normalised values: skip those two steps.
    n_top_genes
        Highly variable genes kept (all genes when there are fewer).
    n_comps
        Principal components (at most ``min(cells, genes) - 1``).
    seed
        Seed of the randomised solver.

    Returns
    -------
    ``float32 [cells, n_comps]``.
    """
    import anndata as ad
    import scanpy as sc

    work = ad.AnnData(sp.csr_matrix(counts, dtype=np.float32, copy=True))
    if not log_normalised:
        sc.pp.normalize_total(work, target_sum=1e4)
        sc.pp.log1p(work)
    if work.n_vars > n_top_genes:
        sc.pp.highly_variable_genes(work, n_top_genes=n_top_genes, subset=True)
    with warnings.catch_warnings():  # scaling the 2,000 genes densifies them, as intended
        warnings.filterwarnings("ignore", message="zero-centering a sparse")
        sc.pp.scale(work, max_value=10)
    n_comps = max(1, min(n_comps, work.n_obs - 1, work.n_vars - 1))
    sc.pp.pca(work, n_comps=n_comps, random_state=seed)
    return np.asarray(work.obsm["X_pca"], dtype=np.float32)


def _knn(reference: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    k = min(k, reference.shape[0])
    return NearestNeighbors(n_neighbors=k).fit(reference).kneighbors(query, return_distance=False)


def positive_pairs(
    features: np.ndarray,
    batches: np.ndarray | None = None,
    *,
    n_neighbors: int = 10,
    n_mutual: int = 20,
) -> PositivePairs:
    """Neighbour table and cross-batch mutual nearest neighbours (MNN) of ``features``.

    MNN pairs (Haghverdi et al. 2018) are searched on L2-normalised features (cosine
    distance, which discounts each batch's overall scale): cell ``a`` of batch ``A`` and
    ``b`` of batch ``B`` pair when each is among the other's ``n_mutual`` nearest cells of
    the other batch. Within-batch neighbours are searched within each cell's own batch.

    Parameters
    ----------
    features
        ``[cells, d]`` expression features (e.g. :func:`expression_features`).
    batches
        ``[cells]`` batch labels, or ``None`` (one batch).
    n_neighbors
        Within-batch neighbours per cell (0: a cell's only positive is itself).
    n_mutual
        Neighbourhood size of the MNN search.

    Returns
    -------
    The pairs; see :class:`PositivePairs`.
    """
    n = features.shape[0]
    codes = (
        np.zeros(n, dtype=np.int64)
        if batches is None
        else np.unique(batches, return_inverse=True)[1]
    )
    neighbours = np.repeat(np.arange(n, dtype=np.int64)[:, None], n_neighbors + 1, axis=1)
    for b in np.unique(codes):
        members = np.flatnonzero(codes == b)
        if n_neighbors and members.size > 1:
            found = members[_knn(features[members], features[members], n_neighbors + 1)]
            # Column 0 stays the cell itself; a small batch repeats its last neighbour.
            found = found[:, 1:]
            neighbours[members, 1 : 1 + found.shape[1]] = found
            neighbours[members, 1 + found.shape[1] :] = found[:, -1:]
    mutual = sp.csr_matrix((n, n), dtype=np.int8)
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    groups = [np.flatnonzero(codes == b) for b in np.unique(codes)]
    for i, a_cells in enumerate(groups):
        for b_cells in groups[i + 1 :]:
            ab = b_cells[_knn(unit[b_cells], unit[a_cells], n_mutual)]  # [|A|, k] cells of B
            ba = a_cells[_knn(unit[a_cells], unit[b_cells], n_mutual)]  # [|B|, k] cells of A
            forward = sp.csr_matrix(
                (np.ones(ab.size, np.int8), (np.repeat(a_cells, ab.shape[1]), ab.ravel())),
                shape=(n, n),
            )
            backward = sp.csr_matrix(
                (np.ones(ba.size, np.int8), (ba.ravel(), np.repeat(b_cells, ba.shape[1]))),
                shape=(n, n),
            )
            pairs = forward.multiply(backward)  # a -> b and b -> a: mutual
            mutual = mutual + pairs + pairs.T
    mutual = sp.csr_matrix(mutual)
    mutual.sort_indices()
    return PositivePairs(
        neighbours=neighbours,
        partner_ptr=mutual.indptr.astype(np.int64),
        partners=mutual.indices.astype(np.int64),
    )


def corpus_neighbours(
    corpus: PretrainingCorpus,
    train_cells: np.ndarray,
    *,
    n_neighbors: int = 10,
    seed: int = 0,
) -> np.ndarray:
    """Each training cell's nearest training cells of its own study, on the global cell index.

    The neighbours are searched in a PCA of each study's training cells
    (:func:`expression_features`), so pretraining with neighbour pairs uses the same
    neighbourhoods a PCA user sees, and never a validation cell.

    Parameters
    ----------
    corpus
        The studies.
    train_cells
        Global indices of the training cells (sorted).
    n_neighbors
        Neighbours per cell.
    seed
        Seed of the PCA's randomised solver.

    Returns
    -------
    ``int64 [corpus.n_cells, n_neighbors]``: global indices of each training cell's neighbours
    (the cell itself excluded; a study smaller than ``n_neighbors + 1`` cells repeats its last
    neighbour); rows of other cells are ``-1``.
    """
    from scxtrimo.data._matrix import rows_as_csr

    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}.")
    train_cells = np.asarray(train_cells, dtype=np.int64)
    table = np.full((corpus.n_cells, n_neighbors), -1, dtype=np.int64)
    part_of = corpus.part_of(train_cells)
    for i, part in enumerate(corpus.parts):  # a handful of studies
        cells = train_cells[part_of == i]
        if cells.size < 2:
            raise ValueError(
                f"Neighbour pairs need at least 2 training cells per study; {part.name} has "
                f"{cells.size}. Drop the study or use positives='views'."
            )
        rows = cells - corpus.offsets[i]
        features = expression_features(rows_as_csr(part.matrix, rows), seed=seed)
        found = positive_pairs(features, n_neighbors=n_neighbors).neighbours[:, 1:]
        table[cells] = cells[found]
    return table
