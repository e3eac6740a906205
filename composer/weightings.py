"""Weightings: how a query's alpha (and the activation signatures) become node weights.

The paper's rule (DESIGN §3.5) is ``r_ij = max(alpha_i, 0) * a_ij`` normalised per node. Its weights
are nearly flat: every domain's alpha carries the direction all prompts share, so the top three
alphas of a clearly legal prompt are like 0.80 / 0.32 / 0.29 and `legal` gets about half of every
node. A weighting is one registry entry: a function from the selected domains' alphas and a
**sharpness** (a power, a temperature, or nothing) to non-negative coefficients, which are then split
per node by the activation signatures (or not). ``index build`` calibrates the sharpness of the
default weighting on held-out index probes (``index_store.calibrate``); a request may override it.

What multiplies the resulting node weights is the per-domain **strength** (``modes._mix``): the
composed model is ``theta_G + sum_i gamma_i * w_ij * (theta_S_i - theta_G)``, with ``gamma_i = 1``
the paper's convex mix. It is calibrated per domain at ``index build`` too (docs/weightings.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import decompose


class WeightingError(ValueError):
    pass


@dataclass(frozen=True)
class Weighting:
    name: str
    description: str
    source: str
    coefficients: Callable[[torch.Tensor, float | None], torch.Tensor]  # selected alphas [k] fp64 -> [k] >= 0
    sharpness: str | None = None  # what the sharpness parameter is ("power", "temperature"); None: no parameter
    default: float | None = None  # its value when nothing is calibrated
    bounds: tuple[float, float] | None = None  # the range a request may set
    grid: tuple[float, ...] = ()  # the values calibration tries
    signatures: bool = True  # split per node by the activation signatures (else the same weight at every node)
    # adaptive weightings: the prompt's alpha profile picks the sharpness (``Bands``); None: a fixed sharpness
    profile: Callable[[torch.Tensor], float] | None = None
    profile_name: str | None = None
    bands: "Bands | None" = None  # the uncalibrated default

WEIGHTINGS: dict[str, Weighting] = {}


def register(w: Weighting) -> Weighting:
    WEIGHTINGS[w.name] = w
    return w


def get_weighting(name: str) -> Weighting:
    try:
        return WEIGHTINGS[name]
    except KeyError:
        raise WeightingError(f"unknown weighting '{name}' (choose from {', '.join(WEIGHTINGS)})") from None


@dataclass(frozen=True)
class Bands:
    """A temperature per band of the prompt's alpha profile: ``temperatures[i]`` for a profile value
    in ``[edges[i-1], edges[i])``; non-decreasing, so the more a prompt reads as a mix the more the
    composition blends."""

    edges: tuple[float, ...]
    temperatures: tuple[float, ...]

    def __post_init__(self):
        if len(self.temperatures) != len(self.edges) + 1 or list(self.edges) != sorted(self.edges):
            raise WeightingError(f"bands need ascending edges and one more temperature: {self}")

    def band(self, x: float) -> int:
        return sum(x >= e for e in self.edges)

    def temperature(self, x: float) -> float:
        return self.temperatures[self.band(x)]

    def label(self, i: int, name: str = "x") -> str:
        lo = "" if i == 0 else f"{self.edges[i - 1]:g} <= "
        hi = "" if i == len(self.edges) else f" < {self.edges[i]:g}"
        return f"{lo}{name}{hi}" if (lo or hi) else "any"

    def describe(self, name: str = "x") -> str:
        """``temperature 0.15 for second alpha < 0.45, 0.3 from 0.45``."""
        if not self.edges:
            return f"temperature {self.temperatures[0]:g} whatever the {name}"
        parts = [f"{self.temperatures[0]:g} for {name} < {self.edges[0]:g}"]
        parts += [f"{t:g} from {e:g}" for e, t in zip(self.edges, self.temperatures[1:])]
        return "temperature " + ", ".join(parts)

    def doc(self) -> dict:
        return {"edges": list(self.edges), "temperatures": list(self.temperatures)}

    @classmethod
    def of(cls, doc: dict) -> "Bands":
        return cls(tuple(float(e) for e in doc["edges"]), tuple(float(t) for t in doc["temperatures"]))


def second_alpha(alpha: torch.Tensor) -> float:
    """The prompt's alpha profile read by ``adaptive``: the second-highest selected alpha (0 with K = 1).
    Every prompt has a high top alpha (the direction all prompts share); a second domain that is
    really in the prompt shows as a high *second* alpha."""
    return float(alpha.to(torch.float64).sort(descending=True).values[1]) if alpha.numel() > 1 else 0.0


def profile_sharpness(w: Weighting, alpha: torch.Tensor, bands: Bands) -> tuple[float, dict]:
    """An adaptive weighting's temperature for the selected alphas, and what ``/explain`` shows of it."""
    x = w.profile(alpha)
    t = bands.temperature(x)
    return t, {"name": w.profile_name, "value": x, "band": bands.label(bands.band(x), w.profile_name),
               "temperature": t, "bands": bands.describe(w.profile_name)}


TEMPERATURES = (0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)  # calibration grid of the softmax weightings
BAND_EDGES = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)  # where calibration may put a band's edge
MAX_BANDS = 3


def _linear(alpha: torch.Tensor, s: float | None) -> torch.Tensor:
    return alpha.clamp_min(0)


def _power(alpha: torch.Tensor, p: float | None) -> torch.Tensor:
    a = alpha.clamp_min(0)
    top = a.max()
    # relative to the largest (the ratio is what counts; avoids underflow at large powers)
    return (a / top) ** float(p) if top > 0 else a


def _softmax(alpha: torch.Tensor, t: float | None) -> torch.Tensor:
    return torch.softmax(alpha.to(torch.float64) / float(t), dim=0)


def node_split(w: Weighting, coef: torch.Tensor, signatures: Callable[[], torch.Tensor] | None, k: int,
               d: int, joint: bool = False) -> decompose.NodeWeights:
    """Node weights ``[..., k, d]`` from the coefficients: split by the signatures (the paper's
    two-stage normalisation, DESIGN §3.5) or, for a weighting without signatures, the normalised
    coefficients at every node."""
    if w.signatures:
        return decompose.node_weights(coef, signatures(), joint=joint)
    c = coef.to(torch.float64).clamp_min(0)
    total = float(c.sum())
    if total > 0:
        col = (c / total).float()[:, None].expand(k, d).clone()
        return decompose.NodeWeights(col, torch.zeros(d, dtype=torch.bool))
    return decompose.NodeWeights(torch.full((k, d), 1.0 / k), torch.ones(d, dtype=torch.bool))


register(Weighting(
    "paper", "r_ij = max(alpha_i, 0) * a_ij, normalised per node (linear in alpha)",
    "Constellation-Indexed Model Composition (seed 001), DESIGN §3.5", _linear))
register(Weighting(
    "power", "r_ij = (max(alpha_i, 0) / max alpha)^p * a_ij, normalised per node; p = 1 is the paper's rule",
    "tempered proportional weights (the paper's rule with a power; this project, docs/weightings.md)", _power,
    sharpness="power", default=1.0, bounds=(0.1, 64.0), grid=(1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)))
register(Weighting(
    "softmax", "r_ij = softmax(alpha / T)_i * a_ij over the top-K, normalised per node: the weights follow "
    "the margins between the alphas, so a clear prompt is nearly routed and an ambiguous one mixed",
    "softmax gating as in mixture-of-experts routers (Shazeer et al. 2017, Outrageously Large Neural "
    "Networks), applied to the constellation's alphas", _softmax,
    sharpness="temperature", default=0.1, bounds=(1e-3, 10.0),
    grid=TEMPERATURES))
register(Weighting(
    "alpha_only", "softmax(alpha / T) over the top-K, the same weight at every node (no activation signatures)",
    "ablation of DESIGN §3.4-3.5: the signatures removed", _softmax,
    sharpness="temperature", default=0.1, bounds=(1e-3, 10.0),
    grid=TEMPERATURES, signatures=False))
register(Weighting(
    "adaptive", "softmax(alpha / T) over the top-K with T read off the prompt's alpha profile (its second-highest "
    "alpha): a calibrated temperature per band of it, sharp for one-domain prompts, blended for mixed ones",
    "this project (docs/weightings.md): softmax gating whose temperature follows the second alpha, fitted at "
    "index build on cross-fitted index probes", _softmax,
    profile=second_alpha, profile_name="second alpha", bands=Bands((0.45,), (0.15, 0.3))))
