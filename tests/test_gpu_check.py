"""benchmarks/speed/gpu_check.py runs its checks on the CPU (tiny config), so the GPU script cannot rot."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_fails_fast_without_cuda(gpu_check, capsys):
    with pytest.raises(SystemExit) as err:
        gpu_check.main(["--device", "cuda"])
    assert err.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_smoke_run_writes_results(gpu_check, tmp_path):
    assert gpu_check.main(["--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["parity"]["passed"]
    assert results["parity"]["max_abs_cpu_vs_official"] < 1e-4
    assert results["sdpa"]["uses_sdpa"]
    assert len(results["throughput"]["rows"]) == 3
    assert all(r["cells_per_s"] > 0 for r in results["throughput"]["rows"])
    assert results["ddp_smoke"]["passed"]
    assert "| depth" in (tmp_path / "gpu_check.md").read_text()
