"""The few-row product kernel (``composer.gemv_kernel``): its products against fp32, when products take
it (eagerly, one or two rows; never inside a captured graph)."""

import pytest
import torch
import torch.nn.functional as F

from composer import gemv_kernel
from composer.linear import linear_with

BF16 = torch.bfloat16
needs_kernel = pytest.mark.skipif(not gemv_kernel.available("cpu", BF16),
                                  reason="no C++ compiler or vector ISA for inductor's CPU kernels here")


def _width() -> int:
    return 2 * gemv_kernel.vector_width()


@needs_kernel
@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (37, 64), (4099, 32)])
@pytest.mark.parametrize("lead", [(1,), (2,), (1, 1), (2, 1)])
def test_products_equal_fp32_rounded_once(shape, lead):
    """Each output is the fp32 dot product rounded once to bf16 (sums in another order: within a
    rounding step of the correctly rounded value, never more)."""
    if shape[1] % _width():
        pytest.skip("rows not a whole number of this CPU's vector pairs")
    g = torch.Generator().manual_seed(sum(shape) + len(lead))
    w = (torch.randn(shape, generator=g) * 0.05).to(BF16)
    x = torch.randn(*lead, shape[1], generator=g).to(BF16)
    assert gemv_kernel.usable(x, w)
    y = gemv_kernel.gemv(x, w)
    assert y.shape == (*lead, shape[0]) and y.dtype == BF16
    ref = x.float() @ w.float().t()
    step = ref.abs() * 2 ** -7 + 1e-5  # one bf16 step (8 significant bits) at the value's magnitude, or fp32's sums
    assert ((y.float() - ref).abs() <= step).all()
    assert (y == ref.to(BF16)).float().mean() > 0.95  # nearly always the correctly rounded value itself


@needs_kernel
def test_which_products_take_the_kernel(monkeypatch):
    w = torch.randn(64, 64).to(BF16)
    one, three = torch.randn(1, 64).to(BF16), torch.randn(3, 64).to(BF16)
    assert gemv_kernel.usable(one, w) and gemv_kernel.usable(torch.randn(2, 1, 64).to(BF16), w)
    assert not gemv_kernel.usable(three, w)  # more rows than MAX_ROWS: oneDNN's GEMM
    assert not gemv_kernel.usable(one.float(), w.float())  # fp32: not served
    assert not gemv_kernel.usable(one, torch.randn(64, 128).to(BF16).t())  # not row-major
    assert not gemv_kernel.usable(torch.randn(1, 32).to(BF16), w)  # widths differ: F.linear's error, not a read past x
    assert not gemv_kernel.usable(torch.randn(1, 40).to(BF16), torch.randn(8, 40).to(BF16))  # 40: no vector pairs
    monkeypatch.setattr(gemv_kernel, "enabled", False)
    assert not gemv_kernel.usable(one, w)


@needs_kernel
def test_linear_with_routes_one_and_two_rows_to_the_kernel(monkeypatch):
    calls = []
    kernel = gemv_kernel._kernels[BF16]
    monkeypatch.setitem(gemv_kernel._kernels, BF16, lambda *a: calls.append(a[3]) or kernel(*a))
    w, b = torch.randn(96, 64).to(BF16), torch.randn(96).to(BF16)
    for rows in (1, 2, 3):
        x = torch.randn(rows, 64).to(BF16)
        y = linear_with(x, w, b, False, None)
        assert torch.allclose(y.float(), F.linear(x, w, b).float(), rtol=2 ** -7, atol=1e-2)
    assert calls == [1, 2]


@needs_kernel
def test_a_captured_graph_keeps_inductors_own_products(monkeypatch):
    """Traced by ``torch.compile`` (``fullgraph``: nothing breaks the graph) a one-row product is
    inductor's, not the kernel's; the eager call right after takes the kernel again."""
    calls = []
    kernel = gemv_kernel._kernels[BF16]
    monkeypatch.setitem(gemv_kernel._kernels, BF16, lambda *a: calls.append(a[3]) or kernel(*a))
    torch._dynamo.reset()
    w = torch.randn(96, 64).to(BF16)
    f = torch.compile(lambda x: linear_with(x, w, None, False, None), fullgraph=True, backend="inductor")
    x = torch.randn(1, 64).to(BF16)
    assert torch.allclose(f(x).float(), F.linear(x, w).float(), rtol=2 ** -7, atol=1e-2)
    assert calls == []
    linear_with(x, w, None, False, None)
    assert calls == [1]
    torch._dynamo.reset()
