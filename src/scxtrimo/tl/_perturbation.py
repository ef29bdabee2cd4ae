"""``scxtrimo.tl.predict_perturbation``: perturbation response of an unseen group of cells.

Design (see ``docs/perturbation.md`` for the why and the evaluation). Cells are unpaired: a
control cell and a perturbed cell are never the same cell, so a response is only observed at
the level of a group (a cell type, a donor): ``delta[g, c] = mean(perturbed c in g) -
mean(control in g)`` of log-normalised expression. The prediction for a control cell ``i`` of
the held-out group is

    x_i + sum_g w[i, g] * delta[g, c]        (clipped at 0, the smallest log1p value)

where the weights over the seen groups ``g`` mix the mean-shift prior (uniform weights: the
average response of the seen groups) with an attention on how close the cell's representation
(the model's cell embedding) lies to each seen group's control cells:

    w[i, :] = (1 - gate[c]) / n_groups + gate[c] * softmax(-|f_c(z_i) - f_c(m_g)|^2 / tau[c])

``f_c`` is a learned linear map of the representation, modulated by a learned condition
embedding; ``m_g`` is the centroid of group ``g``'s control cells; ``gate`` and ``tau`` are
learned per condition. The head is trained *episodically*: each seen group in turn plays the
unseen group and its mean response is predicted from the other seen groups only, exactly as
the held-out group will be. So the head can only learn what transfers across groups, and a
``gate`` near 0 says that the embedding did not help beyond the mean shift.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from scxtrimo._version import __version__

from ._perturbation_head import _train_head

if TYPE_CHECKING:
    from scxtrimo.model import XTrimoGene

logger = logging.getLogger("scxtrimo")

UNS_KEY = "scxtrimo_perturbation"


def predict_perturbation(
    adata: AnnData,
    model: XTrimoGene | str | os.PathLike | None = None,
    *,
    condition_key: str = "condition",
    control: str = "ctrl",
    groupby: str = "cell_type",
    held_out: str,
    conditions: Sequence[str] | None = None,
    train_groups: Sequence[str] | None = None,
    representation: Literal["embedding", "expression"] = "embedding",
    use_rep: str = "X_scxtrimo",
    layer: str | None = None,
    n_components: int = 20,
    n_steps: int = 300,
    lr: float = 0.02,
    weight_decay: float = 1e-2,
    cells_per_episode: int = 256,
    min_cells: int = 5,
    clip: bool = True,
    target_sum: float = 1e4,
    batch_size: int | None = None,
    invalid_cells: Literal["raise", "skip"] = "skip",
    device: str | None = None,
    random_state: int = 0,
) -> AnnData:
    """Predict how the control cells of an unseen group respond to a perturbation.

    Learns, from the control and perturbed cells of the seen groups, how a group's mean
    response depends on its cells' state, and applies it to the control cells of
    ``held_out``, a group (cell type, donor...) whose perturbed cells are never used. Each
    predicted cell is a control cell plus a cell-specific mixture of the seen groups'
    responses: the mean-shift prior (the average response of the seen groups) corrected
    towards the groups whose control cells the cell resembles in the model's embedding. The
    head is small and trains in seconds on a CPU; the model itself is not trained.

    Parameters
    ----------
    adata
        Raw counts (``.X`` or ``layer``) of control and perturbed cells; not modified.
    model
        An :class:`~scxtrimo.model.XTrimoGene`, a saved-model folder, ``models.ckpt``, or
        ``None`` for the model shipped with scxtrimo. Only the control cells are embedded,
        unless ``adata.obsm[use_rep]`` already holds their embeddings. Not used when
        ``representation="expression"``.
    condition_key
        ``obs`` column of the perturbation (any categorical or string column).
    control
        The value of ``condition_key`` that marks control (unperturbed) cells.
    groupby
        ``obs`` column of the groups, one of which is held out (cell type, donor...).
    held_out
        The group whose control cells are predicted. Its perturbed cells, if any, are left
        out of everything (no leakage): changing them does not change the prediction.
    conditions
        Perturbations to predict (default: every value of ``condition_key`` but
        ``control``). Each gets its own response, gate and temperature; they share the map
        of the representation.
    train_groups
        Seen groups to learn from (default: every group but ``held_out`` with at least
        ``min_cells`` control and ``min_cells`` perturbed cells).
    representation
        ``"embedding"``: the model's cell embedding (``.obsm[use_rep]`` if present, else
        computed here and not stored); ``"expression"``: the principal components of the
        log-normalised expression (no model; a control for what the embedding adds).
    use_rep
        ``.obsm`` key of precomputed cell embeddings (e.g. from :func:`scxtrimo.tl.embed`).
    layer
        Layer with the raw counts; ``None`` uses ``.X``.
    n_components
        The representation is z-scored and reduced to this many principal components (fitted
        on the seen control cells) before the learned map.
    n_steps, lr, weight_decay
        Adam steps, learning rate, and the L2 pull of the learned map towards the identity
        and of the condition embedding towards 0.
    cells_per_episode
        Control cells sampled per group and training step (stochastic episodes).
    min_cells
        Least control and perturbed cells for a seen group to be used.
    clip
        Clip predicted values at 0 (log1p-normalised values cannot be negative).
    target_sum
        Counts per cell of the normalisation, ``log1p(x / total * target_sum)``.
    batch_size, device
        For embedding with the model.
    invalid_cells
        ``representation="embedding"``: control cells with fewer than 2 in-vocabulary counts
        are ``"skip"``-ped (default: left out of the fit, and their predictions are NaN) or
        ``"raise"`` an error naming them before the model runs.
    random_state
        Seed of the head's initialisation-free training (episode sampling); the same seed and
        input give bitwise-identical predictions.

    Returns
    -------
    A new :class:`~anndata.AnnData` of predicted cells, one per control cell of ``held_out``
    and condition (conditions in order, cells in input order), with the genes of ``adata``:

    ``.X``
        ``float32`` predicted log1p-normalised expression (dense).
    ``.obs``
        The source cell's ``obs`` columns, plus ``source_cell`` (its ``obs_names``),
        ``condition_key`` = the predicted condition, ``prediction`` = ``True``.
    ``.uns["scxtrimo_perturbation"]``
        Parameters; the seen groups per condition and their mean weight in the prediction;
        the learned gates and temperatures; the number of held-out perturbed cells left out;
        the model; timings; scxtrimo version.

    Examples
    --------
    >>> kang = anndata.read_h5ad("kang2018_ifnb_pbmc_1556.h5ad")
    >>> pred = scxtrimo.tl.predict_perturbation(
    ...     kang, condition_key="condition", control="ctrl", groupby="cell_type",
    ...     held_out="CD4 T cells",
    ... )
    >>> pred.obs[["source_cell", "cell_type", "condition", "prediction"]].head()
    """
    start = time.perf_counter()
    plan = _plan(
        adata,
        condition_key=condition_key,
        control=control,
        groupby=groupby,
        held_out=held_out,
        conditions=conditions,
        train_groups=train_groups,
        representation=representation,
        min_cells=min_cells,
        n_components=n_components,
    )
    counts = adata.layers[layer] if layer is not None else adata.X
    if counts is None:
        raise ValueError("adata.X is empty; pass layer=<the layer with raw counts>.")
    lognorm = _log_normalize(counts, target_sum)

    # Representation of the control cells (seen groups and held-out group) only: perturbed
    # cells are never embedded, so the held-out group's perturbed cells cannot leak in.
    rep_rows = np.concatenate([plan["seen_control_rows"], plan["held_out_control_rows"]])
    rep, model_source = _representation(
        adata,
        lognorm,
        rep_rows,
        representation=representation,
        model=model,
        use_rep=use_rep,
        layer=layer,
        batch_size=batch_size,
        device=device,
        invalid_cells=invalid_cells,
    )
    rep_seconds = time.perf_counter() - start
    n_seen = plan["seen_control_rows"].size
    reduced = _reduce(rep, n_seen, n_components)
    seen_codes = plan["seen_control_codes"]
    group_names = plan["groups"]
    centroids = np.stack(
        [reduced[:n_seen][seen_codes == k].mean(axis=0) for k in range(len(group_names))]
    )
    query = reduced[n_seen:]

    # Mean responses of the seen groups, per condition (log-normalised expression).
    control_means = {g: _mean_rows(lognorm, plan["control_rows_by_group"][g]) for g in group_names}
    responses = {
        c: np.stack(
            [_mean_rows(lognorm, plan["perturbed_rows"][c][g]) - control_means[g] for g in seen]
        )
        for c, seen in plan["seen_by_condition"].items()
    }
    train_start = time.perf_counter()
    head, history = _train_head(
        reduced[:n_seen],
        seen_codes,
        centroids,
        group_names,
        plan["seen_by_condition"],
        responses,
        n_steps=n_steps,
        lr=lr,
        weight_decay=weight_decay,
        cells_per_episode=cells_per_episode,
        random_state=random_state,
    )
    train_seconds = time.perf_counter() - train_start

    held_lognorm = _dense_rows(lognorm, plan["held_out_control_rows"])
    blocks, group_weights = [], {}
    for c_index, (c, seen) in enumerate(plan["seen_by_condition"].items()):
        columns = [group_names.index(g) for g in seen]
        weights = head.weights(query, centroids[columns], c_index)
        # Cells without a representation (NaN, e.g. skipped by the model) get the prior.
        missing = ~np.isfinite(query).all(axis=1)
        weights[missing] = 1.0 / len(seen)
        predicted = held_lognorm + weights @ responses[c]
        blocks.append(np.maximum(predicted, 0.0) if clip else predicted)
        group_weights[c] = {g: float(w) for g, w in zip(seen, weights.mean(axis=0))}

    result = _assemble(
        adata, plan, np.concatenate(blocks).astype(np.float32), condition_key=condition_key
    )
    result.uns[UNS_KEY] = {
        "method": "episodic mean-shift mixture head",
        "condition_key": condition_key,
        "control": str(control),
        "groupby": groupby,
        "held_out": str(held_out),
        "conditions": list(plan["seen_by_condition"]),
        "seen_groups": {c: list(s) for c, s in plan["seen_by_condition"].items()},
        "mean_group_weights": group_weights,
        "gate": dict(zip(plan["seen_by_condition"], head.gates().tolist())),
        "temperature": dict(zip(plan["seen_by_condition"], head.temperatures().tolist())),
        "final_episode_loss": history[-1],
        "n_held_out_control_cells": int(plan["held_out_control_rows"].size),
        "n_held_out_perturbed_cells_excluded": int(plan["n_held_out_perturbed"]),
        "n_missing_representation": int((~np.isfinite(query).all(axis=1)).sum()),
        "representation": representation,
        "use_rep": use_rep if representation == "embedding" else None,
        "model": model_source,
        "n_components": int(reduced.shape[1]),
        "n_steps": int(n_steps),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "cells_per_episode": int(cells_per_episode),
        "clip": bool(clip),
        "target_sum": float(target_sum),
        "layer": layer,
        "random_state": int(random_state),
        "representation_seconds": rep_seconds,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "scxtrimo_version": __version__,
    }
    return result


# ------------------------------------------------------------------------------------------
# input checks and the training plan (all before any work)
# ------------------------------------------------------------------------------------------


def _column(adata: AnnData, key: str, what: str) -> pd.Series:
    if key not in adata.obs.columns:
        raise KeyError(
            f"{what}={key!r} is not a column of adata.obs; columns: "
            f"{list(adata.obs.columns) or 'none'}. Pass {what}=<the obs column>."
        )
    return adata.obs[key].astype(object).where(adata.obs[key].notna(), None)


def _plan(
    adata: AnnData,
    *,
    condition_key: str,
    control,
    groupby: str,
    held_out,
    conditions,
    train_groups,
    representation: str,
    min_cells: int,
    n_components: int,
) -> dict:
    """Which rows are controls / perturbed cells of which group; every check of the input."""
    if not isinstance(adata, AnnData):
        raise TypeError(f"Expected an AnnData, got {type(adata).__name__}.")
    if representation not in ("embedding", "expression"):
        raise ValueError(
            f"representation must be 'embedding' or 'expression', not {representation!r}."
        )
    if min_cells < 1 or n_components < 1:
        raise ValueError("min_cells and n_components must be >= 1.")
    condition = _column(adata, condition_key, "condition_key")
    group = _column(adata, groupby, "groupby")
    as_str = {str(v): v for v in pd.unique(condition.dropna())}
    if str(control) not in as_str:
        raise ValueError(
            f"control={control!r} is not a value of obs[{condition_key!r}]; its values: "
            f"{sorted(as_str)}. Pass control=<the value that marks unperturbed cells>."
        )
    condition = condition.map(lambda v: None if v is None else str(v))
    group = group.map(lambda v: None if v is None else str(v))
    control, held_out = str(control), str(held_out)
    others = [v for v in sorted(as_str) if v != control]
    if not others:
        raise ValueError(
            f"obs[{condition_key!r}] has only one condition ({control!r}): there is no "
            "perturbation to learn. Include perturbed cells, with another value of "
            f"obs[{condition_key!r}]."
        )
    if conditions is None:
        conditions = others
    else:
        conditions = [conditions] if isinstance(conditions, str) else [str(c) for c in conditions]
        bad = [c for c in conditions if c not in others]
        if bad:
            raise ValueError(
                f"conditions {bad} are not perturbed values of obs[{condition_key!r}] (the "
                f"control {control!r} cannot be predicted); perturbed values: {others}."
            )
        if not conditions:
            raise ValueError("conditions is empty; pass at least one perturbed condition.")
        conditions = list(dict.fromkeys(conditions))
    is_control = (condition == control).to_numpy()
    group_values = group.to_numpy()
    control_groups = sorted({g for g in group_values[is_control] if g is not None})
    if held_out not in control_groups:
        raise ValueError(
            f"held_out={held_out!r} has no control cells (obs[{condition_key!r}] == "
            f"{control!r}) in obs[{groupby!r}], so there is nothing to predict from. Groups "
            f"with control cells: {control_groups}."
        )

    def rows(mask) -> np.ndarray:
        return np.flatnonzero(mask)

    def count_ok(g: str, c: str) -> bool:
        return int(((group_values == g) & (condition == c).to_numpy()).sum()) >= min_cells

    candidates = [g for g in control_groups if g != held_out]
    if train_groups is not None:
        train_groups = (
            [train_groups] if isinstance(train_groups, str) else [str(g) for g in train_groups]
        )
        if held_out in train_groups:
            raise ValueError(
                f"held_out={held_out!r} is also in train_groups: its perturbed cells would "
                "be used for training and leak into the prediction. Remove it from "
                "train_groups."
            )
        unknown = [g for g in train_groups if g not in candidates]
        if unknown:
            raise ValueError(
                f"train_groups {unknown} have no control cells in obs[{groupby!r}]; groups "
                f"with control cells: {control_groups}."
            )
        candidates = list(dict.fromkeys(train_groups))
    seen_by_condition, perturbed_rows = {}, {}
    for c in conditions:
        seen = [g for g in candidates if count_ok(g, control) and count_ok(g, c)]
        if len(seen) < 2:
            raise ValueError(
                f"Condition {c!r} has {len(seen)} seen group(s) with at least {min_cells} "
                f"control and {min_cells} perturbed cells ({seen}); at least 2 are needed to "
                "learn how a response transfers to an unseen group. Add groups, lower "
                "min_cells, or drop this condition from conditions."
            )
        seen_by_condition[c] = seen
        is_c = (condition == c).to_numpy()
        perturbed_rows[c] = {g: rows(is_c & (group_values == g)) for g in seen}
    groups = sorted({g for seen in seen_by_condition.values() for g in seen})
    control_rows_by_group = {g: rows(is_control & (group_values == g)) for g in groups}
    seen_control_rows = np.concatenate([control_rows_by_group[g] for g in groups])
    seen_control_codes = np.concatenate(
        [np.full(control_rows_by_group[g].size, k) for k, g in enumerate(groups)]
    )
    n_held_out_perturbed = int(((group_values == held_out) & ~is_control).sum())
    if n_held_out_perturbed:
        logger.info(
            "predict_perturbation: %d perturbed cells of held_out=%r are left out of training.",
            n_held_out_perturbed,
            held_out,
        )
    return {
        "groups": groups,
        "seen_by_condition": seen_by_condition,
        "perturbed_rows": perturbed_rows,
        "control_rows_by_group": control_rows_by_group,
        "seen_control_rows": seen_control_rows,
        "seen_control_codes": seen_control_codes,
        "held_out_control_rows": rows(is_control & (group_values == held_out)),
        "n_held_out_perturbed": n_held_out_perturbed,
    }


# ------------------------------------------------------------------------------------------
# expression and representation
# ------------------------------------------------------------------------------------------


def _log_normalize(counts, target_sum: float) -> sp.csr_matrix:
    """``log1p(x / total * target_sum)`` as a float64 CSR matrix (the input is not changed)."""
    x = sp.csr_matrix(counts, dtype=np.float64, copy=True)
    if x.nnz and x.data.min() < 0:
        raise ValueError(
            "The counts have negative values; predict_perturbation needs raw counts (pass "
            "layer=<the layer with counts>)."
        )
    totals = np.asarray(x.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    x = sp.diags(scale) @ x
    x.data = np.log1p(x.data)
    return sp.csr_matrix(x)


def _mean_rows(x: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    return np.asarray(x[rows].mean(axis=0)).ravel()


def _dense_rows(x: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    return x[rows].toarray()


def _representation(
    adata: AnnData,
    lognorm: sp.csr_matrix,
    rows: np.ndarray,
    *,
    representation: str,
    model,
    use_rep: str,
    layer: str | None,
    batch_size: int | None,
    device: str | None,
    invalid_cells: str = "skip",
) -> tuple[np.ndarray, str | None]:
    if representation == "expression":
        return _dense_rows(lognorm, rows), None
    if use_rep in adata.obsm:
        rep = np.asarray(adata.obsm[use_rep], dtype=np.float64)[rows]
        return rep, f"precomputed .obsm[{use_rep!r}]"
    from ._common import load_model

    net = load_model(model, device=device)
    rep = net.get_latent_representation(
        adata,
        indices=rows,
        batch_size=batch_size,
        invalid_cells=invalid_cells,
        device=device,
        layer=layer,
    )
    return np.asarray(rep, dtype=np.float64), net.source_


def _reduce(rep: np.ndarray, n_fit: int, n_components: int) -> np.ndarray:
    """z-score and PCA fitted on the first ``n_fit`` rows (seen controls), applied to all.

    Rows with NaN (cells the model skipped) stay NaN.
    """
    finite = np.isfinite(rep).all(axis=1)
    fit = rep[:n_fit][finite[:n_fit]]
    mean = fit.mean(axis=0)
    sd = fit.std(axis=0)
    keep = sd > 1e-8 * max(1.0, float(np.abs(fit).max(initial=0.0)))
    scaled_fit = (fit[:, keep] - mean[keep]) / sd[keep]
    # SVD of the seen controls: deterministic (no randomised solver), signs fixed below.
    _, _, vt = np.linalg.svd(scaled_fit, full_matrices=False)
    k = min(n_components, vt.shape[0])
    basis = vt[:k]
    basis *= np.sign(basis[np.arange(k), np.abs(basis).argmax(axis=1)])[:, None]
    out = np.full((rep.shape[0], k), np.nan)
    out[finite] = ((rep[finite][:, keep] - mean[keep]) / sd[keep]) @ basis.T
    # One scale for all components, so the initial distances are O(1) per dimension.
    return out / np.nanstd(out[:n_fit])


def _assemble(adata: AnnData, plan: dict, x: np.ndarray, *, condition_key: str) -> AnnData:
    rows = plan["held_out_control_rows"]
    source = adata.obs.iloc[rows]
    frames = []
    for c in plan["seen_by_condition"]:
        obs = source.drop(columns=["source_cell", "prediction"], errors="ignore")
        obs.insert(0, "source_cell", source.index.astype(str))
        obs[condition_key] = c
        obs["prediction"] = True
        obs.index = [f"{name}-predicted-{c}" for name in source.index.astype(str)]
        frames.append(obs)
    obs = pd.concat(frames)
    obs[condition_key] = pd.Categorical(
        obs[condition_key], categories=list(plan["seen_by_condition"])
    )
    return AnnData(X=x, obs=obs, var=adata.var.copy())
