"""A loaded constellation: the generalist, its specialists, the basis, and the per-query steps.

Everything here works on token ids and tensors; reading config files and indexes is
``index_store``'s job, HTTP is ``server``'s.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import decompose
from .batch import BatchComposition, CatalogKernel, RowWeights
from .kernels import ComposedParams, MixedParams, stack_rows
from .lowrank import Stack
from .model import Context, KVCache, LayerParams, Transformer
from .modes import Calibrated, CompositionParams, ModeInput, Plan, validate
from .policies import get_policy
from .quant import held_bytes
from .signatures import SIGNATURES, PassRecord, in_pass_signatures
from .weights import Difference, diff_params, specialist_difference

# fp32 copies of half-precision adapter stacks (a CPU's faster batched products) are kept when they
# take at most this share of the generalist's bytes; above it the products run in the stacks' dtype
WIDE_SHARE = 0.25


@dataclass(frozen=True)
class Settings:
    top_k: int = 3
    layers: int | str = "auto"  # "auto": every layer a specialist changes; L: the last L layers
    policy: str = "residual"
    signature: str = "generalist"  # see composer.signatures.SIGNATURES
    task_lambda: float = 0.5
    default_mode: str = "constellation"
    calibrated: Calibrated = field(default_factory=Calibrated)  # the index's weighting, sharpness, strengths


def composed_layers(layers: int | str, n: int, differences: dict[str, Difference]) -> list[int]:
    """The decoder layers composed: ``auto`` = the union of layers any specialist changes (the
    last layer if none does); an integer L = the last L layers."""
    if layers == "auto":
        union = sorted({i for diff in differences.values() for i in diff.layers})
        return union or [n - 1]
    if not isinstance(layers, int) or not 1 <= layers <= n:
        raise ValueError(f"composition.layers must be 'auto' or in 1..{n} for this model, got {layers!r}")
    return list(range(n - layers, n))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens only, in fp32: ``x`` [B, T, d], ``mask`` [B, T] -> [B, d]."""
    m = mask.to(torch.float32)[..., None]
    return (x.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


@dataclass
class GeneralistPass:
    """What one generalist forward over a prompt batch yields (and what later steps reuse)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    ctx: Context  # positions/mask of the prompt; ctx.cache holds the trunk layers' keys/values
    trunk: torch.Tensor  # hidden state entering layer n-L, [B, T, d]
    final: torch.Tensor  # G's last hidden state after the final norm, [B, T, d]
    fingerprint: torch.Tensor  # [B, d] fp32
    alpha: torch.Tensor  # [B, N] float64
    fingerprint_mask: torch.Tensor  # [B, T]: tokens the fingerprint and signatures average over
    timings: dict[str, float] = field(default_factory=dict)
    _signatures: dict[int, torch.Tensor] = field(default_factory=dict)
    record: PassRecord | None = None  # what the in-pass ("generalist") signature is computed from


def share_with_generalist(g: Transformer, s_params: dict[str, torch.Tensor], domain: str
                          ) -> tuple[dict[str, torch.Tensor], Difference]:
    """Keep only the tensors that differ from G; the rest point at G's (lean memory)."""
    diff = diff_params(g, s_params, domain)
    differing = set(diff.tensors)
    return {n: (t if n in differing else g.params[n]) for n, t in s_params.items()}, diff


class Constellation:
    def __init__(
        self,
        generalist: Transformer,
        specialists: dict[str, Transformer],
        basis: torch.Tensor,
        settings: Settings,
        differences: dict[str, Difference] | None = None,
        share_factors: bool = True,
    ):
        self.g = generalist
        self.domains = list(specialists)
        self.specialists = [specialists[d] for d in self.domains]
        if basis.shape != (len(self.domains), generalist.mc.d):
            raise ValueError(f"basis has shape {tuple(basis.shape)}, expected "
                             f"({len(self.domains)}, {generalist.mc.d})")
        self.basis = basis.to(torch.float64).cpu()
        self.settings = settings
        self.policy = get_policy(settings.policy)
        if settings.signature not in SIGNATURES:
            raise ValueError(f"unknown signature '{settings.signature}' (choose from {', '.join(SIGNATURES)})")
        n = generalist.mc.n_layers
        self.n = n
        given = differences or {}
        self.differences = {d: given.get(d) or specialist_difference(generalist, s, d)
                            for d, s in zip(self.domains, self.specialists)}
        self.layers = composed_layers(settings.layers, n, self.differences)
        self.first = self.layers[0]  # first composed block: blocks below it are G's in every composition
        self.trunk_exact = {d: not diff.globals and all(i >= self.first for i in diff.layers)
                            for d, diff in self.differences.items()}
        span = range(self.first, n)
        self.sources = {i: [generalist.layer(i).t] + [s.layer(i).t for s in self.specialists] for i in span}
        self.lowrank = {i: [{}] + [s.layer(i).lr for s in self.specialists] for i in span}
        # blocks inside the span that no source changes run as G's (every mode's weights sum to 1)
        self.varied = [i for i in span if any(
            src[name] is not self.sources[i][0][name] for src in self.sources[i][1:] for name in src)
            or any(self.lowrank[i][1:])]
        self.stacks = self._stack_adapters(share_factors)
        self._materialized: OrderedDict[str, dict[int, LayerParams]] = OrderedDict()
        self._kernel: CatalogKernel | None = None

    def _stack_adapters(self, share: bool = True) -> dict[int, dict[str, Stack]]:
        """Stack every adapter's factors per (block, weight) for batching; with ``share`` the
        specialists' own factors become views into the stacks, so the adapters are held once
        (a union of catalogs, ``composer.union``, leaves its catalogs' specialists as they are)."""
        stacks: dict[int, dict[str, Stack]] = {}
        for i in self.varied:
            names = sorted({name for lr in self.lowrank[i][1:] for name in lr})
            stacks[i] = {}
            for name in names:
                entries = [(s, lr[name]) for s, lr in enumerate(self.lowrank[i]) if name in lr]
                st = Stack.build(entries)
                stacks[i][name] = st
                for k, (s, lr) in enumerate(entries if share else []):
                    spec = self.specialists[s - 1]
                    spec.set_lowrank(self.g.arch.layer_name(i, name), st.view(k, lr.rank))
        every = [st for by_name in stacks.values() for st in by_name.values() if st.widenable]
        if sum(4 * (st.A.numel() + st.Bt.numel()) for st in every) <= WIDE_SHARE * held_bytes(self.g.params.values()):
            for st in every:  # fp32 copies for the CPU's batched products, where they cost little
                st.widen()
        return stacks

    # ---- facts --------------------------------------------------------------------------------
    @property
    def d(self) -> int:
        return self.g.mc.d

    def resident_bytes(self) -> dict[str, int]:
        """Bytes held per part: the generalist, and per specialist only the tensors that differ."""
        seen: set[int] = set()
        size = lambda tensors: held_bytes(tensors, seen)  # noqa: E731 - each storage counted once overall
        out = {"generalist": size(self.g.params.values())}
        for dname, s in zip(self.domains, self.specialists):  # adapter factors: their share of the stacks
            out[dname] = size(s.params.values()) + sum(lr.nbytes for lr in s.lowrank.values())
        padding = size(t for st in self.stacks.values() for x in st.values() for t in (x.A, x.Bt)) - sum(
            lr.nbytes for s in self.specialists for lr in s.lowrank.values())
        if padding > 0:  # zero rows of adapters of unequal rank stacked for one weight
            out["adapter_padding"] = padding
        wide = sum(x.extra_bytes for st in self.stacks.values() for x in st.values())
        if wide:  # fp32 copies of half-precision stacks for the CPU's batched products
            out["adapter_fp32_copies"] = wide
        return out

    # ---- the generalist pass ------------------------------------------------------------------
    @torch.inference_mode()
    def generalist_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        cache: KVCache | None = None, fingerprint_mask: torch.Tensor | None = None,
                        signatures: bool = True, cache_all: bool = False) -> GeneralistPass:
        """One G forward: fingerprint + alpha, and the trunk state (and trunk KV cache) for reuse.

        Layers 0..n-L-1 are G's in every composition, so their keys/values (written to
        ``cache``) and the hidden state entering layer n-L serve the composed model's prefill.
        ``fingerprint_mask`` (default: the attention mask) selects the tokens the fingerprint and the
        activation signatures average over, e.g. a chat's message contents without template markup.
        ``signatures=False`` skips the in-pass signatures (a mode that needs none); ``cache_all``
        writes every layer's keys/values to ``cache`` (the generalist itself is what will run).
        """
        t0 = time.perf_counter()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        fmask = attention_mask if fingerprint_mask is None else fingerprint_mask * attention_mask
        ctx = self.g.context(attention_mask, cache)
        x = self.g.run_blocks(self.g.embed(input_ids, ctx), ctx, 0, self.first)
        trunk = x
        sigs = None
        tail = ctx if cache_all else ctx.with_cache(None)
        if signatures and self.settings.signature == "generalist":
            x, sigs = in_pass_signatures(self, x, tail, fmask)
        else:
            x = self.g.run_blocks(x, tail, self.first, self.n)
        final = self.g.final_norm(x)
        fp = masked_mean(final, fmask)
        a = decompose.alpha(fp.cpu(), self.basis)
        gp = GeneralistPass(input_ids, attention_mask, ctx, trunk, final, fp, a, fmask, record=sigs)
        gp.timings["fingerprint"] = time.perf_counter() - t0
        return gp

    @torch.inference_mode()
    def signature(self, gp: GeneralistPass, i: int) -> torch.Tensor:
        """Activation signature of specialist i for every row: ``[B, d]`` (``trunk``/``full``:
        ``mean_t |h_last(S_i)|``) or ``[B, Lc, d]`` per composed block (``generalist``)."""
        if i in gp._signatures:
            return gp._signatures[i]
        t0 = time.perf_counter()
        if gp.record is not None:
            return self.signatures(gp, [i])[0]
        s = self.specialists[i]
        tail = gp.ctx.with_cache(None)
        if self.settings.signature == "trunk":
            x = s.run_blocks(gp.trunk, tail, self.first, self.n)
        else:
            x = s.run_blocks(s.embed(gp.input_ids, tail), tail, 0, self.n)
        sig = masked_mean(s.final_norm(x).abs(), gp.fingerprint_mask).cpu()
        gp._signatures[i] = sig
        gp.timings["signature"] = gp.timings.get("signature", 0.0) + time.perf_counter() - t0
        return sig

    def signatures(self, gp: GeneralistPass, idx: list[int]) -> list[torch.Tensor]:
        """``signature`` of each of ``idx``; the in-pass (``generalist``) ones still missing are
        computed together, one pass over the record for all of them."""
        missing = [i for i in dict.fromkeys(idx) if i not in gp._signatures]
        if missing and gp.record is not None:
            t0 = time.perf_counter()
            gp._signatures.update(gp.record.specialists(missing))
            gp.timings["signature"] = gp.timings.get("signature", 0.0) + time.perf_counter() - t0
        return [self.signature(gp, i) for i in idx]

    # ---- planning ------------------------------------------------------------------------------
    def validate(self, params: CompositionParams):
        return validate(params, self.domains, self.settings.default_mode, self.settings.calibrated)

    def plan(self, gp: GeneralistPass, row: int = 0, params: CompositionParams | None = None,
             joint: bool = False) -> Plan:
        t0 = time.perf_counter()
        params = params or CompositionParams()
        mode = self.validate(params)
        before = gp.timings.get("signature", 0.0)
        mi = ModeInput(
            alpha=gp.alpha[row], domains=self.domains, d=self.d, top_k=self.settings.top_k,
            task_lambda=self.settings.task_lambda,
            signatures=lambda idx: torch.stack([s[row] for s in self.signatures(gp, idx)], dim=-2),
            params=params, joint=joint, calibrated=self.settings.calibrated,
        )
        plan = mode.build(mi)
        gp.timings["weights"] = time.perf_counter() - t0 - (gp.timings.get("signature", 0.0) - before)
        return plan

    # ---- running composed blocks ---------------------------------------------------------------
    def materialized(self, plan: Plan) -> dict[int, LayerParams]:
        return self.materialized_for(plan.source_weights)

    def materialized_for(self, weights: torch.Tensor, cache: bool = False) -> dict[int, LayerParams]:
        """Composed blocks for one composition's source weights ``[1 + N, d]`` (or ``[Lc, 1 + N, d]``).

        With ``cache``, the last few results are kept (keyed by the weights' bytes), so a request
        decoding alone builds its blocks once, not every step.
        """
        key = hashlib.sha1(weights.detach().cpu().numpy().tobytes()).hexdigest() if cache else None
        if key is not None and key in self._materialized:
            self._materialized.move_to_end(key)
            return self._materialized[key]
        w = weights.to(self.g.device)
        out = {
            i: ComposedParams(self.sources[i], w if w.dim() == 2 else w[i - self.first], self.policy,
                              self.g.arch, self.d, self.lowrank[i])
            for i in self.varied
        }
        if key is not None:
            self._materialized[key] = out
            while len(self._materialized) > 4:
                self._materialized.popitem(last=False)
        return out

    def mixed(self, plans: list[Plan]) -> dict[int, LayerParams]:
        return self.mixed_weights(stack_rows([p.source_weights for p in plans]))

    def mixed_weights(self, weights: torch.Tensor) -> dict[int, LayerParams]:
        """Blocks that mix per batch row: ``weights`` is ``[B, 1 + N, d]`` or ``[B, Lc, 1 + N, d]``."""
        w = weights.to(self.g.device)
        nz = w != 0
        row_use = nz.any(-1) if w.dim() == 3 else nz.any(-1).any(1)  # [B, 1 + N]: sources each row composes
        segments: dict = {}  # shared by blocks whose adapters are stacked alike
        return {i: MixedParams(self.sources[i], w if w.dim() == 3 else w[:, i - self.first], self.policy,
                               self.g.arch, self.d, self.stacks.get(i), row_use, segments) for i in self.varied}

    @property
    def kernel(self) -> CatalogKernel:
        """The catalog's composed blocks as fixed structure (``composer.batch``), built on first use."""
        if self._kernel is None:
            self._kernel = CatalogKernel(self)
        return self._kernel

    def batched(self, rows: list[RowWeights]) -> dict[int, LayerParams]:
        """Blocks computing every row under its own composition, the rows given as tensors only."""
        return BatchComposition(self.kernel, rows).params

    @torch.inference_mode()
    def composed_logits(self, gp: GeneralistPass, plans: list[Plan], path: str = "materialize") -> torch.Tensor:
        """Prompt logits [B, T, V] of each row's composed model, reusing the generalist pass's trunk.

        ``path`` is ``materialize`` (each row's tensors built, rows run one by one), ``mix`` (one
        batched run, every row with its own composition) or ``batch`` (the same through the engine's
        tensor-only kernel, ``composer.batch``). ``logit`` plans run the output mixture.
        """
        tail = gp.ctx.with_cache(None)
        B = gp.trunk.shape[0]
        kinds = {p.kind for p in plans}
        if kinds == {"logit"}:  # log-probabilities of the decode-time mixture
            return torch.cat([self._logit_mix(gp, tail, b, plans[b]) for b in range(B)])
        if "logit" in kinds:
            raise ValueError("composed_logits: logit-mode and parameter-mode plans cannot share one call")
        if path in ("mix", "batch"):
            blocks = self.mixed(plans) if path == "mix" else self.batched(
                [RowWeights.of(p.source_weights) for p in plans])
            x = self.g.run_blocks(gp.trunk, tail, self.first, self.n, blocks)
            return self.g.logits(self.g.final_norm(x))
        rows = []
        for b in range(B):
            row = _row_context(tail, b)
            x = self.g.run_blocks(gp.trunk[b:b + 1], row, self.first, self.n, self.materialized(plans[b]))
            rows.append(self.g.logits(self.g.final_norm(x)))
        return torch.cat(rows)

    def _specialist_logits(self, gp: GeneralistPass, tail: Context, b: int, i: int) -> torch.Tensor:
        s = self.specialists[i]
        row = _row_context(tail, b)
        if self.trunk_exact[self.domains[i]]:
            x = s.run_blocks(gp.trunk[b:b + 1], row, self.first, self.n)
        else:
            x = s.run_blocks(s.embed(gp.input_ids[b:b + 1], row), row, 0, self.n)
        return s.logits(s.final_norm(x))

    def _logit_mix(self, gp: GeneralistPass, tail: Context, b: int, plan: Plan) -> torch.Tensor:
        base = F.log_softmax(self.g.logits(gp.final[b:b + 1]).float(), dim=-1)
        out = base.clone()
        for i, beta in plan.betas.items():
            out += beta * (F.log_softmax(self._specialist_logits(gp, tail, b, i).float(), dim=-1) - base)
        return F.log_softmax(out, dim=-1)

    # ---- reporting -----------------------------------------------------------------------------
    def explain(self, gp: GeneralistPass, plan: Plan, row: int = 0, node_weights: bool = False) -> dict:
        """The ``/explain`` document: the weights reported are the plan's, i.e. what generation uses.

        ``layers`` is the ``[composition].layers`` setting as configured (``"auto"`` or the integer L);
        ``composed_layers`` every decoder layer index it composes, listed one by one (``[26, 27, 28, 29]``,
        never a range's two ends). ``entropy_bits`` is ``plan.mean_entropy_bits`` (see ``Plan``).
        """
        sel = [self.domains[i] for i in plan.selected]
        mean_w = {}
        if plan.node_weights is not None:
            mean_w = {self.domains[i]: float(plan.node_weights[..., r, :].mean()) for r, i in enumerate(plan.selected)}
        elif plan.kind == "logit":
            mean_w = {self.domains[i]: b for i, b in plan.betas.items()}
        out = {
            "mode": plan.mode,
            "domains": self.domains,
            "alpha": {d: float(a) for d, a in zip(self.domains, plan.alpha)},
            "selected": sel,
            "mean_node_weight": mean_w,
            "entropy_bits": plan.mean_entropy_bits,
            "gini": plan.gini,
            "fallback": plan.fallback_fraction,
            "top_k": len(plan.selected) if plan.mode in ("constellation", "paper", "logit") else self.settings.top_k,
            "layers": self.settings.layers,
            "composed_layers": [int(i) for i in self.layers],
            "policy": self.settings.policy,
            "signature": self.settings.signature,
            "prompt_tokens": int(gp.attention_mask[row].sum()),
            "timings_ms": {k: round(v * 1000, 3) for k, v in gp.timings.items()},
        }
        out.update({k: v for k, v in plan.extra.items()})
        if node_weights:
            out["node_weights"] = (
                {self.domains[i]: [float(v) for v in _per_node(plan.node_weights[..., r, :])]
                 for r, i in enumerate(plan.selected)}
                if plan.node_weights is not None else {}
            )
        return out


def _per_node(w: torch.Tensor) -> torch.Tensor:
    """A node-weight row ``[d]``, or per block ``[Lc, d]`` averaged over the blocks."""
    return w if w.dim() == 1 else w.mean(0)


def _row_context(ctx: Context, b: int) -> Context:
    return Context(
        ctx.positions[b:b + 1], ctx.mask[b:b + 1],
        None if ctx.cos is None else ctx.cos[b:b + 1],
        None if ctx.sin is None else ctx.sin[b:b + 1], None,
    )
