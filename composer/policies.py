"""Broadcast policies: how a per-node d-vector weight applies to each tensor (DESIGN §4).

A policy answers, for one tensor of a composed decoder block, which storage axis the d-vector
weights run along, or ``None`` for "scale the whole tensor by the vector's mean". Adding a
policy is one registry entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .arch import TensorRole


@dataclass(frozen=True)
class BroadcastPolicy:
    name: str
    description: str
    source: str
    axis: Callable[[TensorRole, tuple[int, ...], int], "int | None"]


def _residual(role: TensorRole, shape: tuple[int, ...], d: int) -> int | None:
    return role.d_axis()


def _shape(role: TensorRole, shape: tuple[int, ...], d: int) -> int | None:
    if shape[0] == d:
        return 0
    if len(shape) > 1 and shape[1] == d:
        return 1
    return None


POLICIES: dict[str, BroadcastPolicy] = {}


def register(policy: BroadcastPolicy) -> BroadcastPolicy:
    POLICIES[policy.name] = policy
    return policy


register(BroadcastPolicy(
    "residual",
    "by role: residual readers weighted along input columns, writers along output rows, "
    "d-vectors elementwise, other vectors by the mean weight",
    "DESIGN §4 (default)",
    _residual,
))
register(BroadcastPolicy(
    "shape",
    "the paper code's rule: rows if dim 0 == d, else columns if dim 1 == d, else the mean weight",
    "arXiv paper code (001), for comparison",
    _shape,
))


def get_policy(name: str) -> BroadcastPolicy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown broadcast policy '{name}' (choose from {', '.join(POLICIES)})") from None
