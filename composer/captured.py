"""A decode step captured as one graph per row bucket, the same graph for every composition.

The eager step runs ~1,200 small operations per token through Python; a captured step is one
compiled graph (``torch.compile``: inductor on a CPU, CUDA graphs on a GPU) per *bucket*, a batch
size the rows are padded to. What varies from step to step enters the graph only as tensors of a
fixed shape, so nothing recompiles for a new composition, prompt length or mix of rows:

- the token ids and positions ``[B, 1]``;
- the rows' composition factors, per composed block and owner group ``[B, T, d]``
  (``composer.batch``: a row's weights summed over the sources sharing a dense tensor);
- attention over the key/value cache and the adapters' low-rank products, which depend on how
  many rows sit in which slab and which adapters the rows use, run as two opaque operators
  (``constellation::attend``, ``constellation::lowrank``) that read the step's own objects from a
  thread-local *step context* (vLLM's forward context, its attention op likewise outside the graph;
  on CUDA they are also where the captured graph is split: ``cudagraph_unsafe``). For buckets of few
  rows the adapters instead enter as each row's folded factors, inputs of fixed shape whose products
  the compiler fuses into the step (``composer.folded``); where the whole catalog's adapters are
  few, every row multiplies by all of them, the stacks constants and the rows' weights per adapter
  an input (``composer.stacked``).

Inductor treats the model's matrices as constants (``freezing``) and chooses, by timing them once,
its own C++ GEMM templates over oneDNN's and ATen's kernels (``max_autotune``): on a 2-core AVX2
CPU the demo's one-row step reads its weights at the memory bandwidth, which no eager kernel did
(docs/benchmarks.md, "One captured graph").
"""

from __future__ import annotations

import threading
import types
from contextlib import contextmanager
from dataclasses import replace

import torch

from .batch import BlockApply, CatalogKernel, _Term
from .folded import FoldLayout, folded_product
from .model import Transformer
from .quant import QuantizedWeight
from .stacked import StackLayout, stacked_product

_local = threading.local()


class StepContext:
    """What the opaque operators of one captured step use: ``attention`` (an object with
    ``attend(layer, q, k, v, scale)`` over the real rows, e.g. the engine's ``SlabDecodeView``),
    ``composition`` (block -> eager block params with ``_lowrank``, or None) and ``rows``, the real
    rows among the bucket's."""

    def __init__(self, attention, composition: dict | None, rows: int):
        self.attention, self.composition, self.rows = attention, composition, rows


@contextmanager
def step_context(ctx: StepContext):
    prev = getattr(_local, "step", None)
    _local.step = ctx
    try:
        yield ctx
    finally:
        _local.step = prev


def _current() -> StepContext:
    ctx = getattr(_local, "step", None)
    if ctx is None:
        raise RuntimeError("a captured decode step ran outside its step context")
    return ctx


_UNSAFE = (torch._C.Tag.cudagraph_unsafe,) if hasattr(torch._C.Tag, "cudagraph_unsafe") else ()

# The two operators are defined through ``torch.library.Library`` rather than ``custom_op``: a graph
# calls each ~30-60 times a step, and ``custom_op``'s Python wrapper (autograd and aliasing checks)
# cost ~9 us a call against ~2 us (docs/benchmarks.md, "The opaque operators' calls").
_lib = torch.library.Library("constellation", "DEF")
_lib.define("attend(Tensor q, Tensor k, Tensor v, int layer, float scale) -> Tensor", tags=_UNSAFE)
_lib.define("lowrank(Tensor y, Tensor x, int block, str name) -> Tensor", tags=_UNSAFE)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    """The step context's attention for the real rows (writing their keys/values); padding rows get 0.
    The result never aliases an input (the compiler assumes so of an operator without aliasing)."""
    ctx = _current()
    R = ctx.rows
    if R == q.shape[0]:
        out = ctx.attention.attend(layer, q, k, v, scale)
        return out.clone() if out.data_ptr() in (q.data_ptr(), k.data_ptr(), v.data_ptr()) else out
    out = ctx.attention.attend(layer, q[:R], k[:R], v[:R], scale)
    return torch.cat([out, out.new_zeros((q.shape[0] - R,) + tuple(out.shape[1:]))])


def lowrank(y: torch.Tensor, x: torch.Tensor, block: int, name: str) -> torch.Tensor:
    """``y`` plus the rows' adapter products of tensor ``name`` in composed block ``block``."""
    comp = _current().composition
    y = y.clone()
    if comp is None:
        return y
    p = comp[block]
    return p._lowrank(y, x, p.terms[name], name)


_lib.impl("attend", attend, "CompositeExplicitAutograd")
_lib.impl("lowrank", lowrank, "CompositeExplicitAutograd")


@torch.library.register_fake("constellation::attend")
def _(q, k, v, layer, scale):
    return torch.empty_like(q)


@torch.library.register_fake("constellation::lowrank")
def _(y, x, block, name):
    return torch.empty_like(y)


class _Attend:
    """The model's cache in a captured step: attention through the opaque operator."""

    def attend(self, i: int, q, k, v, scale: float):
        return torch.ops.constellation.attend(q, k, v, i, scale)


class _GraphBlock(BlockApply):
    """One composed block inside the graph: its matrices the graph's constants, its adapters the
    rows' folded factors (graph inputs, ``composer.folded``), the whole catalog's stacks at the rows'
    weights (``composer.stacked``) or else the opaque operator."""

    def __init__(self, i: int, terms, fused, factors, folded=None, stacked=None):
        self.i, self.terms, self.fused, self.packed, self.factors = i, terms, fused, None, factors
        self.folded, self.stacked = folded or {}, stacked or {}

    def _lowrank(self, y, x, term, name):
        f = self.folded.get(name)
        if f is not None:
            return folded_product(y, x, *f)
        s = self.stacked.get(name)
        if s is not None:
            return stacked_product(y, x, *s)
        return torch.ops.constellation.lowrank(y, x, self.i, name)


def as_parameters(g: Transformer) -> tuple[Transformer, dict[int, torch.Tensor]]:
    """``g`` over ``nn.Parameter``s sharing its tensors' memory (no copy), fused groups kept fused,
    so the compiler can hold them as constants; and original tensor id -> what stands for it (a fused
    group's member: a view of the group's parameter)."""
    params: dict[str, torch.Tensor] = {}
    pmap: dict[int, torch.Tensor] = {}

    def wrap(t):
        if id(t) not in pmap:
            if isinstance(t, QuantizedWeight):  # its packed tensors become the parameters
                pmap[id(t)] = t.with_tensors(*(torch.nn.Parameter(x, requires_grad=False) for x in t.tensors()))
            else:
                pmap[id(t)] = torch.nn.Parameter(t, requires_grad=False)
        return pmap[id(t)]

    def split(whole, sizes: list[int]) -> list:
        if isinstance(whole, QuantizedWeight):
            starts = [sum(sizes[:j]) for j in range(len(sizes))]
            return [whole.rows(s, n) for s, n in zip(starts, sizes)]
        return list(whole.split(sizes))

    for i, layer in enumerate(g._layers):
        for modules, (w, b) in layer.fused.items():
            for suffix, whole in ((".weight", w), (".bias", b)):
                if whole is None:
                    continue
                names = [g.arch.layer_name(i, m + suffix) for m in modules]
                parts = split(wrap(whole), [g.params[n].shape[0] for n in names])
                for n, part in zip(names, parts):
                    params[n] = pmap[id(g.params[n])] = part
    for name, t in g.params.items():
        if name not in params:
            params[name] = wrap(t)
    model = Transformer(g.mc, g.arch, params)
    model.weights_format, model.weights_group = g.weights_format, g.weights_group
    return model, pmap


def _constant(t: torch.Tensor, pmap: dict, own: dict) -> torch.Tensor:
    """What a captured graph multiplies by in place of ``t`` where it multiplies by ``t`` alone: its
    parameter, or for a member of a fused group a parameter of its own (a copy: inductor's CPU GEMM
    template packs a view into a constant as if it started at the constant's first element)."""
    p = pmap.get(id(t))
    if p is None:
        p = pmap[id(t)] = torch.nn.Parameter(t, requires_grad=False)  # a full fine-tune's own tensor
    if isinstance(p, (torch.nn.Parameter, QuantizedWeight)):  # (a quantized member multiplies through its whole)
        return p
    if id(t) not in own:
        own[id(t)] = torch.nn.Parameter(t.detach().clone(), requires_grad=False)
    return own[id(t)]


def _remap_terms(kernel: CatalogKernel, i: int, pmap: dict, own: dict) -> tuple[dict[str, _Term], dict]:
    """Block ``i``'s terms and fused matrices over the graph's constants."""
    fused = {m: pmap[id(w)] for m, w in kernel.fused[i].items()}
    grouped = {m + ".weight" for modules in fused for m in modules}  # (multiplied through ``fused``)
    terms = {name: t if name in grouped else replace(t, tensors=[_constant(x, pmap, own) for x in t.tensors])
             for name, t in kernel.blocks[i].items()}
    return terms, fused


def _forward(self, ids: torch.Tensor, positions: torch.Tensor, factors: list[torch.Tensor],
             folded: list[torch.Tensor] = ()) -> torch.Tensor:
    g, kernel = self.model, self.kernel
    per_block = self.layout.per_block(folded) if folded and self.layout is not None else {}
    stacked = self.stacks.per_block(folded, self.stack_consts) if self.stacks is not None else {}
    ctx = g.positional_context(positions, None, _Attend())
    x = g.embed(ids, ctx)
    k = 0
    for i in range(g.mc.n_layers):
        p = g.layer(i)
        if i in self.blocks:
            terms, fused = self.blocks[i]
            n = len(kernel.groups[i])
            p = _GraphBlock(i, terms, fused, factors[k:k + n], per_block.get(i), stacked.get(i))
            k += n
        x = g.block(i, x, ctx, p)
    return g.logits(g.final_norm(x))[:, 0]


class CapturedStep(torch.nn.Module):
    """One decode step of a catalog's model over ``nn.Parameter``s wrapping G's (and full
    specialists') matrices: ``forward(ids [B, 1], positions [B, 1], factors, folded=[])`` -> logits
    ``[B, V]`` (fp32); ``folded``: the rows' adapters as ``layout`` (a ``FoldLayout`` of ``fold_k``
    adapters a row) builds them, else the adapters run as the opaque operator (a graph per bucket is
    traced one way or the other); given ``stacks`` (the catalog's ``StackLayout``), ``folded`` is
    instead the rows' weights per stack entry and the whole catalog's adapter stacks are the
    graph's constants (``composer.stacked``); ``plain``: G's step alone, for batches whose rows are
    all G's (no factors). The
    module registers every matrix it multiplies by (``consts``), which is what lets inductor hold
    them as constants (``freezing``; reached only through a plain object they were lifted as
    inputs); its ``forward`` is a function with a code object of its own, so dynamo's
    cache for it — one graph per bucket — is this step's alone and goes with it."""

    def __init__(self, kernel: CatalogKernel, plain: bool = False, fold_k: int = 0,
                 stacks: StackLayout | None = None):
        super().__init__()
        c = kernel.c
        self.kernel = kernel
        self.stacks = None if plain else stacks
        self.layout = None if plain or self.stacks is not None or fold_k < 1 else FoldLayout.of(kernel, fold_k)
        self.stack_consts = {key: tuple(torch.nn.Parameter(t, requires_grad=False) for t in pair)
                             for key, pair in self.stacks.factors().items()} if self.stacks is not None else {}
        self.model, pmap = as_parameters(c.g)
        own: dict[int, torch.nn.Parameter] = {}
        # plain: G's own layers only (rows all G's), no factors and no adapter operator in the graph
        self.blocks = {} if plain else {i: _remap_terms(kernel, i, pmap, own) for i in kernel.blocks}
        held = [t for p in list(pmap.values()) + list(own.values())
                for t in (p.tensors() if isinstance(p, QuantizedWeight) else [p])]
        held += [t for pair in self.stack_consts.values() for t in pair]
        params = {id(p): p for p in held if isinstance(p, torch.nn.Parameter)}
        self.consts = torch.nn.ParameterList(list(params.values()))
        code = _forward.__code__.replace(co_name=f"captured_step_{id(self):x}")
        self.forward = types.MethodType(types.FunctionType(code, _forward.__globals__, code.co_name, _forward.__defaults__), self)

    def group_shapes(self) -> list[tuple[int, int]]:
        """Per factor input: (T, d) of ``[B, T, d]``."""
        return factor_shapes(self.kernel, self.blocks)


def factor_shapes(kernel: CatalogKernel, blocks) -> list[tuple[int, int]]:
    """Per factor input of a captured step composing ``blocks``: (T, d) of ``[B, T, d]``."""
    return [(int(owner.max()) + 1, kernel.c.d) for i in sorted(blocks) for owner in kernel.groups[i]]


def block_factors(kernel: CatalogKernel, params: dict, B: int) -> list[torch.Tensor]:
    """The eager block params' factors in the captured step's order, padded to ``B`` rows."""
    out = []
    for i in sorted(kernel.blocks):
        for f in params[i].factors:
            if f.shape[0] < B:
                f = torch.cat([f, f.new_zeros((B - f.shape[0],) + tuple(f.shape[1:]))])
            out.append(f)
    return out
