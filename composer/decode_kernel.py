"""A CPU kernel for a decode step's attention: one query per row over each row's own cached keys.

The plain-PyTorch path (``composer.attention.one_query_attention_bias``) costs a dozen operators per
layer: upcast copies of the keys and values, a batched matmul of ``rows x H_kv`` tiny products, the
softmax, a second batched matmul and the writes of the new keys/values. On a 2-core CPU that was
~290 µs a layer at 16 rows of 100 positions, where reading their bf16 keys and values takes ~40 µs;
this kernel takes ~100 (docs/benchmarks.md). It does the whole layer in one call: for every
(row, key/value head) it writes the row's new key and value at its position, scores the head's group
of queries against the row's keys in fp32 (``at::vec``), takes the softmax and sums the values, then
rounds once to the cache's dtype; the (row, head) pairs run in parallel on PyTorch's own OpenMP
threads.

It is C++ compiled by PyTorch's inductor (``CppPythonBindingsCodeCache``: the compiler, flags, vector
ISA and on-disk cache ``torch.compile`` uses for its own CPU kernels), once per (dtype, head width,
query heads per key/value head), on first use. ``available(device, dtype, head_dim, group)`` says
whether it can run (a CPU cache, a C++ compiler, a head width that is a whole number of vectors);
otherwise callers keep the PyTorch path, which also runs on CUDA.
"""

from __future__ import annotations

import os

import torch

from .cpp_kernels import KernelCache, compile_binding, vector_width

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <cstring>
#include <vector>

using VF = at::vec::Vectorized<float>;

static inline VF ld(const float* p) { return VF::loadu(p); }
template <typename T> static inline VF ld(const T* p) { VF o; at::vec::load_to_float<T>(p, o); return o; }

// q [B, H, D]; kn, vn [B, KV, D] (the rows' new keys/values); kc, vc the layer's cache;
// meta [B, 3]: a row's offset of head 0, position 0 in the cache; the stride between heads; its
// positions after this step (the new key/value goes at position n - 1). out [B, H, D].
extern "C" void kernel(const T* q, const T* kn, const T* vn, T* kc, T* vc, const int64_t* meta, T* out,
                       int64_t B, int64_t KV, float scale) {
    constexpr int64_t W = VF::size();
    const int64_t H = G * KV;
    #pragma omp parallel for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * KV; ++task) {
        const int64_t b = task / KV, j = task % KV;
        const int64_t base = meta[3 * b], stride = meta[3 * b + 1], n = meta[3 * b + 2];
        T* K = kc + base + j * stride;
        T* V = vc + base + j * stride;
        std::memcpy(K + (n - 1) * D, kn + (b * KV + j) * D, D * sizeof(T));
        std::memcpy(V + (n - 1) * D, vn + (b * KV + j) * D, D * sizeof(T));
        thread_local std::vector<float> work;
        if ((int64_t)work.size() < G * n) work.resize(G * n);
        float* s = work.data();            // [G, n] scores, then probabilities
        const T* qrow = q + (b * H + j * G) * D;
        VF qv[G][D / W];                   // the queries, scaled, in fp32
        for (int64_t g = 0; g < G; ++g)
            for (int64_t c = 0; c < D / W; ++c) qv[g][c] = ld(qrow + g * D + c * W) * VF(scale);
        for (int64_t t = 0; t < n; ++t) {
            const T* k = K + t * D;
            VF kv[D / W];
            for (int64_t c = 0; c < D / W; ++c) kv[c] = ld(k + c * W);
            for (int64_t g = 0; g < G; ++g) {
                VF acc = kv[0] * qv[g][0];
                for (int64_t c = 1; c < D / W; ++c) acc = at::vec::fmadd(kv[c], qv[g][c], acc);
                s[g * n + t] = at::vec::vec_reduce_all<float>([](VF& x, VF& y) { return x + y; }, acc);
            }
        }
        float total[G];
        for (int64_t g = 0; g < G; ++g) {
            float* sg = s + g * n;
            float m = -std::numeric_limits<float>::infinity();
            for (int64_t t = 0; t < n; ++t) m = std::max(m, sg[t]);
            VF vm(m), sum(0.f);
            int64_t t = 0;
            for (; t + W <= n; t += W) { VF e = (VF::loadu(sg + t) - vm).exp(); e.store(sg + t); sum = sum + e; }
            float tot = at::vec::vec_reduce_all<float>([](VF& x, VF& y) { return x + y; }, sum);
            for (; t < n; ++t) { sg[t] = std::exp(sg[t] - m); tot += sg[t]; }
            total[g] = tot;
        }
        VF o[G][D / W];
        for (int64_t g = 0; g < G; ++g)
            for (int64_t c = 0; c < D / W; ++c) o[g][c] = VF(0.f);
        for (int64_t t = 0; t < n; ++t) {
            const T* v = V + t * D;
            VF vv[D / W];
            for (int64_t c = 0; c < D / W; ++c) vv[c] = ld(v + c * W);
            for (int64_t g = 0; g < G; ++g) {
                VF p(s[g * n + t]);
                for (int64_t c = 0; c < D / W; ++c) o[g][c] = at::vec::fmadd(p, vv[c], o[g][c]);
            }
        }
        T* orow = out + (b * H + j * G) * D;
        float buf[W];
        for (int64_t g = 0; g < G; ++g) {
            VF inv(1.f / total[g]);
            for (int64_t c = 0; c < D / W; ++c) {
                (o[g][c] * inv).store(buf);
                for (int64_t i = 0; i < W; ++i) orow[g * D + c * W + i] = static_cast<T>(buf[i]);
            }
        }
    }
}
"""

_CTYPES = {torch.float32: "float", torch.bfloat16: "at::BFloat16", torch.float16: "at::Half"}
_MAX_GROUP = 16  # query heads per key/value head (the kernel keeps a group's queries in registers)
_MAX_HEAD = 256

Key = tuple[torch.dtype, int, int]  # dtype, head width, query heads per key/value head
# off: CONSTELLATION_DECODE_KERNEL=0 (to compare with, or debug against, the PyTorch path; tests switch it)
enabled = os.environ.get("CONSTELLATION_DECODE_KERNEL", "1") != "0"


def _build(key: Key):
    dtype, head_dim, group = key
    ct = _CTYPES[dtype]
    source = f"using T = {ct};\nconstexpr int64_t D = {head_dim}, G = {group};\n" + _SOURCE
    args = [f"const {ct}*", f"const {ct}*", f"const {ct}*", f"{ct}*", f"{ct}*", "const int64_t*", f"{ct}*",
            "int64_t", "int64_t", "float"]
    return compile_binding(args, source, f"decode attention kernel {key}")


_cache = KernelCache("decode attention kernel", "PyTorch operators", _build)
_kernels = _cache.kernels
_kernel = _cache.get


_usable: dict[tuple, bool] = {}


def available(device, dtype: torch.dtype, head_dim: int, group: int) -> bool:
    """Whether the kernel can run a cache on ``device`` in ``dtype`` with heads ``head_dim`` wide and
    ``group`` query heads per key/value head (compiling it on first use, ~1 s, then cached on disk)."""
    key = (enabled, torch.device(device).type, dtype, head_dim, group)
    ok = _usable.get(key)
    if ok is None:
        ok = _usable[key] = _available(*key[1:])
    return ok


def _available(device: str, dtype: torch.dtype, head_dim: int, group: int) -> bool:
    if (not enabled or device != "cpu" or dtype not in _CTYPES
            or not 1 <= group <= _MAX_GROUP or head_dim > _MAX_HEAD):
        return False
    try:
        if head_dim % vector_width():
            return False
    except Exception:  # inductor cannot tell the vector ISA here
        return False
    return _kernel((dtype, head_dim, group)) is not None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
           meta: torch.Tensor, scale: float) -> torch.Tensor:
    """Write each row's ``k``/``v`` ``[B, H_kv, 1, D]`` into the cache at the places ``meta`` gives
    (``[B, 3]`` int64: offset of the row's head 0, stride between its heads, positions after the
    write) and attend its query ``q`` ``[B, H, 1, D]``; the result is ``[B, H, 1, D]`` in ``q``'s dtype.
    ``available`` must have said yes for the cache's dtype and these shapes."""
    dtype = cache_k.dtype
    B, H, _, D = q.shape
    kv = k.shape[1]
    fn = _kernels[(dtype, D, H // kv)]
    qc, kc, vc = (t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous() for t in (q, k, v))
    out = torch.empty((B, H, 1, D), dtype=dtype, device=q.device)
    fn(qc, kc, vc, cache_k, cache_v, meta, out, B, kv, float(scale))
    return out if dtype == q.dtype else out.to(q.dtype)
