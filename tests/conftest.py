"""Shared fixtures: small slices of the real PBMC data shipped with scxtrimo, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import scxtrimo

settings.register_profile(
    "ci", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "dev", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

scxtrimo.settings.progress_bar = False
scxtrimo.settings.verbosity = "warning"

#: The shared real data sets: ``$SCXTRIMO_SHARED_DATA``, else ``../shared/data`` beside the
#: repository root (this checkout's, never a path of one machine).
SHARED_DATA = Path(
    os.environ.get("SCXTRIMO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


@pytest.fixture(scope="session")
def shared_data():
    """The shared data folder; the test is skipped, saying where it looked, when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"shared data not found at {SHARED_DATA} (set SCXTRIMO_SHARED_DATA to the folder, "
            "or put it at ../shared/data beside the repository)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def pbmc_full():
    """All 2,170 real PBMCs (raw counts). Do not modify: copy first."""
    return scxtrimo.datasets.pbmc4k()


@pytest.fixture
def pbmc(pbmc_full):
    """120 real PBMCs of mixed depth, a fresh copy per test."""
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(pbmc_full.n_obs, 120, replace=False))
    return pbmc_full[idx].copy()


@pytest.fixture(scope="session")
def tiny_model():
    """An untrained tiny model on the full vocabulary (plumbing tests)."""
    from scxtrimo.model import XTrimoGene

    return XTrimoGene(None, config="tiny", seed=0)


@pytest.fixture(autouse=True)
def _fresh_master_port(monkeypatch):
    """A free rendezvous port per test for the 2-process (gloo) runs.

    Lightning keeps the first run's ``MASTER_PORT`` in ``os.environ``; a later test in the same
    session would bind it again while the socket may still be in TIME_WAIT (EADDRINUSE).
    """
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_PORT", str(port))


@pytest.fixture
def soma(pbmc, tmp_path):
    """The PBMC fixture written as a TileDB-SOMA experiment (offline): ``(uri, h5ad path)``."""
    tiledbsoma_io = pytest.importorskip("tiledbsoma.io")
    path = tmp_path / "in.h5ad"
    pbmc.write_h5ad(path)
    uri = str(tmp_path / "pbmc.soma")
    tiledbsoma_io.from_h5ad(uri, str(path), measurement_name="RNA")
    return uri, path
