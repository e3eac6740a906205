"""Composition modes (DESIGN §5): one registry entry each, with its parameters and its source.

A mode turns the query's decomposition into a ``Plan``: either weights over the sources
(generalist + specialists) for the last L blocks, run by ``kernels``; or, for ``logit``, the
coefficients of a decode-time mixture of next-token log-probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictFloat

from . import decompose
from .weightings import WEIGHTINGS, Bands, Weighting, WeightingError, get_weighting, node_split, profile_sharpness


class CompositionError(ValueError):
    """A composition request that cannot be honoured (unknown mode/domain, bad parameter)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class CompositionParams(BaseModel):
    """The per-request ``composition`` object; every field optional (server defaults apply)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    mode: str | None = Field(default=None, description="one of the registered composition modes")
    top_k: int | None = Field(default=None, ge=1, le=64, description="specialists mixed per query")
    weights: dict[str, float] | None = Field(default=None, description="per-domain weights for mode 'weights'")
    lambda_: float | None = Field(default=None, alias="lambda", ge=-10, le=10,
                                  description="task-arithmetic lambda, or the logit mode's scale")
    weighting: str | None = Field(default=None, description="how alpha becomes node weights (mode "
                                  "'constellation'; default: the index's calibrated weighting)")
    sharpness: StrictFloat | None = Field(default=None, description="the weighting's power or temperature "
                                    "(default: the value calibrated at index build)")
    strength: dict[str, StrictFloat] | None = Field(default=None, description="per-domain strength gamma "
                                              "overriding the calibrated ones (1 = the specialist as trained)")
    specialist: str | None = Field(default=None, description="mode 'routed': the specialist to run (default: "
                                   "the top-1 by alpha)")


# CompositionParams fields besides `mode`, and how an error names them
PARAM_FIELDS = ("top_k", "weights", "lambda_", "weighting", "sharpness", "strength", "specialist")
STRENGTH_MAX = 8.0


def _shown(f: str) -> str:
    return "lambda" if f == "lambda_" else f


@dataclass(frozen=True)
class Calibrated:
    """What ``index build`` calibrated (index_store.calibrate): the default weighting, each
    weighting's sharpness, each domain's strength. Empty = the paper's rule, strength 1."""

    weighting: str = "paper"
    sharpness: dict[str, float] = field(default_factory=dict)  # weighting -> value
    strength: dict[str, float] = field(default_factory=dict)  # domain -> gamma (absent: 1)
    bands: dict[str, Bands] = field(default_factory=dict)  # adaptive weighting -> its calibrated bands

    def sharpness_for(self, name: str) -> float | None:
        return self.sharpness.get(name, WEIGHTINGS[name].default)

    def bands_for(self, name: str) -> Bands | None:
        return self.bands.get(name, WEIGHTINGS[name].bands)


@dataclass
class ModeInput:
    alpha: torch.Tensor  # [N] float64
    domains: list[str]
    d: int
    top_k: int
    task_lambda: float
    signatures: Callable[[list[int]], torch.Tensor]  # indices -> [k, d] activation signatures
    params: CompositionParams
    joint: bool = False  # evaluation contrast: joint normalisation (DESIGN §3.5)
    calibrated: Calibrated = field(default_factory=Calibrated)


@dataclass
class Plan:
    mode: str
    kind: str  # "params" | "logit"
    alpha: torch.Tensor  # [N]
    selected: list[int] = field(default_factory=list)
    coefficients: torch.Tensor | None = None  # [len(selected)] what multiplied the signatures / betas
    node_weights: torch.Tensor | None = None  # [len(selected), d], or [Lc, len(selected), d] per block
    fallback: torch.Tensor | None = None  # bool [d] or [Lc, d]
    source_weights: torch.Tensor | None = None  # [1 + N, d] or [Lc, 1 + N, d]; source 0 is the generalist
    betas: dict[int, float] = field(default_factory=dict)  # logit mode: specialist index -> beta
    # [len(selected)]: the one weight a mode without per-node weights gives each selected specialist
    # (task arithmetic: lambda each; logit: the betas); what ``mean_entropy_bits`` is taken over
    specialist_weights: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    # the models a sequence of this plan runs, one batch row each: (beta, source weights [1 + N, d] or
    # [Lb, 1 + N, d]); beta None = the row whose log-probabilities are the base of the mixture. None:
    # one row running ``source_weights`` (every parameter-space mode)
    rows: list[tuple[float | None, torch.Tensor]] | None = None

    @property
    def components(self) -> list[tuple[float | None, torch.Tensor]]:
        """What the engine runs per sequence: one row per entry, log-probabilities mixed by beta."""
        return self.rows if self.rows is not None else [(None, self.source_weights)]

    @property
    def entropy(self) -> torch.Tensor | None:
        """Per-node entropy (bits) of the node weights, ``[d]`` or ``[Lc, d]``; None without node weights."""
        return None if self.node_weights is None else decompose.entropy_bits(self.node_weights)

    @property
    def mean_entropy_bits(self) -> float:
        """How many specialists the plan really mixes, in bits (the response's ``entropy_bits``).

        With node weights (constellation, weights, routed, uniform): the mean node entropy. Without
        (task arithmetic, logit): the entropy of the specialist weights normalised to sum to 1,
        ``-sum_i p_i log2 p_i`` with ``p_i = |w_i| / sum_j |w_j|`` (0 when no specialist has weight,
        e.g. lambda = 0). The generalist: 0.
        """
        e = self.entropy
        if e is not None:
            return float(e.mean())
        if self.specialist_weights is not None:
            return weight_entropy_bits(self.specialist_weights)
        return 0.0

    @property
    def fallback_fraction(self) -> float:
        return 0.0 if self.fallback is None else float(self.fallback.float().mean())

    @property
    def gini(self) -> float:
        return decompose.gini(self.alpha)


@dataclass(frozen=True)
class Mode:
    name: str
    description: str
    source: str
    params: tuple[str, ...]  # CompositionParams fields it accepts besides `mode`
    build: Callable[[ModeInput], Plan]
    uses_signatures: bool = False  # its node weights need activation signatures
    generalist_only: bool = False  # its first (or only) row is the generalist itself
    required: tuple[str, ...] = ()  # of ``params``: must be given
    bounds: tuple[tuple[str, float, float], ...] = ()  # (param, lo, hi): a numeric parameter's range
    # batch rows one sequence takes, given the top-K in force (its plan's ``components``, at most)
    rows_per_choice: Callable[[int], int] = lambda top_k: 1


def weight_entropy_bits(weights: torch.Tensor) -> float:
    """Entropy (bits) of ``|weights|`` normalised to sum to 1; 0 if they are all zero."""
    w = weights.to(torch.float64).abs().flatten()
    total = float(w.sum())
    if not (total > 0 and math.isfinite(total)):
        return 0.0
    return float(decompose.entropy_bits((w / total)[:, None])[0])


WEIGHT_MAX = 1e6  # a per-domain weight of mode 'weights' (relative: they are normalised)


MODES: dict[str, Mode] = {}


def register(mode: Mode) -> Mode:
    MODES[mode.name] = mode
    return mode


def _sources(n: int, d: int, lead: tuple[int, ...] = ()) -> torch.Tensor:
    return torch.zeros(*lead, 1 + n, d, dtype=torch.float32)


def _mix(mi: ModeInput, mode: str, selected: list[int], coef: torch.Tensor,
         weighting: Weighting = WEIGHTINGS["paper"], gamma: torch.Tensor | None = None) -> Plan:
    """Node weights of the selected specialists; with strengths ``gamma`` (not all 1) the source
    weights are ``gamma_i * w_ij`` and the generalist takes the rest, ``1 - sum_i gamma_i w_ij``."""
    nw = node_split(weighting, coef, lambda: mi.signatures(selected), len(selected), mi.d, mi.joint)
    w = _sources(len(mi.domains), mi.d, tuple(nw.weights.shape[:-2]))
    scaled = gamma is not None and not bool((gamma == 1).all())
    for row, i in enumerate(selected):
        w[..., 1 + i, :] = nw.weights[..., row, :] * (float(gamma[row]) if scaled else 1.0)
    if scaled:
        w[..., 0, :] = (1.0 - (gamma.to(torch.float64)[:, None] * nw.weights.to(torch.float64)).sum(-2)).float()
    return Plan(mode, "params", mi.alpha, selected, coef, nw.weights, nw.fallback, w)


def _k(mi: ModeInput) -> int:
    return mi.params.top_k or mi.top_k


def _constellation(mi: ModeInput) -> Plan:
    p, cal = mi.params, mi.calibrated
    wt = get_weighting(p.weighting or cal.weighting)
    s = p.sharpness if p.sharpness is not None else cal.sharpness_for(wt.name)
    sel = decompose.top_k(mi.alpha, _k(mi))
    profile = None
    if wt.profile is not None:  # adaptive: the prompt's alpha profile picks the temperature
        s, profile = profile_sharpness(wt, mi.alpha[sel], cal.bands_for(wt.name))
    strength = {**cal.strength, **(p.strength or {})}
    gamma = torch.tensor([float(strength.get(mi.domains[i], 1.0)) for i in sel], dtype=torch.float64)
    plan = _mix(mi, "constellation", sel, wt.coefficients(mi.alpha[sel], s), wt, gamma)
    plan.extra.update(weighting=wt.name, sharpness=s,
                      strength={mi.domains[i]: float(g) for i, g in zip(sel, gamma)}, **({"profile": profile} if profile else {}))
    return plan


def _paper(mi: ModeInput) -> Plan:
    sel = decompose.top_k(mi.alpha, _k(mi))
    plan = _mix(mi, "paper", sel, mi.alpha[sel])
    plan.extra.update(weighting="paper", sharpness=None)
    return plan


def _generalist(mi: ModeInput) -> Plan:
    w = _sources(len(mi.domains), mi.d)
    w[0] = 1.0
    return Plan("generalist", "params", mi.alpha, [], source_weights=w)


def _one_hot(mi: ModeInput, mode: str, selected: list[int]) -> Plan:
    w = _sources(len(mi.domains), mi.d)
    nw = torch.zeros(len(selected), mi.d)
    for row, i in enumerate(selected):
        w[1 + i] = 1.0 / len(selected)
        nw[row] = 1.0 / len(selected)
    return Plan(mode, "params", mi.alpha, selected, torch.ones(len(selected), dtype=torch.float64),
                nw, torch.zeros(mi.d, dtype=torch.bool), w)


def _routed(mi: ModeInput) -> Plan:
    named = mi.params.specialist
    return _one_hot(mi, "routed", [mi.domains.index(named)] if named else decompose.top_k(mi.alpha, 1))


def _uniform(mi: ModeInput) -> Plan:
    return _one_hot(mi, "uniform", list(range(len(mi.domains))))


def _task_arithmetic(mi: ModeInput) -> Plan:
    lam = mi.params.lambda_ if mi.params.lambda_ is not None else mi.task_lambda
    n = len(mi.domains)
    w = _sources(n, mi.d)
    w[0] = 1.0 - lam * n
    w[1:] = lam
    p = Plan("task_arithmetic", "params", mi.alpha, list(range(n)), source_weights=w,
             specialist_weights=torch.full((n,), float(lam), dtype=torch.float64))
    p.extra["lambda"] = lam
    return p


def _weights(mi: ModeInput) -> Plan:
    given = mi.params.weights
    if not given:
        raise CompositionError("mode 'weights' needs composition.weights, e.g. {\"medical\": 0.7, \"legal\": 0.3}",
                               "composition.weights")
    sel = [mi.domains.index(k) for k in given if given[k] > 0]
    if not sel:
        raise CompositionError("composition.weights needs at least one positive weight", "composition.weights")
    coef = torch.tensor([given[mi.domains[i]] for i in sel], dtype=torch.float64)
    return _mix(mi, "weights", sel, coef)


def _logit(mi: ModeInput) -> Plan:
    scale = mi.params.lambda_ if mi.params.lambda_ is not None else 1.0
    sel = decompose.top_k(mi.alpha, _k(mi))
    pos = mi.alpha[sel].clamp_min(0)
    total = float(pos.sum())
    betas = {i: (scale * float(p) / total if total > 0 else 0.0) for i, p in zip(sel, pos)}
    p = Plan("logit", "logit", mi.alpha, sel, pos, betas={i: b for i, b in betas.items() if b != 0},
             specialist_weights=torch.tensor([betas[i] for i in sel], dtype=torch.float64))
    p.extra["lambda"] = scale
    p.rows = [(None, _one_hot_source(len(mi.domains), mi.d, None))] + [
        (beta, _one_hot_source(len(mi.domains), mi.d, i)) for i, beta in p.betas.items()]
    return p


def _one_hot_source(n_domains: int, d: int, index: int | None) -> torch.Tensor:
    """Source weights running one model alone: G (``index`` None) or specialist ``index``."""
    w = _sources(n_domains, d)
    w[0 if index is None else 1 + index] = 1.0
    return w


register(Mode("constellation", "per-query node-level composition of the top-K specialists, weighted by the "
              "index's calibrated weighting, sharpness and per-domain strengths (docs/weightings.md)",
              "Constellation-Indexed Model Composition (seed 001), DESIGN §3-4; calibration: this project",
              ("top_k", "weighting", "sharpness", "strength"), _constellation, uses_signatures=True))
register(Mode("paper", "the paper's rule exactly: r_ij = max(alpha_i, 0) * a_ij normalised per node, the "
              "specialists' weights summing to 1 (no calibration)",
              "Constellation-Indexed Model Composition (seed 001), DESIGN §3.5", ("top_k",), _paper,
              uses_signatures=True))
register(Mode("generalist", "the generalist unchanged", "baseline", (), _generalist, generalist_only=True))
register(Mode("routed", "the top-1 domain's specialist (or the one named) for the last L layers (a router's "
              "choice)", "baseline (router / MoE gate)", ("specialist",), _routed))
register(Mode("uniform", "mean of all specialists' last L layers", "baseline (model soup)", (), _uniform))
register(Mode("task_arithmetic", "theta_G + lambda * sum_i (theta_S_i - theta_G) on the last L layers",
              "Ilharco et al. 2023, Editing Models with Task Arithmetic", ("lambda_",), _task_arithmetic,
              bounds=(("lambda_", 0.0, 1.0),)))
register(Mode("weights", "caller-given per-domain weights, split per node by activation signatures",
              "DESIGN §5 (like merged adapters)", ("weights",), _weights, uses_signatures=True,
              required=("weights",)))
register(Mode("logit", "decode-time composition: log p = log p_G + sum_i beta_i (log p_S_i - log p_G), "
              "beta = lambda * normalised positive alpha of the top-K",
              "Compositional Generalization via Logit Composition (seed 003)", ("top_k", "lambda_"), _logit,
              generalist_only=True, bounds=(("lambda_", 0.0, 1.0),), rows_per_choice=lambda top_k: 1 + top_k))


def get_mode(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise CompositionError(f"unknown composition mode '{name}' (choose from {', '.join(MODES)})",
                               "composition.mode") from None


def validate(params: CompositionParams, domains: list[str], default_mode: str,
             calibrated: Calibrated | None = None) -> Mode:
    """Refuse what cannot be honoured before any work: unknown mode or domain, a parameter the mode
    does not use (so a typo'd intent is not silently ignored), top_k beyond the specialists, a
    weighting's sharpness out of its range or given to a weighting without one."""
    if params.mode is not None and not params.mode:  # "" is no mode: not silently the default
        raise CompositionError(f"composition.mode is empty; omit it for the default ('{default_mode}') or choose "
                               f"from {', '.join(MODES)}", "composition.mode")
    mode = get_mode(params.mode or default_mode)
    for f in PARAM_FIELDS:
        if getattr(params, f) is not None and f not in mode.params:
            raise CompositionError(
                f"composition.{_shown(f)} does not apply to mode '{mode.name}' "
                f"(it takes: {', '.join(_shown(p) for p in mode.params) or 'nothing'})",
                f"composition.{_shown(f)}",
            )
    for f in mode.required:
        if not getattr(params, f):
            raise CompositionError(f"mode '{mode.name}' needs composition.{f}"
                                   + (', e.g. {"medical": 0.7, "legal": 0.3}' if f == "weights" else ""),
                                   f"composition.{f}")
    for f, lo, hi in mode.bounds:
        v = getattr(params, f)
        if v is not None and not (math.isfinite(v) and lo <= v <= hi):
            shown = "lambda" if f == "lambda_" else f
            raise CompositionError(f"composition.{shown}={v} is outside [{lo:g}, {hi:g}] for mode '{mode.name}'",
                                   f"composition.{shown}")
    if params.weights is not None:
        bad = {k: v for k, v in params.weights.items() if not (math.isfinite(v) and 0 <= v <= WEIGHT_MAX)}
        if bad:
            raise CompositionError(f"composition.weights must be finite and in [0, {WEIGHT_MAX:g}] (they are "
                                   f"relative); got {bad}", "composition.weights")
        if params.weights and not any(v > 0 for v in params.weights.values()):
            raise CompositionError("composition.weights needs at least one positive weight", "composition.weights")
    _validate_weighting(params, domains, calibrated or Calibrated())
    if params.top_k is not None and params.top_k > len(domains):
        raise CompositionError(f"composition.top_k={params.top_k} exceeds the {len(domains)} specialists of "
                               "this constellation", "composition.top_k")
    if params.specialist is not None and params.specialist not in domains:
        raise CompositionError(f"composition.specialist '{params.specialist}' is not a specialist of this "
                               f"constellation (it has {domains})", "composition.specialist")
    unknown = [k for k in (params.weights or {}) if k not in domains]
    if unknown:
        raise CompositionError(f"composition.weights names unknown domain(s) {unknown}; "
                               f"this constellation has {domains}", "composition.weights")
    return mode


def _validate_weighting(params: CompositionParams, domains: list[str], cal: Calibrated) -> None:
    try:
        wt = get_weighting(params.weighting or cal.weighting)
    except WeightingError as e:
        raise CompositionError(str(e), "composition.weighting") from None
    if params.sharpness is not None:
        if wt.sharpness is None:
            why = "" if params.weighting else (" (this index's default weighting: it was built without "
                                               "calibration, so give composition.weighting too)")
            raise CompositionError(f"weighting '{wt.name}' takes no sharpness{why}; choose a weighting with one: "
                                   f"{', '.join(n for n, w in WEIGHTINGS.items() if w.sharpness)}",
                                   "composition.sharpness")
        lo, hi = wt.bounds
        if not (math.isfinite(params.sharpness) and lo <= params.sharpness <= hi):
            raise CompositionError(f"composition.sharpness={params.sharpness} is outside [{lo:g}, {hi:g}] for "
                                   f"weighting '{wt.name}' (its {wt.sharpness})", "composition.sharpness")
    if params.strength is not None:
        unknown = [k for k in params.strength if k not in domains]
        if unknown:
            raise CompositionError(f"composition.strength names unknown domain(s) {unknown}; this constellation "
                                   f"has {domains}", "composition.strength")
        bad = {k: v for k, v in params.strength.items() if not (math.isfinite(v) and 0 <= v <= STRENGTH_MAX)}
        if bad:
            raise CompositionError(f"composition.strength values must be finite and in [0, {STRENGTH_MAX:g}]; "
                                   f"got {bad}", "composition.strength")
