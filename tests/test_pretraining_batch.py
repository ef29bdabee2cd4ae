"""The pretraining batch contract on real cells: masks, targets, down-sampling."""

from __future__ import annotations

import numpy as np
import pytest

from scxtrimo.data import MaskingSpec, map_genes
from scxtrimo.data._tokens import TokenIndex, pretraining_batch, row_seeds

N_GENES = 19264


def full_depth_profile(pbmc, mapping, cell: int) -> np.ndarray:
    """Dense reference: log1p(x / total * 1e4) over vocabulary genes, indexed by vocabulary."""
    counts = np.asarray(pbmc.X[cell].todense()).ravel().astype(np.float64)
    profile = np.zeros(N_GENES)
    cols = np.flatnonzero(mapping.col_to_vocab >= 0)
    np.add.at(profile, mapping.col_to_vocab[cols], counts[cols])
    return np.log1p(profile / profile.sum() * 1e4)


@pytest.mark.parametrize("downsample_prob", [0.0, 1.0])
def test_targets_are_full_depth_values(pbmc, downsample_prob):
    mapping = map_genes(pbmc.var)
    cells = np.arange(6)
    spec = MaskingSpec(downsample_prob=downsample_prob)
    batch = pretraining_batch(
        pbmc.X, cells, mapping.col_to_vocab, TokenIndex(N_GENES), spec, row_seeds(1, 0, cells), 128
    )
    for row, cell in enumerate(cells):
        truth = full_depth_profile(pbmc, mapping, cell)
        genes = ~batch["padding_mask"][row]
        genes[:2] = False
        visible = batch["gene_index"][row][genes]
        masked = batch["masked_index"][row][~batch["masked_pad"][row]]
        assert not np.isin(masked, visible).any()  # masked genes are hidden from the encoder
        assert genes.sum() <= 128
        np.testing.assert_allclose(
            batch["target_value"][row][~batch["masked_pad"][row]], truth[masked], rtol=1e-5
        )
        np.testing.assert_allclose(batch["visible_target"][row][genes], truth[visible], rtol=1e-5)
        assert not batch["visible_target"][row][~genes].any()
        inputs = batch["value"][row][genes]
        if downsample_prob == 0.0:  # the input is the full-depth profile itself
            np.testing.assert_allclose(inputs, truth[visible], rtol=1e-5)
        else:  # thinned counts: S (log10 depth) below T, inputs differ from the targets
            assert batch["value"][row][1] < batch["value"][row][0]
            assert not np.allclose(inputs, truth[visible])
