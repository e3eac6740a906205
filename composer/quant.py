"""Weight-only quantization of the generalist's matrices: int8 and int4, through PyTorch's own
weight-packed kernels (``aten._weight_int8pack_mm``, ``aten._weight_int4pack_mm_for_cpu`` and, on
CUDA, ``aten._weight_int4pack_mm``), which inductor also lowers inside a captured step.

- **int8**: one scale per output channel, symmetric: ``W ≈ q * s`` with ``q`` in [-127, 127].
- **int4**: groups of ``group`` consecutive inputs per output channel, asymmetric, the layout the
  int4 kernels read: ``W ≈ (q - 8) * scale + zero`` with ``q`` in [0, 15] (``zero`` = the group's
  minimum + 8 ``scale``).

The products run with bf16 activations and scales whatever the model's dtype (``COMPUTE``): the
kernels' vectorised paths take bf16 (on an AVX2 CPU their fp32 path is scalar, ~10x slower,
docs/precision.md), and the result returns in the activations' dtype. The embedding and the output
head are held in int8 in both formats (the head's error reaches every logit; llama.cpp keeps it at
more bits too); an embedding row is dequantized when it is looked up.

A ``QuantizedWeight`` stands where the matrix stood in the model's tensor dict: it has the matrix's
``shape`` and ``dtype`` (the dtype its products return), and ``composer.linear.linear_with``
multiplies through it. A fused group's members (q/k/v, gate/up: ``Transformer.fuse``) are row
blocks of one quantized whole (``rows``), as the full-precision members are views of one matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

FORMATS = ("bf16", "int8", "int4")  # [runtime].weights: "bf16" = not quantized ([runtime].dtype)
# int8 on a CPU, by rows (docs/benchmarks.md, "int8 at 8 and 16 rows"): below ``SPLIT_ROWS`` the packed
# kernel (``_weight_int8pack_mm``, near the memory bandwidth at one row); from ``SPLIT_ROWS`` the
# activations split into two int8 terms and multiplied by the int8 matrix on the VNNI integer GEMM
# (``_split_int8_mm``; the packed kernel is built for a few rows); eagerly from ``DEQUANT_ROWS``
# (prefill chunks) the matrix dequantized to bf16 and bf16's GEMM. int4 always runs its kernel (its
# unpacking costs more than the kernel's slowness), and so does a captured step (inductor lowers it).
SPLIT_ROWS = 8
DEQUANT_ROWS = 128
INT4_GROUPS = (32, 64, 128)
COMPUTE = torch.bfloat16


class QuantizeError(ValueError):
    """A matrix or model this quantization cannot hold."""


class QuantizedWeight:
    """A ``[out, in]`` matrix held quantized (see the module doc). ``dtype``: what its products and
    dequantized copies are returned in (the model's dtype). ``base``/``row0``: for a row block of a
    fused whole, that whole and where the block starts."""

    def __init__(self, fmt: str, data: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int],
                 dtype: torch.dtype, group: int | None = None, base: "QuantizedWeight | None" = None,
                 row0: int = 0):
        self.fmt, self.data, self.scales, self.group = fmt, data, scales, group
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.base, self.row0 = base, row0
        self._int4_unpack = False  # int4: its packing recognised (``_unpack_int4``), set by ``quantize_int4``

    # ---- what code written for tensors asks --------------------------------------------------
    ndim = 2

    def dim(self) -> int:
        return 2

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes held (a row block holds nothing of its own)."""
        if self.base is not None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales))

    def tensors(self) -> list[torch.Tensor]:
        """The tensors holding it (a row block's: its whole's)."""
        return [self.data, self.scales]

    def __repr__(self) -> str:
        g = f", group {self.group}" if self.group else ""
        part = f", rows {self.row0}..{self.row0 + self.shape[0]} of {tuple(self.base.shape)}" if self.base else ""
        return f"QuantizedWeight({self.fmt}{g}, {tuple(self.shape)}{part})"

    # ---- products ----------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T (+ bias)`` in ``x``'s dtype, the product in bf16 through the packed kernel."""
        if self.base is not None:  # a member used apart from its group: the whole, then its rows
            y = self.base.linear(x)[..., self.row0:self.row0 + self.shape[0]]
            return y if bias is None else y + bias
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(COMPUTE)
        rows = x2.shape[0]
        # (a graph traced for a range of row counts must not branch on them: ``is_compiling`` first, and
        # the split only where the whole range is ``SPLIT_ROWS`` or more, no guard splitting the range)
        if self.fmt == "int8" and not torch.compiler.is_compiling() and rows >= DEQUANT_ROWS:
            y = F.linear(x2, self.unpacked(COMPUTE))
        elif self.fmt == "int8" and statically_known_true(rows >= SPLIT_ROWS) and self.device.type == "cpu":
            y = _split_int8_mm(x2, self.data, self.scales)
        elif self.fmt == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.data, self.scales)
        elif self.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.data, self.group, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.data, self.group, self.scales)
        y = y.to(x.dtype).reshape(*lead, self.shape[0])
        return y if bias is None else y + bias

    @property
    def can_unpack(self) -> bool:
        """Whether the matrix can be rebuilt without the kernel (int8 always; int4 where its CPU packing
        was recognised at quantization, ``_unpack_int4``)."""
        return self.fmt == "int8" or self._int4_unpack

    def unpacked(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized matrix in ``dtype``, rebuilt from the stored values by plain tensor ops."""
        if self.fmt == "int8":
            return self.data.to(dtype) * self.scales.to(dtype)[:, None]
        n, k = self.shape
        q = _unpack_int4(self.data, n, k).to(torch.float32).view(n, k // self.group, self.group)
        sz = self.scales.to(torch.float32)  # [k / group, n, 2]
        w = (q - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]
        return w.view(n, k).to(dtype)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` dequantized (int8 only: what embeddings are held in)."""
        if self.fmt != "int8" or self.base is not None:
            raise QuantizeError(f"an embedding lookup needs a whole int8 matrix, not {self!r}")
        return (self.data[ids].to(torch.float32) * self.scales[ids].to(torch.float32)[..., None]).to(self.dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The matrix the products use, as a dense tensor (tests and references)."""
        if self.base is not None:
            return self.base.dequantize(dtype)[self.row0:self.row0 + self.shape[0]]
        if self.can_unpack:
            return self.unpacked(torch.float32).to(dtype)
        eye = torch.eye(self.shape[1], dtype=torch.float32, device=self.device)  # (products rounded to bf16)
        return self.linear(eye).to(dtype).t().contiguous()

    # ---- structure ---------------------------------------------------------------------------
    def rows(self, start: int, n: int) -> "QuantizedWeight":
        """Rows ``start .. start + n`` (a fused group's member)."""
        return QuantizedWeight(self.fmt, self.data, self.scales, (n, self.shape[1]), self.dtype, self.group,
                               self, start)

    def with_tensors(self, data: torch.Tensor, scales: torch.Tensor) -> "QuantizedWeight":
        """The same matrix over other tensors holding the same values (a captured graph's parameters;
        a row block: its whole over them, then the block)."""
        if self.base is not None:
            return self.base.with_tensors(data, scales).rows(self.row0, self.shape[0])
        out = QuantizedWeight(self.fmt, data, scales, tuple(self.shape), self.dtype, self.group)
        out._int4_unpack = self._int4_unpack
        return out


def _split_int8_mm(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x @ (q * s[:, None]).T`` in ``x``'s dtype through the integer GEMM (``torch._int_mm``):
    each row of ``x`` as two int8 terms, ``x ≈ s1 q1 + s2 q2`` (``s1`` = the row's largest
    magnitude / 127, ``q2`` the remainder at ``s2 = s1 / 254``), both multiplied by ``q`` in one
    product of ``2m`` rows with exact int32 sums. The terms reproduce ``x`` within its row's largest
    magnitude / 64516, about a hundredth of bf16's rounding there, so the result is the packed
    kernel's within bf16 rounding (tests/test_quant.py); one term alone would not be (per-row
    activation quantization: 2-4 % on a row with one large value)."""
    xf = x.to(torch.float32)
    s1 = xf.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127
    q1 = torch.round(xf / s1)
    s2 = s1 / 254
    q2 = torch.round((xf - q1 * s1) / s2).clamp_(-127, 127)
    acc = torch._int_mm(torch.cat([q1, q2]).to(torch.int8), q.t()).to(torch.float32)
    m = x.shape[0]
    return ((acc[:m] * s1 + acc[m:] * s2) * s.to(torch.float32)).to(x.dtype)


def _unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The ``[n, k]`` int4 values of ``_convert_weight_to_int4pack_for_cpu``'s layout as found in
    PyTorch 2.x on x86 for ``n`` a multiple of 64: blocks of 64 output rows, per input a byte per
    row pair, the block's first 32 rows in the low nibbles and the next 32 in the high ones. Used
    only where ``quantize_int4`` verified it on the matrix itself."""
    v = packed.reshape(n // 64, k, 32)
    return torch.cat([v & 15, v >> 4], -1).permute(0, 2, 1).reshape(n, k)


def quantize_int8(w: torch.Tensor, dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Per-output-channel symmetric int8 of ``w`` ``[out, in]``."""
    w32 = w.detach().to(torch.float32)
    s = (w32.abs().amax(1) / 127).clamp(min=1e-12)
    s = s.to(COMPUTE)  # the kernel's scale dtype; quantize against the rounded scale
    q = torch.round(w32 / s.to(torch.float32)[:, None]).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", q.contiguous(), s.contiguous(), tuple(w.shape), dtype or w.dtype)


def quantize_int4(w: torch.Tensor, group: int, dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Group-wise asymmetric int4 of ``w`` ``[out, in]``, packed for the device's int4 kernel."""
    n, k = w.shape
    if group not in INT4_GROUPS:
        raise QuantizeError(f"int4 group size {group}: choose from {', '.join(map(str, INT4_GROUPS))}")
    if k % group:
        fits = [g for g in INT4_GROUPS if k % g == 0]
        raise QuantizeError(f"int4 group size {group} does not divide a matrix's {k} inputs "
                            f"(shape {tuple(w.shape)}); group sizes that do: {fits or 'none'}")
    if n % 16:
        raise QuantizeError(f"the int4 kernels take matrices of a multiple of 16 output rows, not {n} "
                            f"(shape {tuple(w.shape)}); use int8")
    g = w.detach().to(torch.float32).reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(COMPUTE).to(torch.float32)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(COMPUTE)  # [k / group, n, 2]
    if w.device.type == "cuda":
        tiles = max(t for t in (1, 2, 4, 8) if k % (16 * t) == 0)  # the kernel's inner k-tiles
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    out = QuantizedWeight("int4", packed, sz, (n, k), dtype or w.dtype, group)
    out._int4_unpack = (w.device.type == "cpu" and n % 64 == 0 and packed.numel() * 2 == n * k
                        and torch.equal(_unpack_int4(packed, n, k).to(torch.int32), q))
    return out


def quantize(w: torch.Tensor, fmt: str, group: int = 32, dtype: torch.dtype | None = None) -> QuantizedWeight:
    if fmt == "int8":
        return quantize_int8(w, dtype)
    if fmt == "int4":
        return quantize_int4(w, group, dtype)
    raise QuantizeError(f"unknown quantized format {fmt!r} (int8, int4)")


def is_quantized(t) -> bool:
    return isinstance(t, QuantizedWeight)


def dense(t) -> torch.Tensor:
    """``t`` as a dense tensor (a quantized matrix dequantized in its dtype)."""
    return t.dequantize(t.dtype) if isinstance(t, QuantizedWeight) else t


def embedding(ids: torch.Tensor, w) -> torch.Tensor:
    return w.embedding(ids) if isinstance(w, QuantizedWeight) else F.embedding(ids, w)


def quantize_model(g, fmt: str, group: int = 32, step=None) -> None:
    """Quantize ``g`` (a ``composer.model.Transformer``, already fused) in place: every decoder-layer
    matrix to ``fmt`` (a fused group as one whole, its members row blocks of it), the embedding and
    an untied output head to int8; vectors (norms, biases) stay as they are. ``step()`` is called once
    per layer (a progress bar)."""
    if fmt not in ("int8", "int4"):
        raise QuantizeError(f"unknown quantized format {fmt!r} (int8, int4)")
    if g.mc.family != "llama":
        raise QuantizeError(f"{g.mc.architecture}: quantized weights need a Llama-family model (its linear "
                            "layers' layout); this one is served in full precision only")
    arch = g.arch
    for i in range(g.mc.n_layers):
        layer, updates, grouped = g.layer(i), {}, set()
        for modules, (w, _) in layer.fused.items():
            whole, row = quantize(w, fmt, group, g.dtype), 0
            for m in modules:
                n = layer.t[m + ".weight"].shape[0]
                updates[arch.layer_name(i, m + ".weight")] = whole.rows(row, n)
                grouped.add(m + ".weight")
                row += n
        for s, t in layer.t.items():
            if s not in grouped and isinstance(t, torch.Tensor) and t.dim() == 2:
                updates[arch.layer_name(i, s)] = quantize(t, fmt, group, g.dtype)
        g.replace_params(updates)  # this layer's full-precision matrices are released here
        if step is not None:
            step()
    heads = {arch.embed} | ({arch.lm_head} if arch.lm_head in g.params else set())
    g.replace_params({n: quantize_int8(g.params[n]) for n in heads if isinstance(g.params[n], torch.Tensor)})
    g.packed.clear()
    g.weights_format, g.weights_group = fmt, (group if fmt == "int4" else None)


def held_bytes(tensors, seen: set[int] | None = None) -> int:
    """Bytes of the storages behind ``tensors`` (a quantized weight: its packed tensors), each storage
    counted once (also across calls that share ``seen``)."""
    seen = set() if seen is None else seen
    total = 0
    for t in [x for t in tensors for x in (t.tensors() if isinstance(t, QuantizedWeight) else [t])]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
