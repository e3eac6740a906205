"""The engine's captured decode steps (``composer.captured``): one compiled graph per row bucket for
the current catalog, built on a background thread while the engine decodes eagerly, used by a step
whose rows all belong to that catalog and fit a ready bucket (padded up to it). With ``above``, one
more graph, built last, runs every step of more rows than the largest bucket: the same step traced
with the rows' count a dynamic size (``mark_dynamic``, guarded to largest + 1 ... ``above``), nothing
padded (a 17-row step ran eagerly before, ~1.25x the 16-row graph; docs/benchmarks.md, "Rows above
the largest bucket").

On a CPU the graphs are inductor's, with the model's matrices frozen as constants and GEMM kernels
chosen by timing (``max_autotune``); on CUDA they are replayed CUDA graphs (``triton.cudagraphs``),
split around the two opaque operators (``graph_partition``). A catalog change builds the new
catalog's graphs once, the old ones serving nothing from then on.

Small buckets take the rows' adapters folded per row (``composer.folded``: inputs the compiler fuses
into the step, where larger buckets run the batched products as an opaque operator); a batch whose
rows compose more sources than the catalog's ``top_k`` runs the next larger bucket instead. Every
row of a folding bucket reads ``top_k`` adapters' worth of factors, its own or zeros, so by default
a bucket folds while those reads stay within ``FOLD_SHARE`` of the generalist's bytes (and it has
at most ``FOLD_MAX_ROWS`` rows); where G's own rows would read more than ``PLAIN_SHARE`` of zeros,
the bucket also gets G's step alone for batches of G's rows. The buckets that do not fold multiply
every row by the whole catalog's adapters (``composer.stacked``) while those stacks are at most
``STACK_SHARE`` of G's bytes (a catalog of few specialists: the demo's are 3.9 %), else they run
the opaque operator.

Once every bucket is built, a step runs its graph without evaluating dynamo's guards
(``skip_guard_eval_unsafe``: ~0.5-0.9 ms a step, a tenth of an int8 one-row step): every input is
a static buffer of the bucket's shape, and no guard fails after warm-up (tests/test_captured.py
counts graphs with the guards evaluated, ``check_guards``). The stance is process-wide, so a step
takes it only while no build is under way, and a build's calls wait for such a step to end.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from contextlib import nullcontext

import torch

from composer.captured import CapturedStep, StepContext, block_factors, step_context
from composer.stacked import StackLayout
from composer.quant import held_bytes
from index_store.config import check_buckets
from . import heap

log = logging.getLogger("constellation.engine")

# (torch.compiler.set_stance's skip_guard_eval_unsafe: in every torch this project supports, checked anyway)
CAN_SKIP_GUARDS = "skip_guard_eval_unsafe" in inspect.signature(torch.compiler.set_stance).parameters

# (bench.lowrank_scale, 64 all-layer rank-16 adapters, fp32, where a row's folded factors are 11% of
# G's bytes: folded 2 rows 0.89 of G against 0.55 with the operator, 4 rows 66.8 tok/s against 58.3,
# 8 rows 40.0 against 54.6; G's own 4- and 8-row batches lost 27% and 39% reading zeros)
FOLD_SHARE = 0.5  # a bucket folds while its rows' folded factors read at most this share of G's bytes
FOLD_MAX_ROWS = 4  # ... and it has at most this many rows (more were not measured better)
PLAIN_SHARE = 0.05  # G's step alone too for a folding bucket whose G rows would read more zeros than this
# (the served demo at 4 streams, buckets 1, 2, 4 folded, G's 4 rows reading 5.8 % of G in zeros:
# constellation mode 162.6 -> 181.0 tok/s, generalist mode 186.0 -> 167.5)
STACK_SHARE = 0.1  # a bucket that does not fold multiplies every row by the whole catalog's adapters
# (``composer.stacked``) while those stacks, read once a step, are at most this share of G's bytes
# (the demo's 16-row step, its stacks 3.9 % of G: 27.9 / 28.3 ms with the operator, 25.5 / 25.1
# stacked; G's own rows 26.0 / 25.5 against 25.3 / 26.1, reading the stacks at weight 0)


def compile_options(device: torch.device) -> dict:
    """Inductor options of a captured step on ``device``."""
    if device.type == "cuda":
        return {"triton.cudagraphs": True, "graph_partition": True}
    return {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def _new_step(device: torch.device) -> None:
    """On CUDA, tell the graph trees a new step begins: the last step's outputs (its logits, already
    copied out) may be overwritten by this replay."""
    if device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


class _NoAttention:
    """The warm-up's attention: no cache, zeros."""

    def attend(self, layer, q, k, v, scale):
        return torch.zeros_like(q)


class DecodeGraphs:
    """Captured decode steps of one catalog at a time, per bucket (rows padded up to it); with
    ``plain``, each bucket also gets G's step alone for batches of G's own rows (generalist mode),
    a graph with no factors and no adapter operator in it (on CUDA: cut only at attention)."""

    def __init__(self, buckets: list[int], background: bool = True, plain: bool | None = None,
                 fold_rows: int | None = None, stack_share: float | None = None, settle: bool = False,
                 above: int | None = None):
        self.buckets = check_buckets([int(b) for b in buckets])
        # one graph for any row count from the largest bucket + 1 to ``above`` (dynamic, not padded)
        self.above = int(above) if above is not None and int(above) > self.buckets[-1] else None
        if self.above == self.buckets[-1] + 1:  # (one row count: a bucket like the others)
            self.buckets, self.above = self.buckets + [self.above], None
        self.settle = settle  # once a catalog's graphs are built, collect and freeze the heap (``heap``)
        self.fold_rows = None if fold_rows is None else int(fold_rows)  # None: by the bytes (``fold_plan``)
        self.layout = None  # ``FoldLayout`` of the folding buckets' inputs
        self.folds: set[int] = set()  # buckets whose graph takes the rows' folded adapters
        self.stack_layout = None  # ``StackLayout`` of the stacked buckets' inputs
        self.stacked: set[int] = set()  # buckets whose graph multiplies by the whole catalog's adapters
        self.stack_share = STACK_SHARE if stack_share is None else float(stack_share)  # 0: never (the operator)
        self.folded_steps = 0
        self.stacked_steps = 0
        self.background = background
        self.plain_option = plain  # None: on CUDA only (on a CPU the composed graph costs ~nothing more)
        cfg = torch._dynamo.config  # one cache entry per bucket on each step's own code object
        cfg.recompile_limit = max(cfg.recompile_limit, len(self.buckets) + 2)
        self.catalog = None  # the catalog the graphs are (being) built for
        self.ready: dict[int, object] = {}  # bucket -> compiled step
        self.plain: dict[int, object] = {}  # bucket -> compiled step of G alone
        self.seconds: dict[int, float] = {}  # bucket -> compile time
        self.plain_seconds: dict[int, float] = {}
        self.compiling: int | None = None
        self.error: str | None = None
        self.check_guards = not CAN_SKIP_GUARDS  # evaluate dynamo's guards at every step (tests; see the module doc)
        self.unguarded_steps = 0
        self.dynamic_steps = 0  # steps of the dynamic graph (``above``)
        self._lock = threading.Lock()
        self._calls = threading.Lock()  # held by a step under skipped guards and by a build's calls
        self._built = threading.Event()  # set when no build is under way
        self._built.set()

    # ---- building -----------------------------------------------------------------------------
    def build(self, c) -> None:
        """Capture ``c``'s decode step for every bucket (on a background thread unless built
        synchronously); the previous catalog's graphs are dropped."""
        with self._lock:
            self.catalog, self.ready, self.plain, self.seconds, self.plain_seconds, self.error = c, {}, {}, {}, {}, None
            self.layout, self.folds, self.stack_layout, self.stacked = None, set(), None, set()
            self._built.clear()
        if self.background:
            threading.Thread(target=self._build, args=(c,), name="constellation-compile", daemon=True).start()
        else:
            self._build(c)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the graphs being built are ready (True) or the timeout passes."""
        return self._built.wait(timeout)

    @torch.inference_mode()
    def _build(self, c) -> None:
        try:
            dev = c.g.device
            plain = self.plain_option if self.plain_option is not None else dev.type == "cuda"
            composed = CapturedStep(c.kernel, fold_k=c.settings.top_k if self.fold_rows != 0 else 0)
            folds, plains = self.fold_plan(c, composed.layout, plain)
            stacks = StackLayout.of(c.kernel)
            stacked = self.stack_plan(c, stacks, folds)
            steps = [(composed, [B for B in self.sizes if B not in stacked], self.ready, self.seconds, "")]
            if stacked:
                steps.append((CapturedStep(c.kernel, stacks=stacks), sorted(stacked), self.ready, self.seconds,
                              ", the catalog's adapters stacked"))
            if plains:
                steps.append((CapturedStep(c.kernel, plain=True), plains, self.plain, self.plain_seconds, ", G alone"))
            compiled = [(torch.compile(step, dynamic=False, fullgraph=True), step, *rest) for step, *rest in steps]
            jobs = [(fn, step, B, *rest) for fn, step, buckets, *rest in compiled for B in buckets]
            jobs.sort(key=lambda j: j[2] == self.above)  # (composed first: any row; the dynamic graph last)
            for fn, step, B, ready, seconds, what in jobs:
                if self.catalog is not c:
                    return
                fold, n = step.layout is not None and B in folds, self.traced_rows(B)
                extra = step.layout.zeros(n) if fold else step.stacks.zeros(n) if step.stacks else []
                t = self._compile(fn, step.group_shapes(), extra, B, dev, what)
                with self._lock:
                    if self.catalog is not c:
                        return
                    ready[B], seconds[B] = fn, t
                    if fold:
                        self.layout = step.layout
                        self.folds.add(B)
                    elif step.stacks is not None:
                        self.stack_layout = step.stacks
                        self.stacked.add(B)
        except Exception as e:  # noqa: BLE001 - the engine keeps decoding eagerly
            self.error = f"{type(e).__name__}: {e}"
            log.exception("capturing the decode step failed; decoding stays eager")
        finally:
            self.compiling = None
            if self.catalog is c:
                if self.settle:
                    heap.settle("decode steps captured")
                self._built.set()

    def fold_plan(self, c, layout, plain: bool) -> tuple[set[int], list[int]]:
        """The buckets whose graph folds the rows' adapters (``fold_rows``, or by the bytes a row's
        folded factors add to G's), and those that also get G's step alone (all with ``plain``)."""
        if not c.kernel.blocks:  # (no composed block: the composed step is G's already)
            return set(), []
        if layout is None:  # (nothing to fold)
            share, folds = 0.0, set()
        else:
            share = layout.row_bytes / max(held_bytes(c.g.params.values()), 1)
            if self.fold_rows is None:
                folds = {B for B in self.buckets if B <= FOLD_MAX_ROWS and B * share <= FOLD_SHARE}
            else:
                folds = {B for B in self.buckets if B <= self.fold_rows}
        plains = list(self.buckets) if plain else [B for B in self.buckets if B in folds and B * share > PLAIN_SHARE]
        log.info("decode graphs: adapters folded per row in buckets %s (a row's folded factors: %.1f%% of the "
                 "generalist's bytes); G's step alone for buckets %s", sorted(folds), 100 * share, plains)
        return folds, plains

    def stack_plan(self, c, layout, folds: set[int]) -> set[int]:
        """The buckets that do not fold and multiply every row by the whole catalog's adapters: all of
        them while the stacks are at most ``stack_share`` of G's bytes, else none."""
        if layout is None:  # (no composed block has adapters)
            return set()
        share = layout.nbytes / max(held_bytes(c.g.params.values()), 1)
        stacked = {B for B in self.sizes if B not in folds} if share <= self.stack_share else set()
        log.info("decode graphs: the catalog's adapters stacked in buckets %s (its stacks: %.1f%% of the "
                 "generalist's bytes, at most %.0f%%)", sorted(stacked), 100 * share, 100 * self.stack_share)
        return stacked

    def _compile(self, fn, shapes: list[tuple[int, int]], folded: list, B: int, dev: torch.device, what: str) -> float:
        """Compile (and on CUDA record) ``fn`` for ``B`` rows (the dynamic graph ``above``: for any row
        count above the largest bucket, traced at ``traced_rows``; ``folded`` at that count); its seconds."""
        self.compiling = B
        rows = self.rows_label(B) + f" row{'' if B == 1 else 's'}"
        what += ", adapters folded per row" if folded else ""
        log.info("compiling the decode step for %s (%s%s)...", rows, dev.type, what)
        t0 = time.perf_counter()
        dynamic = B == self.above
        B = self.traced_rows(B)
        ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        positions = torch.zeros(B, 1, dtype=torch.long, device=dev)  # (not ``ids``: guards see aliases)
        factors = [torch.ones(B, T, d, dtype=torch.float32, device=dev) for T, d in shapes]
        if dynamic:  # (one graph, guarded on largest + 1 <= rows <= above)
            for t in [ids, positions, *factors, *folded]:
                torch._dynamo.mark_dynamic(t, 0, min=self.buckets[-1] + 1, max=self.above)
        # (inductor reads some options outside ``torch.compile(options=...)``: patched around the compile)
        with step_context(StepContext(_NoAttention(), None, B)), torch._inductor.config.patch(compile_options(dev)), \
                self._calls:
            for _ in range(3):  # (CUDA graphs record on a later call than the first)
                _new_step(dev)
                fn(ids, positions, factors, folded)
        seconds = time.perf_counter() - t0
        log.info("compiled the decode step for %s%s in %.1f s", rows, what, seconds)
        return seconds

    # ---- serving ------------------------------------------------------------------------------
    def pick(self, c, rows: int, plain: bool, k: int = 0) -> tuple[int | None, bool]:
        """The bucket a step of ``rows`` rows of catalog ``c`` runs (None: eager), and whether it runs
        G alone: a ready plain graph when the rows are all G's (``plain``), else the composed one (a
        folding bucket only when no row composes more than its ``k`` sources)."""
        if c is not self.catalog or (c.g.device.type == "cuda" and not self._built.is_set()):
            return None, plain  # (on CUDA no replay while a build records: one graph-tree manager, two threads)
        fits = [b for b in self.sizes if b >= rows]
        if plain:  # (the smallest bucket ready, G's step alone if it has one)
            b = next((b for b in fits if b in self.plain or b in self.ready), None)
            if b in self.plain:
                return b, True
        b = next((b for b in fits if b in self.ready and (b not in self.folds or self.layout.foldable(k))), None)
        return b, plain and b is None  # (eager: plain rows run G's layers)

    def inputs(self, batch, B: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A ``BatchComposition``'s factors and (for a folding bucket) folded adapters for bucket ``B``."""
        key = B
        if B == self.above:  # (the dynamic graph: the rows as they are)
            B = batch.src.shape[0]
        factors = block_factors(batch.kernel, batch.params, B)
        if key in self.folds:
            return factors, self.layout.build(batch, B)
        return factors, (self.stack_layout.build(batch, B) if key in self.stacked else [])

    def run(self, B: int, ids: torch.Tensor, positions: torch.Tensor, factors: list[torch.Tensor], attention,
            composition: dict, plain: bool = False, folded: list[torch.Tensor] = ()) -> torch.Tensor:
        """Logits ``[B, V]`` of the captured step for ``ids``/``positions`` ``[R, 1]`` padded to ``B`` rows."""
        R = ids.shape[0]
        self.dynamic_steps += B == self.above
        if R < B and B != self.above:
            pad = ids.new_zeros(B - R, 1)
            ids, positions = torch.cat([ids, pad]), torch.cat([positions, pad])
        _new_step(ids.device)
        self.folded_steps += bool(folded) and B in self.folds
        self.stacked_steps += bool(folded) and B in self.stacked
        graph = (self.plain if plain else self.ready)[B]
        skip = not self.check_guards and self._calls.acquire(blocking=False)
        if skip and not self._built.is_set():  # (a build under way: it may call graphs, guards needed)
            self._calls.release()
            skip = False
        self.unguarded_steps += skip
        stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) if skip else nullcontext()
        try:
            with step_context(StepContext(attention, composition, R)), stance:
                return graph(ids, positions, factors, list(folded))
        finally:
            if skip:  # (no build can call a graph until this step ends)
                self._calls.release()

    @property
    def sizes(self) -> list[int]:
        """The graphs' row counts: the buckets, then ``above`` if any (the dynamic graph's largest)."""
        return self.buckets + ([self.above] if self.above else [])

    def traced_rows(self, B: int) -> int:
        """The rows a graph is traced at: its bucket's, or for the dynamic graph twice the largest
        bucket, at most ``above`` (its GEMMs are tuned at that count: a typical one above the buckets)."""
        return min(self.above, 2 * self.buckets[-1]) if B == self.above else B

    def rows_label(self, B: int) -> str:
        """A bucket's rows as the logs and ``status`` name them (the dynamic graph: its range)."""
        return f"{self.buckets[-1] + 1}-{B}" if B == self.above else str(B)

    def status(self) -> dict:
        """For /ready and the logs: buckets ready (with their compile seconds), the one compiling;
        ``plain``: the buckets with G's step alone too."""
        out = {"buckets": self.buckets, "built": self._built.is_set(), "ready": {self.rows_label(b): round(s, 1) for b, s in sorted(self.seconds.items())},
               "compiling": self.compiling, "error": self.error}
        if self.folds:
            out["folded"] = {"buckets": sorted(self.folds), "steps": self.folded_steps}
        if self.stacked:
            out["stacked"] = {"buckets": [self.rows_label(b) if b == self.above else b for b in sorted(self.stacked)],
                              "steps": self.stacked_steps}
        if self.above:
            out["above"] = {"rows": self.rows_label(self.above), "steps": self.dynamic_steps}
        if self.plain_seconds:
            out["plain"] = {str(b): round(s, 1) for b, s in sorted(self.plain_seconds.items())}
        return out
