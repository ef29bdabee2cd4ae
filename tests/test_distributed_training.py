"""Distributed pretraining (Lightning DDP on the CPU, gloo): two processes learn what one does.

Global batches are built once and split by rank (``batch[rank::world]``); DDP averages the
ranks' gradients and the InfoNCE term gathers the other rank's views, so with equal batch sizes
(``drop_last=True``) two processes take the same optimisation steps as one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scxtrimo.model import XTrimoGene

# The two_studies fixture's 400-gene panel study: the coverage warning is expected.
pytestmark = pytest.mark.filterwarnings("ignore::scxtrimo.data.LowVocabularyCoverageWarning")


@pytest.fixture
def two_studies(pbmc):
    """Real PBMCs as two studies: the full gene set, and a 400-gene panel of other cells."""
    full = pbmc[:64].copy()
    rng = np.random.default_rng(1)
    expressed = np.flatnonzero(np.asarray(pbmc.X[64:128].sum(axis=0)).ravel() > 0)
    panel = pbmc[64:128, np.sort(rng.choice(expressed, 400, replace=False))].copy()
    return full, panel


def _train(studies, tmp_path, **trainer):
    full = studies[0]
    XTrimoGene.setup_anndata(full)
    model = XTrimoGene(full, config="tiny", seed=0)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    model.train(
        corpus=list(studies),
        max_steps=3,
        batch_size=8,
        max_genes=64,
        seed=5,
        drop_last=True,
        accelerator="cpu",
        enable_checkpointing=False,
        logger=False,
        default_root_dir=str(tmp_path),
        **trainer,
    )
    return before, {k: v.detach().clone() for k, v in model.module.state_dict().items()}


@pytest.mark.slow
def test_two_processes_take_the_same_steps_as_one(two_studies, tmp_path):
    start, one = _train(two_studies, tmp_path / "one", devices=1)
    _, two = _train(two_studies, tmp_path / "two", devices=2, strategy="ddp_spawn")
    moved = [k for k in one if one[k].is_floating_point() and not torch.equal(one[k], start[k])]
    assert len(moved) > 10  # training really changed the weights (the check can fail)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=5e-5, msg=key)
    # ...and not because the two-process run changed nothing: it moved as far as one process.
    delta = max((two[k] - start[k]).abs().max().item() for k in moved)
    assert delta > 1e-3
