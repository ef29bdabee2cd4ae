"""Shared helpers of the benchmark suite: timing, machine probes, memory, FLOP models, workers.

Every figure of the suite is a ratio against a baseline measured in the same run, because the
machines these benchmarks run on are shared and absolute times drift. Heavy measurements run in
fresh subprocesses (:func:`run_worker`) so that their peak memory does not mix with another's.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
RUNNER = BENCH_DIR / "run_benchmarks.py"


# ------------------------------------------------------------------------------------------
# threads and machine
# ------------------------------------------------------------------------------------------


def set_threads(threads: int | None) -> None:
    """Use ``threads`` threads in torch and numba (``None``: leave the defaults)."""
    if threads is None:
        return
    import numba
    import torch

    torch.set_num_threads(threads)
    numba.set_num_threads(threads)


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (other jobs on the machine show up here)."""
    return [round(x, 2) for x in os.getloadavg()]


def machine_info() -> dict[str, Any]:
    """Cores, thread counts, library versions and the compute device."""
    import numba
    import scipy
    import torch

    return {
        "cpu_cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "numba": numba.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "load_average_1_5_15": load_average(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def matmul_flops(size: int = 2048, repeats: int = 3) -> float:
    """Best fp32 ``torch.mm`` throughput (FLOP/s) of ``size`` x ``size`` matrices."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    torch.mm(a, b)  # warm-up: thread pool, page faults
    best = min(timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2.0 * size**3 / best


def copy_bandwidth(n_bytes: int = 512 * 2**20, repeats: int = 3) -> float:
    """Best ``np.copyto`` bandwidth in bytes/s, counting the bytes read plus those written."""
    src = np.ones(n_bytes // 8, dtype=np.float64)
    dst = np.zeros_like(src)  # np.zeros maps fresh pages; the first copy faults them in
    np.copyto(dst, src)
    best = min(timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2.0 * src.nbytes / best


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
    """Wall time of one call of ``fn`` in seconds."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Time several functions in alternating rounds (A B, B A, A B…).

    Alternating spreads any drift of the machine's load evenly over the contenders, so their
    ratio stays meaningful on a shared machine.
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(timed(fns[name]))
    return times


def summary(times: list[float]) -> dict[str, float]:
    """Median, minimum and all of a list of times."""
    return {"median_s": statistics.median(times), "min_s": min(times), "all_s": list(times)}


def loglog_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (1 = linear growth)."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


# ------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    """RSS high-water mark of this process (``VmHWM``) in bytes, since the last reset."""
    return _status_kib("VmHWM") * 1024


def getrusage_max_rss() -> int:
    """``resource.getrusage`` max RSS in bytes (Linux reports KiB).

    Unlike ``VmHWM`` it is not only this process's own: at ``exec`` Linux carries over the
    high-water mark of the forked parent, so a small worker of a big parent reports the parent's
    peak. Kept for reference; :func:`peak_rss` is the figure reported.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class MemoryProbe:
    """Peak memory of a code region: numpy/Python heap (tracemalloc) and process RSS."""

    rss_before: int = 0
    peak_rss: int = 0
    getrusage_max_rss: int = 0
    traced_peak: int = 0

    def as_dict(self) -> dict[str, float]:
        """Sizes in MiB: RSS before, peak RSS, their difference and the traced heap peak."""
        mib = 2**20
        return {
            "rss_before_mib": self.rss_before / mib,
            "peak_rss_mib": self.peak_rss / mib,
            "peak_rss_increase_mib": (self.peak_rss - self.rss_before) / mib,
            "getrusage_max_rss_mib": self.getrusage_max_rss / mib,
            "tracemalloc_peak_mib": self.traced_peak / mib,
        }


@contextmanager
def memory_probe(trace: bool = True) -> Iterator[MemoryProbe]:
    """Measure the peak memory of the ``with`` block.

    The RSS high-water mark is reset when the block starts, so the peak is the block's own
    (plus what the process already held: ``rss_before``, i.e. interpreter, libraries, data and
    model weights). Blocks still run in fresh processes (:func:`run_worker`) so that freed but
    not yet returned memory of earlier work cannot hide a peak. ``tracemalloc`` sees numpy's
    and Python's allocations, not torch's or numba's.
    """
    reset_peak_rss()
    probe = MemoryProbe(rss_before=current_rss())
    if trace:
        tracemalloc.start()
    try:
        yield probe
    finally:
        if trace:
            probe.traced_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        probe.peak_rss = peak_rss()
        probe.getrusage_max_rss = getrusage_max_rss()


# ------------------------------------------------------------------------------------------
# FLOP models (multiply-add = 2 FLOPs; forward pass unless stated)
# ------------------------------------------------------------------------------------------


def transformer_layer_flops(n: np.ndarray | float, dim: int, ff_dim: int) -> np.ndarray | float:
    """One softmax-attention layer over ``n`` tokens.

    Q, K, V and output projections ``8 n d²``, feed-forward ``4 n d ff`` (``16 n d²`` for
    ``ff = 4 d``, so ``24 n d²`` in all) and attention scores plus weighted sum ``4 n² d``.
    """
    n = np.asarray(n, dtype=np.float64)
    return 8.0 * n * dim**2 + 4.0 * n * dim * ff_dim + 4.0 * n**2 * dim


def value_embedding_flops(n: np.ndarray | float, bin_num: int, dim: int) -> np.ndarray | float:
    """Auto-discretisation embedding of ``n`` values: 1→bins, bins→bins, bins→dim."""
    return np.asarray(n, dtype=np.float64) * (
        2.0 * bin_num + 2.0 * bin_num**2 + 2.0 * bin_num * dim
    )


def performer_layer_flops(
    n: float, dim: int, heads: int, dim_head: int, ff_dim: int, nb_features: int
) -> float:
    """One FAVOR+ (linear attention) layer over ``n`` positions.

    Projections ``8 n d h·dh``, random features of queries and keys ``4 n h dh m``, linear
    attention (``φ(k)ᵀ v`` and ``φ(q)·context``) ``4 n h m dh`` plus the normaliser, feed-forward
    ``4 n d ff``.
    """
    inner = heads * dim_head
    projections = 8.0 * n * dim * inner
    features = 4.0 * n * inner * nb_features
    attention = 4.0 * n * inner * nb_features + 2.0 * n * heads * nb_features
    return projections + features + attention + 4.0 * n * dim * ff_dim


def encoder_flops(config: Any, n_tokens: np.ndarray | float) -> np.ndarray | float:
    """Value embedding plus all encoder layers of ``config`` over cells of ``n_tokens`` tokens."""
    layers = config.encoder_depth * transformer_layer_flops(
        n_tokens, config.encoder_dim, config.encoder_ff_dim
    )
    return layers + value_embedding_flops(n_tokens, config.bin_num, config.encoder_dim)


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------


def load_pbmc4k():
    """The pbmc4k AnnData and its column-to-vocabulary map."""
    import scxtrimo
    from scxtrimo.data import map_genes

    adata = scxtrimo.datasets.pbmc4k()
    return adata, map_genes(adata.var).col_to_vocab


def binomial_thin(matrix, rate: float, seed: int):
    """Binomial down-sampling of a CSR counts matrix: each count ``c`` becomes
    ``Binomial(c, rate)`` (seeded), zeros dropped; ``rate >= 1`` returns a copy unchanged."""
    out = matrix.copy()
    if rate < 1.0:
        counts = out.data.astype(np.int64)  # float-stored counts too
        out.data = np.random.default_rng(seed).binomial(counts, rate).astype(out.data.dtype)
        out.eliminate_zeros()
    return out


def tokens_per_cell(matrix, col_to_vocab: np.ndarray) -> np.ndarray:
    """In-vocabulary non-zero entries per row of a CSR matrix (gene tokens, without T and S)."""
    in_vocab = (col_to_vocab >= 0)[matrix.indices]
    row = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    return np.bincount(row, weights=in_vocab, minlength=matrix.shape[0]).astype(np.int64)


def depth_groups(n_tokens: np.ndarray, n_groups: int, per_group: int | None) -> list[np.ndarray]:
    """Cells grouped by depth, shallowest group first.

    ``per_group=None`` partitions all cells into ``n_groups`` contiguous depth bins; otherwise
    each group holds ``per_group`` cells adjacent in the depth ranking, the groups evenly spaced
    from the shallowest to the deepest cells (as the length buckets of a large dataset would be).
    """
    order = np.argsort(n_tokens, kind="stable")
    if per_group is None:
        return [np.sort(part) for part in np.array_split(order, n_groups)]
    starts = np.linspace(0, len(order) - per_group, n_groups).round().astype(np.int64)
    return [np.sort(order[s : s + per_group]) for s in starts]


def spread_by_depth(n_tokens: np.ndarray, k: int) -> np.ndarray:
    """``k`` cells evenly spread over the depth ranking, shallowest and deepest included."""
    order = np.argsort(n_tokens, kind="stable")
    ranks = np.unique(np.linspace(0, len(order) - 1, k).round().astype(np.int64))
    return np.sort(order[ranks])


# ------------------------------------------------------------------------------------------
# subprocess workers
# ------------------------------------------------------------------------------------------


def machine_probe() -> dict[str, float]:
    """Worker: matmul FLOP/s and copy bandwidth (1 GiB of buffers, kept out of the parent)."""
    return {"matmul_flops_per_s": matmul_flops(), "copy_bandwidth_bytes_per_s": copy_bandwidth()}


def run_worker(target: str, payload: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """Run ``module.function(**payload)`` in a fresh Python process and return its result.

    ``target`` is ``"module:function"`` with ``module`` a file of this folder. The function
    must return a JSON-serialisable dict.
    """
    with tempfile.TemporaryDirectory(prefix="scxtrimo-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(RUNNER), "--worker", target, "--payload", json.dumps(payload)]
        cmd += ["--worker-output", str(out)]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        proc = subprocess.run(cmd, cwd=BENCH_DIR.parents[1], check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {target} failed with exit code {proc.returncode}")
        return json.loads(out.read_text())


def worker_main(target: str, payload: str, output: str) -> None:
    """Entry point of a worker process (see :func:`run_worker`)."""
    import importlib

    module_name, function_name = target.split(":")
    sys.path.insert(0, str(BENCH_DIR))
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(**json.loads(payload))
    result.setdefault("load_average_end", load_average())
    Path(output).write_text(json.dumps(result, default=json_default))


def json_default(obj: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars and arrays as numbers and lists, else text."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def log(message: str) -> None:
    """Progress line on stderr (stdout stays clean)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
