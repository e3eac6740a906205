"""A CPU kernel for eager products of one or two rows against a bf16 matrix: a decode step's products.

A decode step of one row multiplies a single activation row by every matrix of the model, so its
speed is how fast those matrices stream from memory (~0.27 GB a token for the demo in bf16, ~33-36
GB/s on this machine class's two cores). Called eagerly, oneDNN's prepacked kernel read the demo's
matrices at ~20 GB/s at one row and ATen's ``F.linear`` at ~14 (docs/benchmarks.md, "Eager one-row
products on a kernel of our own"). This kernel reads each matrix once, front to back, in its own
row-major layout (no second copy): each output is one matrix row's dot product with the activation
row(s), two fp32 accumulators a row (``at::vec``: AVX512 or AVX2, whatever inductor's vector ISA
is), rounded once to the output's dtype; the matrix rows are split between PyTorch's OpenMP threads.
The demo's eager one-row decode step: 21.2-21.8 ms -> 14.0-15.7.

Eager only: inside a captured step inductor's own products already stream at the bandwidth, and the
same step with the kernel in it as an operator was slower (10.0-12.0 against 8.2-8.3 ms at one row:
~8 us a call through the dispatcher and Python, 121 calls). It is C++ compiled by PyTorch's inductor
(``CppPythonBindingsCodeCache``, as ``decode_kernel``), once per process and dtype, on first use
(then cached on disk), and called from Python (``gemv``); ``composer.linear.linear_with`` routes
products of at most ``MAX_ROWS`` rows to it where ``usable`` says so. Off: ``CONSTELLATION_GEMV_KERNEL=0``.
"""

from __future__ import annotations

import os

import torch

from .cpp_kernels import KernelCache, compile_binding, vector_width

# rows up to which the kernel beats oneDNN's eager calls on the demo's shapes (a step's 121 products:
# 1 row 8.7 against 13.4 ms, 2 rows 8.9 against 14.2; 4 rows 16.4 against 11.7, docs/benchmarks.md)
MAX_ROWS = 2

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <cstdint>

using VF = at::vec::Vectorized<float>;

// y [M, N] = x [M, K] . w [N, K]^T, fp32 accumulation; K a multiple of 2 vectors, M <= MR.
extern "C" void kernel(const T* x, const T* w, T* y, int64_t M, int64_t N, int64_t K) {
    constexpr int64_t W = VF::size();
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const T* wr = w + n * K;
        VF a0[MR], a1[MR];
        for (int64_t m = 0; m < MR; ++m) { a0[m] = VF(0.f); a1[m] = VF(0.f); }
        for (int64_t k = 0; k < K; k += 2 * W) {
            VF w0, w1;
            at::vec::load_to_float<T>(wr + k, w0);
            at::vec::load_to_float<T>(wr + k + W, w1);
            for (int64_t m = 0; m < MR; ++m) {
                if (m < M) {
                    VF x0, x1;
                    at::vec::load_to_float<T>(x + m * K + k, x0);
                    at::vec::load_to_float<T>(x + m * K + k + W, x1);
                    a0[m] = at::vec::fmadd(x0, w0, a0[m]);
                    a1[m] = at::vec::fmadd(x1, w1, a1[m]);
                }
            }
        }
        for (int64_t m = 0; m < M; ++m)
            y[m * N + n] = static_cast<T>(
                at::vec::vec_reduce_all<float>([](VF& p, VF& q) { return p + q; }, a0[m] + a1[m]));
    }
}
"""

_CTYPES = {torch.bfloat16: "at::BFloat16"}
# off: CONSTELLATION_GEMV_KERNEL=0 (to compare with, or debug against, oneDNN's products; tests switch it)
enabled = os.environ.get("CONSTELLATION_GEMV_KERNEL", "1") != "0"


def _build(dtype: torch.dtype):
    vector_width()  # (raises where inductor cannot tell the CPU's vector ISA)
    ct = _CTYPES[dtype]
    source = f"using T = {ct};\nconstexpr int64_t MR = {MAX_ROWS};\n" + _SOURCE
    args = [f"const {ct}*", f"const {ct}*", f"{ct}*", "int64_t", "int64_t", "int64_t"]
    return compile_binding(args, source, f"few-row product kernel ({dtype})")


_cache = KernelCache("few-row product kernel", "oneDNN's", _build)
_kernels = _cache.kernels
_kernel = _cache.get


def available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the kernel serves ``dtype`` on a ``device_type`` device (compiling it on first use, ~1 s)."""
    return enabled and device_type == "cpu" and dtype in _CTYPES and _kernel(dtype) is not None


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``x @ w.T`` runs on the kernel: outside a graph being compiled (inductor's own products
    of a captured step already read the matrices at the memory bandwidth, and the operator's call
    costs more than the kernel saves there), a CPU bf16 matrix in its row-major layout, ``x`` in its
    dtype and width (the kernel reads ``K`` of each), at most ``MAX_ROWS`` rows, rows a whole number of
    the kernel's vector pairs long."""
    if torch.compiler.is_compiling() or not enabled or type(w) not in (torch.Tensor, torch.nn.Parameter):
        return False
    if not (w.dim() == 2 and x.shape[-1:] == w.shape[1:] and x.dtype == w.dtype and w.is_contiguous()
            and x.device == w.device):
        return False
    if not available(w.device.type, w.dtype) or w.shape[1] % (2 * vector_width()):
        return False
    return x.numel() // max(1, x.shape[-1]) <= MAX_ROWS


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` (``x`` ``[..., K]``, ``w`` ``[N, K]``) on the kernel; ``usable(x, w)`` must hold.
    (A decode step calls this ~120 times: plain attribute work only, ~4 us a call with the kernel's 2.)"""
    N, K = w.shape
    if not x.is_contiguous():
        x = x.contiguous()
    M = x.numel() // K
    if M > MAX_ROWS:  # (the kernel keeps MAX_ROWS rows' sums in registers)
        return torch.nn.functional.linear(x, w)
    y = x.new_empty((*x.shape[:-1], N))
    _kernels[w.dtype](x, w, y, M, N, K)
    return y
