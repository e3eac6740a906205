"""Matrix products the decoder runs: which CPU kernel family serves a bf16 product, oneDNN's
prepacked weights, and the fused-weight check (q/k/v or gate/up as row blocks of one tensor)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from . import gemv_kernel
from .quant import QuantizedWeight


# bf16 matmuls of at most this many rows run on ATen's own CPU kernels, larger ones on oneDNN's: on
# the CPU measured oneDNN took ~2.5x as long for one row and ATen ~4x as long for 16 (docs/precision.md).
ATEN_MAX_ROWS = 2


@contextmanager
def matmul_kernels(rows: int, dtype: torch.dtype, device: torch.device, aten_max_rows: int = ATEN_MAX_ROWS):
    """Route the CPU's bf16 matmuls of a ``rows``-row forward to the faster kernel family (oneDNN
    stays off if the process turned it off). The switch is process-wide: one thread runs the model.
    Under ``torch.compile`` it does nothing (enter it around the compiled call instead)."""
    if (dtype != torch.bfloat16 or device.type != "cpu" or rows > aten_max_rows or torch.compiler.is_compiling()
            or not torch.backends.mkldnn.enabled):
        yield
        return
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = True


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN's prepacked matmul serves this dtype on this device (CPU fp32, and bf16 where
    oneDNN has native bf16)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_weight(w: torch.Tensor, conv: bool = False) -> torch.Tensor:
    """``w`` (``[out, in]``; ``conv``: GPT-2's ``[in, out]``) in oneDNN's prepacked layout (an opaque
    tensor ``packed_linear`` multiplies with)."""
    return torch.ops.mkldnn._reorder_linear_weight((w.t() if conv else w).contiguous())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def linear_with(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, conv: bool,
                packed: dict[int, torch.Tensor] | None) -> torch.Tensor:
    """``x`` through weight ``w`` (and ``bias``): a quantized matrix through its kernel, one or two rows
    against a CPU bf16 matrix through ``composer.gemv_kernel``, else its prepacked copy in ``packed``
    (by ``id(w)``) if there is one, else ``F.linear`` (``x @ w`` for a ``conv`` layout)."""
    if isinstance(w, QuantizedWeight):
        return w.linear(x, bias)
    if not conv and gemv_kernel.usable(x, w):
        y = gemv_kernel.gemv(x, w)
        return y if bias is None else y + bias
    p = packed.get(id(w)) if packed else None
    if p is not None:
        return packed_linear(x, p, bias)
    if conv:
        y = x @ w
        return y if bias is None else y + bias
    return F.linear(x, w, bias)


def fused_base(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor whose consecutive row blocks ``parts`` are (as ``Transformer.fuse`` leaves them), or None.
    Quantized parts: the quantized whole they are the row blocks of (``QuantizedWeight.rows``)."""
    if any(isinstance(p, QuantizedWeight) for p in parts):
        base = parts[0].base if isinstance(parts[0], QuantizedWeight) else None
        row = 0
        for p in parts:
            if not isinstance(p, QuantizedWeight) or p.base is not base or p.row0 != row:
                return None
            row += p.shape[0]
        return base if base is not None and row == base.shape[0] else None
    base = parts[0]._base
    if base is None or not base.is_contiguous() or any(p._base is not base or not p.is_contiguous() for p in parts):
        return None
    offset = base.storage_offset()
    for p in parts:
        if p.storage_offset() != offset:
            return None
        offset += p.numel()
    return base if offset == base.storage_offset() + base.numel() else None
