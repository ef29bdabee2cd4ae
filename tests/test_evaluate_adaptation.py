"""The metrics of benchmarks/evaluation/evaluate_adaptation.py on embeddings with known answers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = (
    Path(__file__).resolve().parents[1] / "benchmarks" / "evaluation" / "evaluate_adaptation.py"
)


@pytest.fixture(scope="module")
def ev():
    spec = importlib.util.spec_from_file_location("evaluate_adaptation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["evaluate_adaptation"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("evaluate_adaptation", None)


def _clusters(n_per: int = 60, n_types: int = 4, seed: int = 0):
    """Well separated Gaussian clusters, one per label; every other cell is a reference."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_types), n_per).astype(str)
    centres = 20.0 * np.eye(n_types, 8)
    emb = centres[labels.astype(int)] + rng.normal(size=(len(labels), 8))
    cells = np.arange(len(labels))
    return emb, labels, cells[::2], cells[1::2]


def test_separated_embedding_scores_one(ev):
    emb, labels, ref, query = _clusters()
    scores = ev.classification_scores(emb, labels, ref, query)
    assert scores == {"knn_macro_f1": 1.0, "logreg_macro_f1": 1.0}


def test_shuffled_labels_score_near_chance(ev):
    emb, labels, ref, query = _clusters()
    shuffled = np.random.default_rng(1).permutation(labels)
    scores = ev.classification_scores(emb, shuffled, ref, query)
    # Four balanced classes: chance macro-F1 is about 0.25.
    assert scores["knn_macro_f1"] < 0.45
    assert scores["logreg_macro_f1"] < 0.45


def test_nan_embedding_is_refused(ev):
    emb, labels, ref, query = _clusters()
    emb[query[0], 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ev.classification_scores(emb, labels, ref, query)


def test_batch_entropy_mixed_and_separated(ev):
    emb, labels, _, _ = _clusters(n_per=100)
    rng = np.random.default_rng(2)
    mixed = rng.permutation(np.repeat(["a", "b"], len(labels) // 2))
    assert ev.batch_entropy(emb, mixed) > 0.95
    # One batch per cluster: every neighbourhood holds a single batch.
    assert ev.batch_entropy(emb, labels) == pytest.approx(0.0, abs=1e-12)


def test_well_mixed_entropy(ev):
    assert ev.well_mixed_entropy(np.array(["a", "b"] * 10)) == pytest.approx(1.0)
    shares = np.array(["a"] * 30 + ["b"] * 10)
    expected = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25)) / np.log(2)
    assert ev.well_mixed_entropy(shares) == pytest.approx(expected)
    with pytest.raises(ValueError, match="two batches"):
        ev.batch_entropy(np.zeros((5, 2)), np.array(["a"] * 5))


def test_adapted_methods_average_their_seeds_and_show_the_range(ev, monkeypatch):
    def fake_run(ds, method, folder, args, seed):
        return {
            "knn_macro_f1": 0.90 + 0.02 * seed,
            "logreg_macro_f1": 0.80,
            "total_s": 10.0 * (seed + 1),
            "fit_s": 5.0,
            "embed_s": 1.0,
            "peak_rss_delta_mib": None,
            "seed": seed,
        }

    monkeypatch.setattr(ev, "_run_once", fake_run)
    args = type("Args", (), {"seeds": [0, 1, 2]})()
    adapted = ev.run_method(None, "adapted_default", None, args)
    assert adapted["seeds"] == [0, 1, 2]
    assert adapted["knn_macro_f1"] == pytest.approx(0.92)
    assert adapted["total_s"] == pytest.approx(20.0)
    assert ev._score(adapted, "knn_macro_f1") == "0.920 (0.900–0.940)"
    pca = ev.run_method(None, "pca", None, args)  # deterministic baselines run once
    assert "per_seed" not in pca
    assert ev._score(pca, "knn_macro_f1") == "0.900"
