"""Shared building blocks: MLPs and the Dice activation (DIN paper, eq. 5)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Dice(nn.Module):
    """Data-adaptive activation from DIN: p(s) * s + (1 - p(s)) * alpha * s, p = sigmoid(BN(s)).

    Args:
        dim: feature size of the last axis.
        eps: batch-norm epsilon.

    Example:
        >>> Dice(8)(torch.randn(4, 8)).shape
        torch.Size([4, 8])
    """

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=eps, affine=False)
        self.alpha = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        p = torch.sigmoid(self.bn(x.reshape(-1, shape[-1]))).reshape(shape)
        return p * x + (1 - p) * self.alpha * x


def _activation(name: str, dim: int) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "prelu":
        return nn.PReLU(dim)
    if name == "dice":
        return Dice(dim)
    if name == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"unknown activation {name!r}; use one of relu, prelu, dice, sigmoid")


class MLP(nn.Module):
    """Stack of Linear -> activation (-> dropout) layers; the last layer keeps its activation.

    Args:
        in_dim: input feature size.
        dims: hidden sizes, e.g. (200, 80).
        activation: relu | prelu | dice | sigmoid.
        dropout: dropout after each activation (0 = none).

    Example:
        >>> MLP(16, (200, 80), "prelu")(torch.randn(2, 16)).shape
        torch.Size([2, 80])
    """

    def __init__(self, in_dim: int, dims: Sequence[int], activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in dims:
            layers += [nn.Linear(d, h), _activation(activation, h)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
