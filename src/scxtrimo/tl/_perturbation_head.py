"""The head of ``predict_perturbation``: mixture weights over the seen groups, trained episodically.

See ``tl/_perturbation`` (its module docstring) for the model: the head maps a cell's
representation and the seen groups' control centroids through a learned linear map, mixes the
mean-shift prior with an attention on their distances (gate and temperature per condition),
and is trained with each seen group playing the unseen one in turn.
"""

from __future__ import annotations

import numpy as np


class _MixtureHead:
    """Learned map, condition embedding, gate and temperature (see the module docstring)."""

    def __init__(self, n_dims: int, n_conditions: int, init_log_tau: float):
        import torch

        self.torch = torch
        self.linear = torch.eye(n_dims, dtype=torch.float64).requires_grad_(True)
        self.condition_embedding = torch.zeros(
            n_conditions, n_dims, dtype=torch.float64, requires_grad=True
        )
        self.gate_logit = torch.zeros(n_conditions, dtype=torch.float64, requires_grad=True)
        self.log_tau = torch.full(
            (n_conditions,), init_log_tau, dtype=torch.float64, requires_grad=True
        )

    def parameters(self) -> list:
        return [self.linear, self.condition_embedding, self.gate_logit, self.log_tau]

    def _weights(self, cells, centroids, c: int):
        scale = 1.0 + self.condition_embedding[c]
        q = (cells @ self.linear) * scale
        k = (centroids @ self.linear) * scale
        distance = ((q[:, None, :] - k[None, :, :]) ** 2).sum(-1)
        attention = self.torch.softmax(-distance / self.log_tau[c].exp(), dim=1)
        gate = self.torch.sigmoid(self.gate_logit[c])
        return (1.0 - gate) / centroids.shape[0] + gate * attention

    def weights(self, cells: np.ndarray, centroids: np.ndarray, c: int) -> np.ndarray:
        torch = self.torch
        finite = np.isfinite(cells).all(axis=1)
        out = np.full((cells.shape[0], centroids.shape[0]), np.nan)
        with torch.no_grad():
            if finite.any():
                out[finite] = self._weights(
                    torch.from_numpy(cells[finite]), torch.from_numpy(centroids), c
                ).numpy()
        return out

    def gates(self) -> np.ndarray:
        return self.torch.sigmoid(self.gate_logit).detach().numpy()

    def temperatures(self) -> np.ndarray:
        return self.log_tau.exp().detach().numpy()


def _train_head(
    cells: np.ndarray,
    codes: np.ndarray,
    centroids: np.ndarray,
    group_names: list[str],
    seen_by_condition: dict[str, list[str]],
    responses: dict[str, np.ndarray],
    *,
    n_steps: int,
    lr: float,
    weight_decay: float,
    cells_per_episode: int,
    random_state: int,
) -> tuple[_MixtureHead, list[float]]:
    """Episodic training: each seen group is predicted from the other seen groups only."""
    import torch

    rng = np.random.default_rng(random_state)
    finite = np.isfinite(cells).all(axis=1)
    by_group = [np.flatnonzero((codes == k) & finite) for k in range(len(group_names))]
    # Start the temperature at the typical squared distance of a cell to a centroid.
    distances = ((cells[finite][:, None, :] - centroids[None]) ** 2).sum(-1)
    head = _MixtureHead(cells.shape[1], len(seen_by_condition), float(np.log(np.median(distances))))
    identity = torch.eye(cells.shape[1], dtype=torch.float64)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    cells_t, centroids_t = torch.from_numpy(cells), torch.from_numpy(centroids)
    responses_t = {c: torch.from_numpy(r) for c, r in responses.items()}
    # Response scale per condition, so that conditions with strong responses do not dominate.
    scales = {c: float((r**2).mean()) or 1.0 for c, r in responses.items()}
    episodes = [
        (c_index, c, j)
        for c_index, (c, seen) in enumerate(seen_by_condition.items())
        for j in range(len(seen))
    ]
    history = []
    for _ in range(n_steps):
        optimizer.zero_grad()
        loss = torch.zeros((), dtype=torch.float64)
        for c_index, c, j in episodes:
            seen = seen_by_condition[c]
            columns = [group_names.index(g) for g in seen]
            target_rows = by_group[columns[j]]
            if target_rows.size == 0:
                continue
            if target_rows.size > cells_per_episode:
                target_rows = rng.choice(target_rows, cells_per_episode, replace=False)
            others = [k for k in range(len(seen)) if k != j]
            weights = head._weights(
                cells_t[torch.from_numpy(np.sort(target_rows))],
                centroids_t[[columns[k] for k in others]],
                c_index,
            )
            predicted = weights.mean(dim=0) @ responses_t[c][others]
            loss = loss + ((predicted - responses_t[c][j]) ** 2).mean() / scales[c]
        loss = loss / len(episodes)
        penalty = weight_decay * (
            ((head.linear - identity) ** 2).sum() + (head.condition_embedding**2).sum()
        )
        (loss + penalty).backward()
        optimizer.step()
        history.append(float(loss.detach()))
    return head, history
