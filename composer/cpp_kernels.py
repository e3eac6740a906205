"""What the project's small C++ CPU kernels share (``decode_kernel``, ``gemv_kernel``): compiled by
PyTorch's inductor (``CppPythonBindingsCodeCache``: the compiler, flags, vector ISA and on-disk cache
``torch.compile`` uses for its own CPU kernels), once per key and process, on first use; a kernel
that cannot be built (no compiler, an unsupported platform) is remembered, its reason logged once,
and its callers keep their PyTorch path."""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Callable, Hashable

import torch

log = logging.getLogger(__name__)


@functools.cache
def vector_width() -> int:
    """fp32 lanes of ``at::vec::Vectorized<float>`` in the kernels inductor compiles for this CPU (8,
    its generic width, where inductor picks no vector ISA)."""
    from torch._inductor import cpu_vec_isa
    isa = cpu_vec_isa.pick_vec_isa()
    return isa.nelements(torch.float32) if isa else 8


def compile_binding(args: list[str], source: str, what: str):
    """``source``'s ``extern "C" kernel`` with C parameter types ``args``, callable from Python with
    tensors (their data pointers) and numbers; how long it took is logged as ``what``."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache
    t0 = time.perf_counter()
    fn = CppPythonBindingsCodeCache.load_pybinding(args, source)
    log.info("%s ready in %.1f s", what, time.perf_counter() - t0)
    return fn


class KernelCache:
    """``get(key)``: the kernel ``build(key)`` made, built once (under a lock, the first caller), or None
    where building failed (``failed[key]`` says why; the warning names ``what`` and ``fallback``)."""

    def __init__(self, what: str, fallback: str, build: Callable[[Hashable], object]):
        self.what, self.fallback, self.build = what, fallback, build
        self.kernels: dict = {}
        self.failed: dict = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable):
        fn = self.kernels.get(key)
        if fn is not None or key in self.failed:
            return fn
        with self._lock:
            if key not in self.kernels and key not in self.failed:
                try:
                    self.kernels[key] = self.build(key)
                except Exception as e:  # no compiler, an unsupported platform: the callers' PyTorch path
                    self.failed[key] = f"{type(e).__name__}: {e}"
                    log.warning("%s unavailable (%s); using %s", self.what, self.failed[key], self.fallback)
        return self.kernels.get(key)
