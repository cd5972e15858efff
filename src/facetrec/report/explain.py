"""Why a user has the interests it has: routing explanations shared by the report and serving.

One code path turns MIND's routing output (`MIND.route(...) -> Routing`) into explanations:
the report draws `coupling_matrix` as a heatmap, and the serving pipeline answers "why this
item" with `explain_interests` (the behaviours routed most strongly to the interest that
retrieved it). No plotting library is imported here, so serving can use it.

Shape legend: L history length, K interests, K' = K'_u valid interests of the user.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from facetrec.models.mind import Routing


class InterestExplanation(NamedTuple):
    """One valid interest of one user."""

    index: int  # interest slot j (< K'_u)
    strength: float  # capsule length |u_j| in [0, 1): how present the interest is
    positions: list[int]  # history positions routed most strongly to j, strongest first
    weights: list[float]  # their coupling coefficients w_ij


def coupling_matrix(routing: Routing, row: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The coupling coefficients of one user: what the report's heatmap shows.

    Args:
        routing: output of `MIND.route` for a batch.
        row: which user of the batch.

    Returns:
        weights (L', K') float: w_ij for the user's real behaviours (rows) and valid interests (columns);
        positions (L',) int: the history positions of those rows;
        interests (K',) int: the interest slots of those columns.

    Example:
        >>> import torch
        >>> r = Routing(torch.zeros(1, 2, 3), torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.0, 0.0]]]),
        ...             torch.tensor([[0.5, 0.4]]), torch.tensor([[True, True]]))
        >>> w, pos, ks = coupling_matrix(r)
        >>> w.shape, pos.tolist(), ks.tolist()
        ((2, 2), [0, 1], [0, 1])
    """
    w = routing.weights[row].detach().float().cpu().numpy()  # (L, K)
    valid = routing.valid[row].cpu().numpy()  # (K,)
    interests = np.flatnonzero(valid)
    # a real behaviour always sends some weight to a valid interest; padding rows are all 0
    positions = np.flatnonzero(w[:, valid].sum(1) > 0)
    return w[np.ix_(positions, interests)], positions, interests


def explain_interests(routing: Routing, row: int = 0, top: int = 3,
                      hist: np.ndarray | None = None) -> list[InterestExplanation]:
    """Each valid interest of one user with the `top` behaviours routed most strongly to it.

    Ties keep history order (stable sort), so explanations are deterministic.

    Args:
        routing: output of `MIND.route` for a batch.
        row: which user of the batch.
        top: behaviours per interest.
        hist: (L,) the user's history ids as routed; when given, an item seen several times is
            listed once (at its strongest position), as serving's "because you interacted with" wants.

    Example:
        >>> import torch
        >>> r = Routing(torch.zeros(1, 2, 3), torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]]),
        ...             torch.tensor([[0.5, 0.4]]), torch.tensor([[True, True]]))
        >>> [(e.index, e.positions) for e in explain_interests(r, top=2)]
        [(0, [0, 2]), (1, [1, 2])]
        >>> [e.positions for e in explain_interests(r, top=2, hist=np.array([7, 8, 7]))]  # item 7 twice
        [[0, 1], [1, 2]]
    """
    w, positions, interests = coupling_matrix(routing, row)
    lengths = routing.lengths[row].detach().float().cpu().numpy()
    out = []
    for c, j in enumerate(interests):
        order = np.argsort(-w[:, c], kind="stable")
        if hist is not None:
            ids = np.asarray(hist)[positions[order]]
            _, first = np.unique(ids, return_index=True)  # first = strongest occurrence of each item
            order = order[np.sort(first)]
        order = order[:top]
        out.append(InterestExplanation(int(j), float(lengths[j]), positions[order].tolist(),
                                       [round(float(w[i, c]), 4) for i in order]))
    return out
