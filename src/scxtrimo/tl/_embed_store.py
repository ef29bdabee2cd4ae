"""``scxtrimo.tl.embed_to_store``: resumable, chunked embedding of inputs larger than memory.

The input (an ``.h5ad`` read backed, an AnnData ``.zarr``, a TileDB-SOMA experiment, several
``.h5ad`` shards, or an AnnData) is cut into chunks of ``chunk_size`` consecutive cells. Each
chunk is read, checked, embedded and written to its rows of a zarr array; then a marker file is
moved into place (write to a temporary name, then rename), which is the chunk's commit. A run
that is killed leaves the finished chunks and at most one chunk whose marker is missing; with
``resume=True`` only chunks without a marker are computed. Memory depends on the chunk and
batch sizes, never on the number of cells (only ``obs`` and the per-gene tables are held).

The store and its layout, the per-chunk engine and the multi-process pieces are in
:mod:`scxtrimo.inference`; this room is the driver.

With several processes (``devices > 1``, Lightning DDP), each rank embeds its share of the
unfinished chunks and writes them through a prediction writer; chunks are aligned to the zarr
chunks, so two ranks never write to the same zarr chunk and the rows end in input order.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from anndata import AnnData

from scxtrimo._settings import settings
from scxtrimo._version import __version__
from scxtrimo.data._sources import RowSource, open_source
from scxtrimo.data._vocabulary import log_overlap
from scxtrimo.inference import (
    DEFAULT_CHUNK_SIZE,
    ChunkEngine,
    EmbeddingStore,
    check_precision,
    input_fingerprint,
    leaf_sources,
    model_fingerprint,
    resolve_device,
)

from ._common import load_model

if TYPE_CHECKING:
    from scxtrimo.model import XTrimoGene

logger = logging.getLogger("scxtrimo")

_KILL_ENV = "SCXTRIMO_TEST_KILL_AFTER_CHUNKS"  # test hook: SIGKILL after N committed chunks


class _ProbeRecords(logging.Filter):
    """Drops the probe's records: about its first 64 rows only, they would mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Skipping ") or " vocabulary genes, " in message)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def _global_rank_env() -> int:
    """The global rank of this process when launched by torchrun / SLURM / Lightning (else 0)."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ and (
            var != "SLURM_PROCID" or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        ):
            return int(os.environ[var])
    return int(os.environ.get("LOCAL_RANK", "0"))


def _externally_launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or (
        "LOCAL_RANK" in os.environ and int(os.environ["LOCAL_RANK"]) > 0
    )


def _check_devices(devices: int, accelerator: str, num_nodes: int) -> tuple[int, str]:
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        available = torch.cuda.device_count()
        what = "CUDA devices"
    elif accelerator == "cpu":
        available = os.cpu_count() or 1
        what = "CPU cores (one process per device)"
    else:
        raise ValueError(f"accelerator must be 'auto', 'cpu' or 'gpu', not {accelerator!r}.")
    if isinstance(devices, bool) or not isinstance(devices, int | np.integer):
        raise TypeError(f"devices must be an integer (-1: all), not {devices!r}.")
    if devices == -1:
        if accelerator == "cpu":
            raise ValueError("devices=-1 (all) is only for GPUs; give a number of CPU processes.")
        devices = available
    if devices < 1:
        raise ValueError(f"devices must be >= 1 or -1, got {devices}.")
    if devices > available:
        raise ValueError(
            f"devices={devices} but this machine has {available} {what}"
            + (
                " (CUDA is not available)"
                if accelerator in ("gpu", "cuda") and not available
                else ""
            )
            + f"; pass devices<={max(available, 1)}."
        )
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}.")
    return int(devices), ("gpu" if accelerator in ("gpu", "cuda") else "cpu")


def _probe(net: XTrimoGene, src: RowSource, model_layer: str | None, kwargs: dict) -> Any:
    """Run the model's own input checks on the first rows of one source (errors before work)."""
    n = min(src.shape[0], 64)
    block = src.read_rows(np.arange(n, dtype=np.int64))
    probe = AnnData(X=block, obs=src.obs.iloc[:n].copy(), var=src.var.copy())
    if model_layer is not None:
        probe.layers[model_layer] = block
    drop = _ProbeRecords()
    loggers = [logger, logging.getLogger(log_overlap.__module__)]  # levels are left as they are
    for each in loggers:
        each.addFilter(drop)
    try:
        return net.prepare_input(probe, invalid="skip", **kwargs)
    finally:
        for each in loggers:
            each.removeFilter(drop)


def embed_to_store(
    source: Any,
    out: str | os.PathLike,
    model: XTrimoGene | str | os.PathLike | None = None,
    *,
    key_added: str = "X_scxtrimo",
    layer: str | None = None,
    gene_symbols_key: str | None = None,
    gene_ids_key: str | None = None,
    input_type: Literal["counts", "log1p"] | None = None,
    total_counts_key: str | None = None,
    batch_size: int | None = None,
    max_tokens: int = 16_384,
    max_genes: int | Literal["all"] | None = None,
    pooling: Literal["all", "max", "mean"] = "all",
    target_depth: float | str | None = None,
    invalid_cells: Literal["raise", "skip"] = "raise",
    precision: Literal["fp32", "bf16", "int8"] = "fp32",
    min_overlap: float = 0.5,
    chunk_size: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    devices: int = 1,
    accelerator: str = "auto",
    strategy: str | None = None,
    num_nodes: int = 1,
    device: str | None = None,
    copy_input: bool | None = None,
    measurement_name: str = "RNA",
    X_name: str | None = None,
    obs_value_filter: str | None = None,
    progress_bar: bool | None = None,
) -> Path:
    """Embed cells chunk by chunk into a ``.zarr`` store or an ``.h5ad`` file, resumably.

    For inputs that do not fit in memory, runs that may be interrupted, and several processes
    or GPUs. The result equals :func:`~scxtrimo.tl.embed` (to float rounding), in input order.

    Parameters
    ----------
    source
        An ``.h5ad`` path (read backed), an AnnData ``.zarr`` store, a TileDB-SOMA experiment
        (local path or URI; see ``measurement_name``, ``X_name``, ``obs_value_filter``), a list
        of ``.h5ad`` shards read one after the other (their genes may differ; each is mapped to
        the vocabulary on its own), an AnnData, or a :class:`~scxtrimo.data.RowSource`.
    out
        ``*.zarr``: an AnnData zarr store with ``obs``, ``obsm[key_added]`` and
        ``uns["scxtrimo"][key_added]`` (read it with ``anndata.read_zarr``). ``*.h5ad``: written
        once at the end through a temporary file and a rename; the work in progress is kept in
        a hidden ``.<name>.scxtrimo.zarr`` next to it (removed when done).
    model
        An :class:`~scxtrimo.model.XTrimoGene`, a saved-model folder, the scFoundation
        ``models.ckpt`` or ``None`` for the shipped pretrained model.
    key_added, layer, gene_symbols_key, gene_ids_key, input_type, total_counts_key
        As in :func:`~scxtrimo.tl.embed` (``input_type="bulk"`` is not supported here: its
        scale is the median over all samples; use :func:`~scxtrimo.tl.embed`).
    batch_size, max_tokens, max_genes, pooling, target_depth, invalid_cells, precision
        As in :func:`~scxtrimo.tl.embed`. With ``invalid_cells="raise"`` a chunk with such
        cells stops the run with the list of them (the finished chunks are kept).
    min_overlap
        Minimum share of each source's genes that must map to the vocabulary.
    chunk_size
        Cells per chunk: the unit of work, of writing and of resuming (default 4,096; on resume
        the store's). Memory is about ``chunk_size`` rows of input plus their embeddings.
    resume
        Continue an interrupted run into ``out``: only unfinished chunks are computed. The model,
        the input and the parameters must be those of the first run (checked against the
        store's fingerprint; a mismatch is an error). An already complete ``out`` is left as is.
    overwrite
        Replace ``out`` if it exists. Without ``resume`` or ``overwrite``, an existing ``out``
        is an error.
    devices
        ``1``: embed in this process on ``device``. ``N > 1`` (or ``-1``: all GPUs): Lightning
        prediction in ``N`` processes (DDP); each process embeds its share of the chunks.
    accelerator
        ``"auto"`` (GPUs if CUDA is available), ``"gpu"`` or ``"cpu"`` (for ``devices > 1``).
    strategy
        Lightning strategy for ``devices > 1``: default ``"ddp_spawn"``, or ``"ddp"`` when the
        processes were started by ``torchrun``/SLURM (each process then calls this function
        with the same arguments; rank 0 creates the store).
    num_nodes
        Nodes, for multi-node runs (Lightning ``num_nodes``).
    device
        Device of a one-process run (default ``scxtrimo.settings.device``).
    copy_input
        For an ``.h5ad`` output of one ``.h5ad`` input: write a copy of the input plus the
        embedding (default ``True``, as ``scxtrimo embed`` always did) or only ``obs`` and the
        embedding (``False``; always so for other inputs).
    measurement_name, X_name, obs_value_filter
        For a TileDB-SOMA input; see :class:`~scxtrimo.data.SomaSource`.
    progress_bar
        Show a progress bar over the cells (default ``scxtrimo.settings.progress_bar``).

    Returns
    -------
    The path of the output.

    Raises
    ------
    FileExistsError
        If ``out`` exists and neither ``resume`` nor ``overwrite`` is given.
    ValueError
        On resume with a different model, input or parameters; for more ``devices`` than this
        machine has; for input that fails the checks of :func:`~scxtrimo.tl.embed`.

    Examples
    --------
    >>> import scxtrimo
    >>> scxtrimo.tl.embed_to_store("atlas.h5ad", "atlas_emb.zarr", chunk_size=8192)
    >>> # killed? run the same call again with resume=True
    >>> scxtrimo.tl.embed_to_store("atlas.h5ad", "atlas_emb.zarr", resume=True)
    >>> import anndata as ad
    >>> emb = ad.read_zarr("atlas_emb.zarr").obsm["X_scxtrimo"]
    """
    out = Path(out)
    if out.suffix not in (".zarr", ".h5ad"):
        raise ValueError(f"out must end in .zarr or .h5ad, got {str(out)!r}.")
    if resume and overwrite:
        raise ValueError("Pass resume=True or overwrite=True, not both.")
    if pooling not in ("all", "max", "mean"):
        raise ValueError(f"pooling must be 'all', 'max' or 'mean', not {pooling!r}.")
    if invalid_cells not in ("raise", "skip"):
        raise ValueError(f"invalid_cells must be 'raise' or 'skip', not {invalid_cells!r}.")
    if precision not in ("fp32", "bf16", "int8"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'int8', not {precision!r}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    external = _externally_launched()
    multi = devices != 1 or num_nodes > 1 or external
    if multi:
        devices, accelerator = _check_devices(devices, accelerator, num_nodes)
        strategy = strategy or ("ddp" if external else "ddp_spawn")
    rank = _global_rank_env() if external else 0
    store = EmbeddingStore(
        out if out.suffix == ".zarr" else out.with_name(f".{out.name}.scxtrimo.zarr"), key_added
    )

    for item in source if isinstance(source, list | tuple) else [source]:
        if isinstance(item, str | os.PathLike) and Path(item).resolve() == out.resolve():
            raise ValueError(
                "The output must not be the input; scxtrimo never overwrites its input."
            )
    # 1. Existing outputs: before anything is loaded.
    if rank == 0:
        exists = out.exists() or (out.suffix == ".h5ad" and store.path.exists())
        if exists and not (resume or overwrite):
            what = out if out.exists() else store.path
            raise FileExistsError(
                f"{what} exists. Pass resume=True (--resume) to continue an interrupted run into "
                "it, or overwrite=True (--overwrite) to replace it."
            )

    # 2. Model, input and every check that does not need the whole data.
    net = load_model(model, device=device)
    if not multi:
        check_precision(precision, resolve_device(net.module, device))
    input_kind_h5ad = isinstance(source, str | os.PathLike) and str(source).endswith(".h5ad")
    given = source
    soma_kwargs = {}
    if measurement_name != "RNA" or X_name is not None or obs_value_filter is not None:
        soma_kwargs = {
            "measurement_name": measurement_name,
            "X_name": X_name,
            "obs_value_filter": obs_value_filter,
        }
    source = open_source(given, layer=layer, **soma_kwargs)
    leaves = leaf_sources(source)
    n_obs = int(source.shape[0])
    if n_obs == 0:
        raise ValueError(f"{source.name} has no cells.")
    # The source reads ``layer`` itself; the probe AnnData carries its rows where the model
    # reads them (X, or the model's layer).
    settings = net.input_settings.merge(
        gene_symbols_key=gene_symbols_key,
        gene_ids_key=gene_ids_key,
        input_type=input_type,
        total_counts_key=total_counts_key,
    )
    kwargs = {
        "target_depth": target_depth,
        "max_genes": max_genes,
        "min_overlap": min_overlap,
        "input_settings": settings,
    }
    tc_key = settings.total_counts_key
    model_layer = settings.layer
    preps = []
    for src in leaves:
        try:
            preps.append(_probe(net, src, model_layer, kwargs))
        except (ValueError, KeyError) as err:
            raise type(err)(f"{src.name}: {err}") from err
    for src, prep in zip(leaves, preps, strict=True):
        m = prep.mapping  # logged as tl.embed logs it, without the probe's share of counts
        logger.info(
            "%s: %d of %d genes map to %d of %d vocabulary genes.",
            src.name, m.n_matched_columns, m.n_vars, m.n_vocab_genes, m.n_vocab,
        )  # fmt: skip
    spec = preps[0].spec
    if spec.input_type == "bulk":
        raise ValueError(
            "input_type='bulk' scales every sample to the median library size of the whole "
            "data set, which a chunked run cannot know in advance; use scxtrimo.tl.embed."
        )
    width = net.module.embedding_width(pooling)
    params = {
        "key_added": key_added,
        "pooling": pooling,
        "target_depth": spec.target_depth.official(),
        "max_genes": spec.max_genes,
        "input_type": spec.input_type,
        "layer": layer if layer is not None else model_layer,
        "gene_symbols_key": preps[0].mapping.gene_symbols_key,
        "gene_ids_key": preps[0].mapping.gene_ids_key,
        "total_counts_key": tc_key,
        "invalid_cells": invalid_cells,
        "width": width,
    }
    if precision != "fp32":  # stores of fp32 runs keep the fingerprint they always had
        params["precision"] = precision
    fingerprint = {
        "format": EmbeddingStore.FORMAT,
        "version": EmbeddingStore.VERSION,
        "model": model_fingerprint(net.module, getattr(net, "source_", None)),
        "input": input_fingerprint(source),
        "params": params,
        "chunk_size": int(chunk_size or DEFAULT_CHUNK_SIZE),
    }

    # 3. Create, resume or replace the store (rank 0; other ranks wait for it).
    if rank == 0:
        if overwrite:
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            store.remove()
        if store.path.exists():
            if not store.is_store():
                raise ValueError(
                    f"{store.path} exists but is not an scxtrimo embedding store for "
                    f"obsm[{key_added!r}]; pass overwrite=True to replace it."
                )
            found = store.read_fingerprint()
            if chunk_size is None:
                fingerprint["chunk_size"] = found.get("chunk_size")
            differ = store.fingerprint_differences(
                {k: found.get(k) for k in ("format", "model", "input", "params", "chunk_size")},
                {k: fingerprint[k] for k in ("format", "model", "input", "params", "chunk_size")},
            )
            if differ:
                raise ValueError(
                    f"Cannot resume into {store.path}: it was started with a different "
                    f"{', '.join(sorted({d.split('.')[0] for d in differ}))} "
                    f"(differences in: {', '.join(differ[:8])}). Use the same model, input and "
                    "parameters, or pass overwrite=True to start again."
                )
        elif out.suffix == ".h5ad" and out.exists():
            logger.info("%s is already complete.", out)
            return out
        else:
            store.create(source.obs, width, fingerprint["chunk_size"], fingerprint)
    else:
        deadline = time.time() + 600
        while not store.is_store():
            if time.time() > deadline:
                raise TimeoutError(f"rank {rank}: rank 0 did not create {store.path} in time.")
            time.sleep(0.5)
        fingerprint["chunk_size"] = store.read_fingerprint().get("chunk_size")

    chunk = int(fingerprint["chunk_size"])
    engine = ChunkEngine(
        module=net.module,
        n_genes=net.config.n_genes,
        width=width,
        spec=spec,
        col_to_vocab=[p.mapping.col_to_vocab for p in preps],
        pooling=pooling,
        invalid=invalid_cells,
        total_counts_key=tc_key,
        batch_size=batch_size,
        max_tokens=max_tokens,
        source=source,
        n_obs=n_obs,
        chunk_size=chunk,
        precision=precision,
    )
    n_chunks = -(-n_obs // chunk)
    if store.is_complete():
        pending = []
    else:
        done = store.done_chunks()
        pending = [k for k in range(n_chunks) if k not in done]
        if done:
            logger.info("Resuming: %d of %d chunks are done.", len(done), n_chunks)

    # 4. The work.
    if pending:
        if multi:
            from scxtrimo.inference import predict_chunks  # loads Lightning

            predict_chunks(
                engine, store, pending, devices=devices, accelerator=accelerator,
                strategy=strategy, num_nodes=num_nodes,
            )  # fmt: skip
            if rank != 0:
                return out
            _wait_for_chunks(store, n_chunks)
        else:
            dev = (
                settings.resolve_device(device)
                if device is not None
                else next(net.module.parameters()).device
            )
            _embed_local(engine, store, pending, dev, progress_bar)

    # 5. Finish: the report, then the h5ad if asked for.
    if rank != 0:
        return out
    done = store.done_chunks()
    missing = [k for k in range(n_chunks) if k not in done]
    if missing:  # pragma: no cover - a rank failed without raising
        raise RuntimeError(f"{len(missing)} chunks were not written (e.g. {missing[:5]}); resume.")
    report = {
        "model": net.source_,
        "model_config": getattr(net.config, "name", None) or "custom",
        "pooling": pooling,
        "precision": precision,
        "target_depth": params["target_depth"],
        "max_genes": params["max_genes"],
        "input_type": params["input_type"],
        "layer": params["layer"],
        "n_skipped_cells": int(sum(d.get("n_skipped", 0) for d in done.values())),
        "embedding_width": width,
        "scxtrimo_version": __version__,
        "gene_overlap": preps[0].mapping.summary(),
        "input": source.name,
        "n_sources": len(leaves),
        "chunk_size": chunk,
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
    }
    if len(leaves) > 1:
        report["gene_overlap_per_source"] = [p.mapping.summary() for p in preps]
    if not store.is_complete():
        store.finish(report)
    if out.suffix == ".h5ad":
        copy = input_kind_h5ad and len(leaves) == 1 if copy_input is None else copy_input
        if copy and not (input_kind_h5ad and len(leaves) == 1):
            raise ValueError("copy_input=True needs a single .h5ad input.")
        store.write_h5ad(out, report, Path(given) if copy else None)
        store.remove()
    logger.info("Wrote %s (obsm[%r], %d x %d).", out, key_added, n_obs, width)
    return out


def _embed_local(
    engine: ChunkEngine,
    store: EmbeddingStore,
    pending: list[int],
    device: torch.device,
    progress_bar: bool | None,
) -> None:
    """Embed and commit the ``pending`` chunks in this process; the bar counts cells."""
    from tqdm.auto import tqdm

    show = settings.progress_bar if progress_bar is None else progress_bar
    kill_after = int(os.environ.get(_KILL_ENV, "0") or 0)
    run_id = uuid.uuid4().hex
    n_cells = sum(stop - start for start, stop in map(engine.chunk_rows, pending))
    with tqdm(total=n_cells, desc="Embedding cells", unit="cell", disable=not show) as bar:
        for i, k in enumerate(pending):
            emb, n_skipped = engine.embed_chunk(k, device)
            start, _ = engine.chunk_rows(k)
            store.write_chunk(k, start, emb, {"n_skipped": n_skipped, "run": run_id, "rank": 0})
            bar.update(emb.shape[0])
            if kill_after and i + 1 >= kill_after:  # test hook: a real, unclean kill
                os.kill(os.getpid(), signal.SIGKILL)


def _wait_for_chunks(store: EmbeddingStore, n_chunks: int, timeout: float = 600.0) -> None:
    """Rank 0 of an externally launched run: wait until every rank's chunks are committed."""
    deadline = time.time() + timeout
    while len(store.done_chunks()) < n_chunks:
        if time.time() > deadline:
            raise TimeoutError(
                f"Only {len(store.done_chunks())} of {n_chunks} chunks were written."
            )
        time.sleep(0.5)
