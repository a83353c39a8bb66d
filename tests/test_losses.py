import math

import torch

from selfsup.losses import nt_xent


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_nt_xent_matches_hand_computation():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z2 = torch.tensor([[1.0, 1.0], [-1.0, 0.5]])
    t = 0.5
    views = [z1[0].tolist(), z1[1].tolist(), z2[0].tolist(), z2[1].tolist()]
    partner = {0: 2, 1: 3, 2: 0, 3: 1}
    total = 0.0
    for i in range(4):
        num = math.exp(_cos(views[i], views[partner[i]]) / t)
        den = sum(math.exp(_cos(views[i], views[k]) / t) for k in range(4) if k != i)
        total += -math.log(num / den)
    assert abs(nt_xent(z1, z2, t).item() - total / 4) < 1e-5


def test_nt_xent_is_low_for_aligned_views_and_symmetric():
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    aligned = nt_xent(z, z + 0.01 * torch.randn(8, 16), 0.1)
    shuffled = nt_xent(z, z[torch.randperm(8)], 0.1)
    assert aligned < shuffled
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.allclose(nt_xent(a, b), nt_xent(b, a), atol=1e-6)
    # scale invariance: cosine similarity
    assert torch.allclose(nt_xent(a, b), nt_xent(3 * a, 0.5 * b), atol=1e-6)
