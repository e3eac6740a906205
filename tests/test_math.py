"""Bases, decomposition, node weights, entropy and Gini against hand computations."""

import math

import pytest
import torch

from composer import basis, decompose


def _centroids(n=4, d=16, seed=0, shared=3.0):
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=g, dtype=torch.float64) * shared
    return common + torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["symmetric", "gram_schmidt"])
def test_bases_are_orthonormal(kind):
    C = _centroids(shared=10.0)  # cosines ~0.99: highly collinear, like the paper's centroids
    assert basis.cosine_matrix(C).triu(1).max() > 0.95
    E = basis.make_basis(C, kind)
    assert (E @ E.T - torch.eye(4, dtype=torch.float64)).abs().max() <= 1e-9


def test_alpha_equals_hand_computation():
    C = _centroids()
    E = basis.make_basis(C, "symmetric")
    g = torch.randn(16, dtype=torch.float64)
    a = decompose.alpha(g.float(), E)
    gn = g.float().double()
    gn = gn / math.sqrt(sum(v * v for v in gn.tolist()))
    hand = [sum(x * y for x, y in zip(gn.tolist(), e.tolist())) for e in E]
    assert a.tolist() == pytest.approx(hand, abs=1e-12)


def test_symmetric_basis_is_order_invariant():
    C = _centroids()
    perm = [2, 0, 3, 1]
    E = basis.make_basis(C, "symmetric")
    Ep = basis.make_basis(C[perm], "symmetric")
    g = torch.randn(16)
    a, ap = decompose.alpha(g, E), decompose.alpha(g, Ep)
    assert (ap - a[perm]).abs().max() <= 1e-12
    # ... whereas Gram-Schmidt's depends on the order
    G, Gp = basis.make_basis(C, "gram_schmidt"), basis.make_basis(C[perm], "gram_schmidt")
    assert (decompose.alpha(g, Gp) - decompose.alpha(g, G)[perm]).abs().max() > 1e-3


def test_symmetric_basis_is_closest_orthonormal_basis():
    C = _centroids()
    E = basis.make_basis(C, "symmetric")
    # Löwdin: E = (C C^T)^-1/2 C, so C = (C C^T)^1/2 E with a symmetric positive factor
    S = C @ E.T
    assert (S - S.T).abs().max() <= 1e-9
    assert torch.linalg.eigvalsh(S).min() > 0


def test_gram_schmidt_residual_ratios_match_hand_computation():
    c1 = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    c2 = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    c3 = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    E, ratios = basis.gram_schmidt(torch.stack([c1, c2, c3]))
    # r1 = c1; r2 = c2 - (c2.e1) e1 = (0,1,0); r3 = (0,0,1)
    assert ratios.tolist() == pytest.approx([1.0, 1 / math.sqrt(2), 1 / math.sqrt(3)], abs=1e-15)
    assert (E - torch.eye(3, dtype=torch.float64)).abs().max() <= 1e-15


def test_dependent_centroids_are_refused():
    C = _centroids(3)
    C = torch.cat([C, (C[0] + C[1])[None]])
    for kind in ("symmetric", "gram_schmidt"):
        with pytest.raises(basis.BasisError):
            basis.make_basis(C, kind)


def test_noise_is_seeded_and_scaled():
    C = _centroids()
    a, b = basis.add_noise(C, 0.02, 7), basis.add_noise(C, 0.02, 7)
    assert torch.equal(a, b)
    assert not torch.equal(a, basis.add_noise(C, 0.02, 8))
    assert torch.equal(basis.add_noise(C, 0.0, 7), C)
    sigma = (a - C).std().item()
    assert 0.5 * 0.02 * C.norm(dim=1).mean().item() < sigma < 1.5 * 0.02 * C.norm(dim=1).mean().item()


def test_recommendation_thresholds():
    assert basis.recommendation(0.90) == "task_arithmetic"
    assert basis.recommendation(0.95) == "constellation"
    assert basis.recommendation(0.99) == "noise_assisted"


def test_node_weights_columns_sum_to_one_and_follow_the_formula():
    alpha = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    a = torch.rand(3, 8, generator=torch.Generator().manual_seed(0)) + 0.1
    nw = decompose.node_weights(alpha, a)
    assert nw.weights.sum(0).tolist() == pytest.approx([1.0] * 8, abs=1e-6)
    raw = alpha[:, None] * a.double()
    assert (nw.weights.double() - raw / raw.sum(0)).abs().max() <= 1e-6
    assert not nw.fallback.any()


def test_negative_alpha_gets_zero_weight():
    alpha = torch.tensor([0.6, -0.4, 0.1], dtype=torch.float64)
    nw = decompose.node_weights(alpha, torch.rand(3, 8) + 0.1)
    assert torch.all(nw.weights[1] == 0)
    assert nw.weights.sum(0).tolist() == pytest.approx([1.0] * 8, abs=1e-6)


def test_all_zero_column_falls_back_to_uniform():
    alpha = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    a = torch.rand(3, 8) + 0.1
    a[:, 2] = 0
    nw = decompose.node_weights(alpha, a)
    assert nw.fallback.tolist() == [False, False, True] + [False] * 5
    assert nw.weights[:, 2].tolist() == pytest.approx([1 / 3] * 3)
    # every alpha <= 0: every column falls back
    nw = decompose.node_weights(torch.tensor([-0.1, -0.2, 0.0]), torch.rand(3, 4) + 0.1)
    assert nw.fallback.all() and (nw.weights - 1 / 3).abs().max() <= 1e-7


def test_joint_normalisation_sums_to_one_overall():
    alpha = torch.tensor([0.6, 0.3], dtype=torch.float64)
    nw = decompose.node_weights(alpha, torch.rand(2, 8) + 0.1, joint=True)
    assert float(nw.weights.sum()) == pytest.approx(1.0, abs=1e-6)


def test_entropy_and_gini():
    w = torch.tensor([[0.5, 1.0, 0.25], [0.5, 0.0, 0.75]])
    h = decompose.entropy_bits(w)
    hand = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert h.tolist() == pytest.approx([1.0, 0.0, hand])
    assert decompose.gini(torch.tensor([1.0, 1.0, 1.0])) == pytest.approx(0.0)
    assert decompose.gini(torch.tensor([0.0, 0.0, 5.0])) == pytest.approx(2 / 3)
    assert decompose.gini(torch.tensor([-1.0, 1.0])) == pytest.approx(0.0)  # of |alpha|


def test_top_k_orders_by_alpha():
    assert decompose.top_k(torch.tensor([0.1, 0.7, -0.2, 0.3]), 3) == [1, 3, 0]
    assert decompose.top_k(torch.tensor([0.1, 0.7]), 5) == [1, 0]
