"""Adaptation: a cell head (and optionally the top encoder layers) trained on a user's cells.

The recipe, and why it is cheap enough to run before every analysis (docs/adaptation.md):

- a :class:`~scxtrimo.module.CellHead` (standardisation + two-layer MLP) is put on the pooled
  encoder output; it becomes the model's cell embedding;
- the encoder layers below the adapted ones (all of them by default, ``n_layers=0``) are
  frozen; their outputs for every cell are computed once (one inference pass) and cached, so a
  step costs only the head (and the adapted layers);
- a view of a cell is its standardised pooled vector with Gaussian noise (``noise``) and, when
  encoder layers are adapted, a random subset of its cached gene tokens (``token_keep``; the
  read-depth tokens T and S always kept);
- the objective is InfoNCE over the batch between an anchor cell's view and a view of its
  *positive*: the cell itself, one of its nearest neighbours in a PCA of the user's cells, or,
  with batches, one of its mutual nearest neighbours in another batch
  (:mod:`scxtrimo.train._positives`), so that one cell state from different donors or
  protocols is pulled together.

A plain PyTorch loop (no Lightning): one process, a cached tensor in memory, minutes of work.
It checkpoints atomically every ``checkpoint_every`` steps and resumes from the checkpoint of
an identical call.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from scxtrimo._settings import settings
from scxtrimo.data._loading import iter_inference_batches
from scxtrimo.data._tokens import TokenIndex
from scxtrimo.inference import PreparedInput, atomic_write, model_fingerprint, resolve_device
from scxtrimo.module import XTrimoGeneModule

from ._contrastive import info_nce
from ._plan import warmup_cosine
from ._positives import PositivePairs

logger = logging.getLogger("scxtrimo")

CHECKPOINT_NAME = "adapt_checkpoint.pt"


@dataclass(frozen=True)
class AdaptationSpec:
    """Settings of :func:`adapt_module` (see :func:`scxtrimo.tl.adapt` for their meaning).

    Attributes
    ----------
    n_layers
        Top encoder layers trained with the cell head (with the final LayerNorm); 0: the head
        alone, on the frozen encoder.
    lora_rank
        ``None``: the top ``n_layers`` train all their weights. A rank: they are adapted by
        peft LoRA adapters of that rank (``alpha = 2 x rank``, on the attention and
        feed-forward projections) while their weights stay frozen; the adapters are merged
        into the weights at the end. Needs ``n_layers >= 1`` and ``peft``.
    head_dim
        Output width of the cell head.
    head_hidden
        Hidden width of the cell head.
    noise
        Standard deviation of the Gaussian noise added to a view's standardised pooled vector.
    batch_size
        Anchor cells per step (each with one positive: ``2 * batch_size`` views).
    lr
        Peak learning rate (AdamW).
    weight_decay
        AdamW weight decay.
    warmup_steps
        Steps of linear warm-up.
    min_lr_ratio
        Learning rate at the end of the cosine decay, relative to ``lr``.
    temperature
        Softmax temperature of InfoNCE.
    token_keep
        Share of a cell's gene tokens kept in each view.
    cross_batch_share
        Probability that an anchor with cross-batch partners gets one as its positive.
    max_steps
        Step budget.
    max_time
        Wall-time budget in seconds (``None``: none); the schedule ends at whichever budget
        binds first (a time budget makes the result depend on the machine's speed).
    gradient_clip
        Maximum gradient norm.
    seed
        Seed of anchors, positives, views and dropout.
    """

    n_layers: int = 0
    lora_rank: int | None = None
    head_dim: int = 64
    head_hidden: int = 512
    noise: float = 0.1
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    temperature: float = 0.2
    token_keep: float = 0.5
    cross_batch_share: float = 0.5
    max_steps: int = 1000
    max_time: float | None = None
    gradient_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "n_layers": self.n_layers >= 0,
            "lora_rank": self.lora_rank is None or (self.lora_rank >= 1 and self.n_layers >= 1),
            "head_dim": self.head_dim >= 1,
            "head_hidden": self.head_hidden >= 1,
            "noise": self.noise >= 0,
            "batch_size": self.batch_size >= 2,
            "lr": self.lr > 0,
            "temperature": self.temperature > 0,
            "token_keep": 0.0 < self.token_keep <= 1.0,
            "cross_batch_share": 0.0 <= self.cross_batch_share <= 1.0,
            "max_steps": self.max_steps >= 1,
            "max_time": self.max_time is None or self.max_time > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = {name: getattr(self, name) for name in bad}
            raise ValueError(
                f"Invalid adaptation settings {values}: n_layers >= 0, lora_rank >= 1 with "
                "n_layers >= 1 (LoRA adapts encoder layers), head_dim >= 1, head_hidden "
                ">= 1, noise >= 0, batch_size >= 2, lr > 0, "
                "temperature > 0, 0 < token_keep <= 1, 0 <= cross_batch_share <= 1, "
                "max_steps >= 1 and max_time > 0 (or None)."
            )

    def to_dict(self) -> dict:
        """The settings by name."""
        return asdict(self)


@dataclass
class AdaptationResult:
    """What :func:`adapt_module` did.

    Attributes
    ----------
    steps
        Optimisation steps taken in all (across resumes).
    loss
        InfoNCE loss of every step.
    cache_seconds
        Wall time of the frozen pass (this call).
    train_seconds
        Wall time of the steps (this call).
    n_cells
        Cells trained on.
    n_with_partners
        Cells with a cross-batch partner.
    resumed_from
        Step the run resumed from (0: a fresh start).
    """

    steps: int
    loss: list[float] = field(default_factory=list)
    cache_seconds: float = 0.0
    train_seconds: float = 0.0
    n_cells: int = 0
    n_with_partners: int = 0
    resumed_from: int = 0

    def to_dict(self) -> dict:
        """A JSON-able summary (the loss curve thinned to at most 200 points)."""
        every = max(1, len(self.loss) // 200)
        out = asdict(self)
        out["loss"] = [round(v, 5) for v in self.loss[::every]]
        out["loss_every"] = every
        return out


@dataclass
class TokenCache:
    """What the frozen part of the encoder gives for every cell, computed once.

    Attributes
    ----------
    hidden
        ``n_layers=0``: the pooled vectors ``[cells, 4 d]`` (float32). Otherwise the outputs of
        the frozen layers ``[cells, L, d]``, padded to one length (bfloat16 on the CPU: half
        the memory; the adapted layers compute in float32).
    padding_mask
        ``[cells, L]``, ``True`` = padding; ``None`` for pooled vectors.
    """

    hidden: torch.Tensor
    padding_mask: torch.Tensor | None = None

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return self.hidden.shape[0]

    @property
    def pooled(self) -> bool:
        """Whether the cache holds pooled vectors (the whole encoder frozen)."""
        return self.padding_mask is None


def cache_bytes_per_cell(
    module: XTrimoGeneModule, max_genes: int | None, n_tokens: np.ndarray, n_layers: int
) -> int:
    """Bytes one cell takes in a :class:`TokenCache` for ``n_layers`` adapted layers."""
    if n_layers == 0:
        return 4 * module.config.encoder_dim * 4
    length = int(n_tokens.max() if max_genes is None else min(n_tokens.max(), max_genes)) + 2
    return length * module.config.encoder_dim * 2 + length


@torch.inference_mode()
def cache_frozen_layers(
    module: XTrimoGeneModule,
    prep: PreparedInput,
    cells: np.ndarray,
    n_frozen: int,
    *,
    device: torch.device,
    progress_bar: bool,
    max_tokens: int = 16_384,
) -> TokenCache:
    """Run the token embedding and the first ``n_frozen`` encoder layers over ``cells`` once.

    With ``n_frozen`` = the encoder's depth the cache holds the pooled vectors (``"all"``
    pooling, without any cell head). Row ``i`` of the cache is ``cells[i]`` (sorted, unique
    rows of ``prep``'s AnnData).
    """
    depth = len(module.encoder.layers)
    pooled = n_frozen >= depth
    if pooled:
        hidden = torch.zeros((len(cells), 4 * module.config.encoder_dim), dtype=torch.float32)
        padding = None
    else:
        lengths = prep.stats.n_tokens[cells]
        cap = prep.spec.max_genes
        width = int((lengths.max() if cap is None else min(lengths.max(), cap)) + 2)
        hidden = torch.zeros((len(cells), width, module.config.encoder_dim), dtype=torch.bfloat16)
        padding = torch.ones((len(cells), width), dtype=torch.bool)
    module.eval()
    batches = iter_inference_batches(
        prep.matrix,
        prep.mapping.col_to_vocab,
        prep.stats.n_tokens,
        prep.spec,
        TokenIndex(module.config.n_genes),
        cells=cells,
        total_counts=prep.total_counts,
        max_tokens=max_tokens,
    )
    with tqdm(total=len(cells), desc="Frozen layers", unit="cell", disable=not progress_bar) as bar:
        for batch in batches:
            tokens = {k: torch.from_numpy(v).to(device) for k, v in batch.tokens.items()}
            mask = tokens["padding_mask"]
            x = module.token_embeddings(tokens["gene_index"], tokens["value"], mask)
            x = module.encoder.run_layers(x, mask, stop=None if pooled else n_frozen)
            rows = torch.from_numpy(np.searchsorted(cells, batch.cells))
            if pooled:
                hidden[rows] = module.pool(x, mask, "all").float().cpu()
            else:
                length = x.shape[1]
                hidden[rows, :length] = x.to("cpu", torch.bfloat16)
                padding[rows, :length] = mask.to("cpu")
            bar.update(len(batch.cells))
    return TokenCache(hidden, padding)


def _fingerprint(
    spec: AdaptationSpec, cache: TokenCache, module_sha: str, cells: np.ndarray
) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(asdict(spec), sort_keys=True, default=str).encode())
    h.update(module_sha.encode())
    h.update(np.ascontiguousarray(cells, dtype=np.int64).tobytes())
    h.update(str(tuple(cache.hidden.shape)).encode())
    return h.hexdigest()


def adapt_module(
    module: XTrimoGeneModule,
    cache: TokenCache,
    pairs: PositivePairs,
    spec: AdaptationSpec,
    *,
    device: str | torch.device | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    progress_bar: bool | None = None,
    cells: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> AdaptationResult:
    """Give ``module`` a new cell head and train it (and the top ``spec.n_layers`` layers) in place.

    Parameters
    ----------
    module
        The network; it gets a new :class:`~scxtrimo.module.CellHead` (``spec.head_dim`` wide,
        replacing any), and its top ``spec.n_layers`` layers (and the encoder's final
        LayerNorm) change; nothing else does.
    cache
        The frozen part's outputs for the cells, from :func:`cache_frozen_layers` with
        ``n_frozen = depth - spec.n_layers``.
    pairs
        Positives of the same cells (same row order), from
        :func:`~scxtrimo.train._positives.positive_pairs`.
    spec
        The settings.
    device
        Where to compute (default: where the module is).
    checkpoint_dir
        Folder for ``adapt_checkpoint.pt`` (written atomically every ``checkpoint_every``
        steps and at the end); a checkpoint there from an identical call (same settings,
        model, cells) is resumed from. ``None``: no checkpoints.
    checkpoint_every
        Steps between checkpoints.
    progress_bar
        Show a progress bar (default: ``scxtrimo.settings.progress_bar``).
    cells
        Row numbers the cache holds (recorded in the checkpoint's fingerprint).
    groups
        ``[cells]`` group labels (e.g. studies with different gene panels): each step draws
        its anchors from one group (picked with probability proportional to its size), so
        that cells of different groups are never each other's negatives. ``None``: one group.

    Returns
    -------
    The run's record; see :class:`AdaptationResult`.
    """
    depth = len(module.encoder.layers)
    if spec.n_layers > depth:
        raise ValueError(f"n_layers={spec.n_layers} but the encoder has only {depth} layers.")
    if pairs.n_cells != cache.n_cells:
        raise ValueError(f"{pairs.n_cells} cells have positives but {cache.n_cells} are cached.")
    if cache.n_cells < spec.batch_size:
        spec = type(spec)(**{**asdict(spec), "batch_size": cache.n_cells})
    if cache.pooled != (spec.n_layers == 0):
        raise ValueError("The cache does not match n_layers (pooled vectors are for n_layers=0).")
    dev = resolve_device(module, device)
    show = settings.progress_bar if progress_bar is None else progress_bar
    module.to(dev)
    fingerprint = _fingerprint(
        spec,
        cache,
        model_fingerprint(module)["weights_sha256"],
        np.arange(cache.n_cells) if cells is None else cells,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        head = module.add_cell_head(spec.head_dim, spec.head_hidden)
    top = depth - spec.n_layers
    before = {p: p.requires_grad for p in module.parameters()}
    if spec.lora_rank is not None:
        from ._lora import LoraSpec, inject_lora

        lora = LoraSpec(rank=spec.lora_rank, alpha=2.0 * spec.lora_rank)
        with torch.random.fork_rng(devices=[]):  # peft draws lora_A's start
            torch.manual_seed(spec.seed)
            adapters = set(inject_lora(module, lora, layers=range(top, depth)))
        module.to(dev)
    layers = [*module.encoder.layers[top:], module.encoder.final_norm] if spec.n_layers else []
    trained = torch.nn.ModuleList([head, *layers])
    for p in module.parameters():
        p.requires_grad_(False)
    if spec.lora_rank is None:
        params = list(trained.parameters())
    else:  # the head and the adapters; the adapted layers' own weights stay frozen
        named = dict(module.named_parameters())
        params = [*head.parameters(), *(named[n] for n in sorted(adapters))]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    rng = np.random.default_rng(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    if groups is None:
        members = [np.arange(cache.n_cells)]
    else:
        if len(groups) != cache.n_cells:
            raise ValueError(f"{len(groups)} group labels for {cache.n_cells} cells.")
        members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    weights = np.array([len(m) for m in members], dtype=np.float64)
    weights /= weights.sum()
    result = AdaptationResult(steps=0, n_cells=cache.n_cells, n_with_partners=pairs.n_with_partners)
    path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
    if path is not None and path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{path} is the checkpoint of a different adaptation (other settings, model or "
                "cells). Pass another checkpoint_dir, or delete the file to start afresh."
            )
        trained.load_state_dict(state["trained"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = json.loads(state["numpy_rng"])
        generator.set_state(state["torch_rng"])
        result.steps = result.resumed_from = int(state["step"])
        result.loss = [float(v) for v in state["loss"].tolist()]
        logger.info("Resuming adaptation from step %d (%s).", result.steps, path)

    def save() -> None:
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "fingerprint": fingerprint,
            "trained": trained.state_dict(),
            "optimizer": optimizer.state_dict(),
            "numpy_rng": json.dumps(rng.bit_generator.state),
            "torch_rng": generator.get_state(),
            "step": result.steps,
            "loss": torch.tensor(result.loss, dtype=torch.float64),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(path, lambda f: f.write(buffer.getvalue()))

    def pooled_batch(rows: np.ndarray) -> torch.Tensor:
        index = torch.from_numpy(rows)
        if cache.pooled:
            return cache.hidden[index].to(dev)
        padding = cache.padding_mask[index].clone()
        drop = torch.rand(padding.shape, generator=generator) >= spec.token_keep
        drop[:, :2] = False  # T and S stay
        padding |= drop
        padding = padding.to(dev)
        h = module.encoder.run_layers(
            cache.hidden[index].to(dev, torch.float32), padding, start=top
        )
        return module.pool(h, padding, "all")

    def embed(rows: np.ndarray) -> torch.Tensor:
        x = head.standardise(pooled_batch(rows))
        if spec.noise:
            x = x + spec.noise * torch.randn(x.shape, generator=generator).to(dev)
        return head(x, standardised=True)

    if result.steps == 0:  # the head's standardisation: the frozen model's pooled vectors
        with torch.no_grad():
            if cache.pooled:
                head.standardise_on(cache.hidden)
            else:
                chunks = [
                    module.pool(
                        module.encoder.run_layers(
                            cache.hidden[i : i + 256].to(dev, torch.float32),
                            cache.padding_mask[i : i + 256].to(dev),
                            start=top,
                        ),
                        cache.padding_mask[i : i + 256].to(dev),
                        "all",
                    )
                    for i in range(0, cache.n_cells, 256)
                ]
                head.standardise_on(torch.cat(chunks))

    module.eval()
    trained.train()
    start = time.perf_counter()
    try:
        with tqdm(
            total=spec.max_steps,
            initial=result.steps,
            desc="Adapting",
            unit="step",
            disable=not show,
        ) as bar:
            while result.steps < spec.max_steps:
                elapsed = time.perf_counter() - start
                if spec.max_time is not None and elapsed >= spec.max_time:
                    break
                progress = result.steps / spec.max_steps
                if spec.max_time is not None:
                    progress = max(progress, elapsed / spec.max_time)
                factor = warmup_cosine(
                    min(result.steps, int(progress * spec.max_steps)),
                    spec.warmup_steps,
                    spec.max_steps,
                    spec.min_lr_ratio,
                )
                for group in optimizer.param_groups:
                    group["lr"] = spec.lr * factor
                group = (
                    members[rng.choice(len(members), p=weights)] if len(members) > 1 else members[0]
                )
                anchors = rng.choice(group, min(spec.batch_size, len(group)), replace=False)
                positives = pairs.draw(anchors, spec.cross_batch_share, rng)
                loss = info_nce(embed(anchors), embed(positives), spec.temperature)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"The adaptation loss became {loss.item()} at step {result.steps}; lower "
                        "lr (the weights are those of the last checkpoint)."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, spec.gradient_clip)
                optimizer.step()
                result.steps += 1
                result.loss.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss[-1]:.3f}", refresh=False)
                if checkpoint_every and result.steps % checkpoint_every == 0:
                    save()
        save()
    finally:
        if spec.lora_rank is not None:
            from ._lora import merge_lora

            merge_lora(module)  # embeds at the base's cost; an interrupted run keeps its progress
        for p, flag in before.items():
            p.requires_grad_(flag)
        module.eval()
    result.train_seconds = time.perf_counter() - start
    return result
