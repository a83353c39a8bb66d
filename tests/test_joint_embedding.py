"""Joint-embedding methods: MoCo v2, BYOL, SimSiam, Barlow Twins, VICReg.

Losses against hand computations, EMA helpers, MoCo's queue, stop-gradients, a tiny training run per
method (its loss on a fixed batch drops, its features do not collapse) and exact resume of an EMA
method with a queue.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from conftest import assert_resume_is_exact
from selfsup.configure import build_config
from selfsup.data.views import eval_view
from selfsup.ema import cosine_momentum, ema_update, frozen_copy
from selfsup.losses import (barlow_twins_loss, byol_loss, cross_correlation, infonce, simsiam_loss, vicreg_loss,
                            vicreg_multicrop_loss)
from selfsup.methods import METHODS
from selfsup.monitor import RANK_COLLAPSE, STD_COLLAPSE
from selfsup.train import Trainer

JOINT = ["moco_v2", "byol", "simsiam", "barlow_twins", "vicreg"]


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _mean(xs):
    return sum(xs) / len(xs)


# --------------------------------------------------------------------------------------------------
# losses


def test_infonce_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    k = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [1.0, -1.0]])
    t = 0.5
    total = 0.0
    for i in range(2):
        pos = math.exp(_cos(q[i].tolist(), k[i].tolist()) / t)
        neg = sum(math.exp(_cos(q[i].tolist(), n.tolist()) / t) for n in queue)
        total += -math.log(pos / (pos + neg))
    assert abs(infonce(q, k, queue, t).item() - total / 2) < 1e-5


def test_infonce_is_lower_when_the_key_matches_and_keys_get_no_gradient():
    torch.manual_seed(0)
    q = torch.randn(8, 16)
    queue = torch.randn(32, 16)
    matched = infonce(q, q + 0.01 * torch.randn(8, 16), queue, 0.2)
    mismatched = infonce(q, torch.randn(8, 16), queue, 0.2)
    assert matched < mismatched - 1.0
    assert matched < math.log(33)  # below chance among the 1 + 32 candidates
    q, k, queue = q.requires_grad_(), torch.randn(8, 16, requires_grad=True), queue.requires_grad_()
    infonce(q, k, queue, 0.2).backward()
    assert q.grad is not None and k.grad is None and queue.grad is None


def test_byol_loss_matches_hand_computation_and_stops_the_gradient():
    p = torch.tensor([[1.0, 2.0], [0.5, -1.0], [1.0, 0.0]], requires_grad=True)
    z = torch.tensor([[2.0, 1.0], [1.0, 1.0], [0.0, 3.0]], requires_grad=True)
    # Eq. 2: ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z); cos = 0.8, -1/sqrt(10), 0
    expected = _mean([2 - 2 * _cos(p[i].tolist(), z[i].tolist()) for i in range(3)])
    assert abs(expected - (2 - 2 * (0.8 - 1 / math.sqrt(10) + 0) / 3)) < 1e-12
    loss = byol_loss(p, z)
    assert abs(loss.item() - expected) < 1e-5
    loss.backward()
    assert p.grad is not None and z.grad is None  # sg(z)


def test_byol_loss_is_zero_for_identical_directions_and_four_for_opposite():
    torch.manual_seed(0)
    z = torch.randn(6, 8)
    assert byol_loss(3.0 * z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(-z, z).item() == pytest.approx(4.0, abs=1e-5)


def test_simsiam_loss_matches_hand_computation_and_stops_the_gradient():
    p = torch.tensor([[1.0, 2.0], [0.5, -1.0], [1.0, 0.0]], requires_grad=True)
    z = torch.tensor([[2.0, 1.0], [1.0, 1.0], [0.0, 3.0]], requires_grad=True)
    expected = -_mean([_cos(p[i].tolist(), z[i].tolist()) for i in range(3)])  # D(p, z), Eq. 1
    loss = simsiam_loss(p, z)
    assert abs(loss.item() - expected) < 1e-5
    loss.backward()
    assert p.grad is not None and z.grad is None
    # property: minimum -1 for aligned predictions; D = byol_loss / 2 - 1
    assert simsiam_loss(2.0 * z.detach(), z.detach()).item() == pytest.approx(-1.0, abs=1e-6)
    assert simsiam_loss(p, z).item() == pytest.approx(byol_loss(p, z).item() / 2 - 1, abs=1e-6)


def _barlow_by_hand(a, b, lambd):
    """Eq. 2 then Eq. 1 on lists of rows, written out."""
    n, d = len(a), len(a[0])

    def centred_column(z, j):
        col = [z[r][j] for r in range(n)]
        m = _mean(col)
        return [v - m for v in col]

    c = [[0.0] * d for _ in range(d)]
    for i in range(d):
        for j in range(d):
            ai, bj = centred_column(a, i), centred_column(b, j)
            c[i][j] = sum(x * y for x, y in zip(ai, bj)) / (
                math.sqrt(sum(x * x for x in ai)) * math.sqrt(sum(y * y for y in bj)))
    loss = sum((1 - c[i][i]) ** 2 for i in range(d))
    loss += lambd * sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    return c, loss


def test_barlow_twins_loss_matches_hand_computation():
    a = [[1.0, 2.0], [3.0, 0.0], [2.0, 1.0], [0.0, -1.0]]
    b = [[2.0, 1.0], [2.0, 0.5], [1.0, 1.0], [-1.0, 0.0]]
    c, expected = _barlow_by_hand(a, b, 0.3)
    za, zb = torch.tensor(a), torch.tensor(b)
    # the implementation divides by sqrt(var + 1e-5) (BatchNorm), a relative change of ~1e-5 here
    assert torch.allclose(cross_correlation(za, zb), torch.tensor(c), atol=1e-4)
    assert barlow_twins_loss(za, zb, 0.3).item() == pytest.approx(expected, rel=1e-4)


def test_barlow_twins_loss_is_zero_when_c_is_the_identity():
    # centred, orthogonal columns of equal norm: the normalised cross-correlation of z with itself is I
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert torch.allclose(cross_correlation(z, z), torch.eye(2), atol=1e-4)
    assert barlow_twins_loss(z, z).item() < 1e-8
    # invariant to a per-dimension scale and shift (the embeddings are normalised along the batch)
    z1, z2 = torch.randn(16, 4), torch.randn(16, 4)
    scale, shift = torch.tensor([1.0, 5.0, 0.2, 3.0]), torch.tensor([1.0, -2.0, 0.0, 7.0])
    assert barlow_twins_loss(z1 * scale + shift, z2).item() == pytest.approx(barlow_twins_loss(z1, z2).item(),
                                                                              rel=1e-3)


def test_vicreg_loss_matches_hand_computation():
    a = [[1.0, 2.0], [3.0, 0.0], [2.0, 1.5]]
    b = [[1.5, 2.0], [2.0, 0.5], [2.0, 1.0]]
    n, d, eps = 3, 2, 1e-4
    invariance = _mean([(a[r][j] - b[r][j]) ** 2 for r in range(n) for j in range(d)])  # Eq. 5, as F.mse_loss

    def variance(z):  # Eq. 1-2: mean_j relu(1 - sqrt(Var_unbiased(z^j) + eps))
        terms = []
        for j in range(d):
            col = [z[r][j] for r in range(n)]
            var = sum((v - _mean(col)) ** 2 for v in col) / (n - 1)
            terms.append(max(0.0, 1 - math.sqrt(var + eps)))
        return _mean(terms)

    def covariance(z):  # Eq. 3-4: off-diagonal entries (0,1) and (1,0) squared, / d
        m0, m1 = _mean([r[0] for r in z]), _mean([r[1] for r in z])
        c01 = sum((r[0] - m0) * (r[1] - m1) for r in z) / (n - 1)
        return 2 * c01 ** 2 / d

    v, c = variance(a) + variance(b), covariance(a) + covariance(b)
    total, parts = vicreg_loss(torch.tensor(a), torch.tensor(b), 25.0, 25.0, 1.0)
    assert parts["invariance"].item() == pytest.approx(invariance, rel=1e-5)
    assert parts["variance"].item() == pytest.approx(v, rel=1e-5)
    assert parts["covariance"].item() == pytest.approx(c, rel=1e-5)
    assert total.item() == pytest.approx(25 * invariance + 25 * v + c, rel=1e-5)  # Eq. 6
    total2, _ = vicreg_loss(torch.tensor(a), torch.tensor(b), 2.0, 3.0, 4.0)
    assert total2.item() == pytest.approx(2 * invariance + 3 * v + 4 * c, rel=1e-5)


def test_vicreg_variance_term_is_zero_when_every_std_is_at_least_one():
    z = torch.tensor([[-2.0, 3.0], [0.0, 0.0], [2.0, -3.0]])  # stds 2 and 3
    _, parts = vicreg_loss(z, z)
    assert parts["variance"].item() == 0.0 and parts["invariance"].item() == 0.0
    _, collapsed = vicreg_loss(torch.ones(4, 3), torch.ones(4, 3))  # std 0: hinge at its maximum
    assert collapsed["variance"].item() == pytest.approx(2 * (1 - math.sqrt(1e-4)), rel=1e-5)


def test_vicreg_multicrop_loss_is_vicreg_for_two_views_and_pairs_each_large_view_with_the_others():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(6, 4, generator=g) for _ in range(3))
    two, parts2 = vicreg_multicrop_loss([a, b])
    ref, ref_parts = vicreg_loss(a, b)
    assert two.item() == pytest.approx(ref.item(), rel=1e-6)
    assert all(parts2[k].item() == pytest.approx(ref_parts[k].item(), rel=1e-6) for k in ref_parts)
    # three views, two of them large: pairs (a,b), (a,c), (b,a), (b,c); per-view terms averaged, x2
    total, parts = vicreg_multicrop_loss([a, b, c], 2, 2.0, 3.0, 4.0)
    mse = lambda x, y: float(((x - y) ** 2).mean())  # noqa: E731
    inv = (2 * mse(a, b) + mse(a, c) + mse(b, c)) / 4
    var = sum(vicreg_loss(z, z)[1]["variance"].item() / 2 for z in (a, b, c)) * 2 / 3  # v(Z) + v(Z) halved
    cov = sum(vicreg_loss(z, z)[1]["covariance"].item() / 2 for z in (a, b, c)) * 2 / 3
    assert parts["invariance"].item() == pytest.approx(inv, rel=1e-5)
    assert parts["variance"].item() == pytest.approx(var, rel=1e-5)
    assert parts["covariance"].item() == pytest.approx(cov, rel=1e-5)
    assert total.item() == pytest.approx(2 * inv + 3 * var + 4 * cov, rel=1e-5)
    with pytest.raises(ValueError):
        vicreg_multicrop_loss([a])


def test_vicreg_multicrop_step_adds_small_crops_paired_with_both_views():
    m = _method("vicreg", proj_hidden_dim=32, proj_dim=16, n_local=3, local_size=8).eval()
    assert m.views_per_image == 5
    views, loc = m.prepare(_images(4), torch.Generator().manual_seed(0))
    assert views.shape == (8, 3, 16, 16) and loc.shape == (12, 3, 8, 8)
    out = m.training_step((views, loc))
    with torch.no_grad():
        x1, x2 = views.chunk(2)
        zs = [m.projector(m.backbone(x)) for x in (x1, x2, *loc.chunk(3))]
    assert out["loss"].item() == pytest.approx(vicreg_multicrop_loss(zs, 2)[0].item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None for p in m.backbone.parameters())
    plain = _method("vicreg", proj_hidden_dim=32, proj_dim=16)  # n_local=0: the paper's two views, one tensor
    assert plain.prepare(_images(4), torch.Generator().manual_seed(0)).shape == (8, 3, 16, 16)


# --------------------------------------------------------------------------------------------------
# EMA


def test_ema_update_moves_parameters_by_the_momentum_and_copies_buffers():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    target = frozen_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    online(torch.randn(8, 3))  # moves the online BN running statistics
    before = [p.clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * o, atol=1e-6)
        assert torch.allclose(t - b, 0.1 * (o - b), atol=1e-6)  # moved 10% of the way
    for t, o in zip(target.buffers(), online.buffers()):
        assert torch.equal(t, o)  # running mean/var and num_batches_tracked copied
    assert int(target[1].num_batches_tracked) == 1
    with pytest.raises(ValueError):
        ema_update(nn.Linear(3, 4), online, 0.9)


def test_run_momentum_lowers_the_base_for_short_runs_by_the_square_root_rule():
    from selfsup.ema import run_momentum

    assert run_momentum(0.99, 195_000, 195_000) == 0.99 and run_momentum(0.99, 10**6, 195_000) == 0.99
    assert run_momentum(0.99, 48_750, 195_000) == pytest.approx(0.98)  # a quarter of the length: horizon / 2
    assert run_momentum(0.99, 10_000, 195_000) == pytest.approx(1 - 0.01 * (19.5 ** 0.5))  # 0.9558
    assert run_momentum(0.99, 100, 195_000) == 0.9  # the floor (BYOL Table 5a)
    assert run_momentum(0.99, 100, 0) == 0.99  # ref 0: the recipe's value at any length
    assert run_momentum(0.8, 100, 195_000) == 0.8  # never above the recipe's own value
    # the BYOL repository's presets (1000 epochs: 0.996) at 40 epochs give 0.97; the rule gives 0.98
    assert run_momentum(0.996, 40, 1000) == pytest.approx(0.98)


def test_cosine_momentum_endpoints():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)  # tau = 1 - 0.01 * (cos(pi/2) + 1) / 2
    values = [cosine_momentum(k, 100, 0.99) for k in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert cosine_momentum(100, 100, 0.99, final=0.999) == pytest.approx(0.999)
    assert cosine_momentum(7, 100, 0.999, final=0.999) == pytest.approx(0.999)  # constant m


# --------------------------------------------------------------------------------------------------
# the methods' mechanics


def _method(name, **params):
    cfg = build_config(name, {"model": {"backbone": "convnet"}, "data": {"image_size": 16}, "params": params})
    torch.manual_seed(0)
    return METHODS[name](cfg)


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)


def test_methods_are_registered_as_joint_embedding_with_two_views():
    for name in JOINT:
        m = METHODS[name]
        assert m.name == name and m.family == "joint-embedding" and m.views_per_image == 2 and m.summary


def test_moco_queue_holds_the_new_keys_at_the_pointer_and_the_key_encoder_moves_by_ema_only():
    m = _method("moco_v2", proj_hidden_dim=32, proj_dim=8, queue_size=8)
    key_params = list(m.key_backbone.parameters()) + list(m.key_projector.parameters())
    query_params = list(m.backbone.parameters()) + list(m.projector.parameters())
    assert all(not p.requires_grad for p in key_params)
    trainable = {id(p) for g in m.param_groups() for p in g["params"]}
    assert not trainable & {id(p) for p in key_params}  # the optimizer never sees the key encoder

    views = m.prepare(_images(3), torch.Generator().manual_seed(0))
    assert views.shape == (6, 3, 16, 16)
    x1, x2 = views.chunk(2)
    with torch.no_grad():  # the keys Algorithm 1 enqueues: k = normalize(f_k(x)) of both views
        expected = F.normalize(torch.cat([m.key_projector(m.key_backbone(x1)), m.key_projector(m.key_backbone(x2))]),
                               dim=1)
    m.queue_ptr.fill_(5)  # 6 keys from position 5 wrap around: rows 5, 6, 7, 0, 1, 2
    old_queue, old_keys = m.queue.clone(), [p.clone() for p in key_params]

    out = m.training_step(views)
    assert torch.equal(m.queue, old_queue)  # nothing enqueued before the update (Algorithm 1 order)
    out["loss"].backward()
    assert all(p.grad is None for p in key_params)
    assert all(p.grad is not None for p in query_params)
    torch.optim.SGD(m.param_groups(), lr=0.5).step()
    assert all(torch.equal(p, o) for p, o in zip(key_params, old_keys))  # the optimizer did not move f_k

    m.after_step(0, 10)
    rows = [5, 6, 7, 0, 1, 2]
    assert torch.allclose(m.queue[rows], expected, atol=1e-5)
    assert torch.equal(m.queue[[3, 4]], old_queue[[3, 4]])  # the 2 oldest survivors are untouched
    assert int(m.queue_ptr) == 3
    mom = cosine_momentum(0, 10, m.hp.base_momentum, m.hp.final_momentum)
    assert mom == m.hp.base_momentum
    for p, o, q in zip(key_params, old_keys, query_params):
        assert torch.allclose(p, mom * o + (1 - mom) * q, atol=1e-6)
    assert "queue" in m.state_dict() and "queue_ptr" in m.state_dict()


def test_byol_target_gets_no_gradient_and_follows_the_online_network_by_ema():
    m = _method("byol", proj_hidden_dim=32, proj_dim=8, pred_hidden_dim=16)
    target = list(m.target_backbone.parameters()) + list(m.target_projector.parameters())
    online = list(m.backbone.parameters()) + list(m.projector.parameters())
    assert all(not p.requires_grad for p in target)
    assert not {id(p) for g in m.param_groups() for p in g["params"]} & {id(p) for p in target}
    views = m.prepare(_images(4), torch.Generator().manual_seed(0))
    out = m.training_step(views)
    out["loss"].backward()
    assert all(p.grad is None for p in target)
    assert all(p.grad is not None for p in online + list(m.predictor.parameters()))
    before = [p.clone() for p in target]
    torch.optim.SGD(m.param_groups(), lr=0.5).step()
    assert all(torch.equal(p, b) for p, b in zip(target, before))
    m.after_step(3, 10)
    # a 10-step run: the recipe's 0.99 (for 195,000 steps) is lowered to the floor 0.9 (run_momentum)
    tau = cosine_momentum(3, 10, 0.9)
    for p, b, o in zip(target, before, online):
        assert torch.allclose(p, tau * b + (1 - tau) * o, atol=1e-6)
    keys = m.state_dict().keys()
    assert any(k.startswith("target_backbone.") for k in keys) and any(k.startswith("target_projector.") for k in keys)


def test_byol_views_are_asymmetric_when_asked():
    m = _method("byol", proj_hidden_dim=32, proj_dim=8, pred_hidden_dim=16, view2_solarize_p=1.0)
    assert m.cfg.aug.solarize_p == 0.0  # the preset's view 1
    x = torch.full((4, 3, 16, 16), 230, dtype=torch.uint8)  # bright: solarize maps 0.9 -> 0.1
    views = m.prepare(x, torch.Generator().manual_seed(0))
    mean = torch.tensor(m.cfg.aug.mean).view(1, 3, 1, 1)
    std = torch.tensor(m.cfg.aug.std).view(1, 3, 1, 1)
    pixels = views * std + mean
    x1, x2 = pixels.chunk(2)
    assert x1.mean() > 0.5 > x2.mean()  # only view 2 is solarized


def test_simsiam_applies_the_stop_gradient_in_its_step():
    m = _method("simsiam", proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=8)
    views = m.prepare(_images(6), torch.Generator().manual_seed(0))

    def grads(loss_fn):
        m.zero_grad(set_to_none=True)
        loss_fn().backward()
        return torch.cat([p.grad.flatten() for p in m.backbone.parameters()])

    def by_hand(stop_gradient):
        x1, x2 = views.chunk(2)
        z1, z2 = m.projector(m.backbone(x1)), m.projector(m.backbone(x2))
        p1, p2 = m.predictor(z1), m.predictor(z2)
        if stop_gradient:
            z1, z2 = z1.detach(), z2.detach()
        return -(F.cosine_similarity(p1, z2).mean() / 2 + F.cosine_similarity(p2, z1).mean() / 2)

    g_method = grads(lambda: m.training_step(views)["loss"])
    assert torch.allclose(g_method, grads(lambda: by_hand(True)), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(g_method, grads(lambda: by_hand(False)), rtol=1e-2, atol=1e-5)


def test_simsiam_predictor_groups_are_flagged_for_a_fixed_learning_rate():
    m = _method("simsiam", proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=8)
    groups = m.param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters() if p.requires_grad)  # each exactly once
    pred = {id(p) for p in m.predictor.parameters()}
    for g in groups:
        assert g.get("fixed_lr", False) == (bool(g["params"]) and id(g["params"][0]) in pred)
        assert all((id(p) in pred) == g.get("fixed_lr", False) for p in g["params"])
    assert len(_method("simsiam", fix_pred_lr=False).param_groups()) == 2


def test_every_method_takes_a_step_in_bf16():
    for name in JOINT:
        m = _method(name, proj_hidden_dim=32, proj_dim=16)
        views = m.prepare(_images(4), torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m.training_step(views)
        assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
        assert all(v.ndim == 0 for v in out.values())  # scalars only: the trainer logs them
        out["loss"].backward()
        m.after_step(0, 4)


# --------------------------------------------------------------------------------------------------
# tiny training runs


def _grids(folder, n, seed):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        grid = (rng.uniform(0, 1, (4, 4, 3)) * 255).astype(np.uint8)
        Image.fromarray(grid).resize((16, 16), Image.BILINEAR).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    """64 distinct random colour grids to train on, 16 more held out (MoCo's probe negatives)."""
    root = tmp_path_factory.mktemp("grids")
    return _grids(root / "train", 64, seed=0), _grids(root / "held_out", 16, seed=1)


# small heads for speed; BYOL/Barlow Twins/VICReg without their view-2 solarization (milder views)
SMALL = {"moco_v2": {"proj_hidden_dim": 64, "proj_dim": 32, "queue_size": 32},
         "byol": {"proj_hidden_dim": 64, "proj_dim": 32, "pred_hidden_dim": 64, "view2_solarize_p": None},
         "simsiam": {"proj_hidden_dim": 64, "proj_dim": 64, "pred_hidden_dim": 16},
         "barlow_twins": {"proj_hidden_dim": 64, "proj_dim": 64, "view2_solarize_p": None},
         "vicreg": {"proj_hidden_dim": 64, "proj_dim": 64, "view2_solarize_p": None}}
# the probe loss must fall below this fraction of its distance to its minimum at initialisation:
# loss1 - min < FRACTION * (loss0 - min). Observed on CPU: MoCo 0.79 (InfoNCE against 32 held-out
# keys, chance log 33 = 3.50: from 3.38 to 2.68, twice the required drop), BYOL 0.25 (4.25 -> 1.08),
# SimSiam 0.14 (-0.02 -> -0.86), Barlow Twins 0.15 (53 -> 7.7), VICReg 0.55 (38 -> 21).
PROBE = {"moco_v2": (0.0, 0.9), "byol": (0.0, 0.5), "simsiam": (-1.0, 0.5), "barlow_twins": (0.0, 0.3),
         "vicreg": (0.0, 0.75)}


@pytest.mark.parametrize("name", JOINT)
def test_tiny_run_lowers_the_loss_on_a_fixed_batch_without_collapse(name, grids, tmp_path):
    """Instance discrimination of 64 random colour grids (16 px, mild augmentations, batch 16,
    80-120 steps, AdamW): the method's own loss on a fixed batch of views (same seed before and after)
    drops clearly, and neither the backbone features nor the embeddings collapse. MoCo gets 30 epochs:
    its key encoder (m = 0.99) lags the query encoder."""
    train, held_out = grids
    epochs = 30 if name == "moco_v2" else 20
    cfg = build_config(name, {
        "model": {"backbone": "convnet"}, "data": {"path": str(train), "image_size": 16},
        "train": {"epochs": epochs, "batch_size": 16, "ckpt_every": 1000, "device": "cpu"},
        "optim": {"name": "adamw", "lr": 0.1, "weight_decay": 0.0, "warmup_epochs": 0},
        "aug": {"crop_scale": [0.5, 1.0], "jitter_p": 0.5, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2,
                "hue": 0.02, "gray_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0},
        "params": SMALL[name]})
    trainer = Trainer(cfg, tmp_path / name, progress=False)
    m = trainer.method
    x = torch.from_numpy(np.array(trainer.data.images)).permute(0, 3, 1, 2)
    held = torch.from_numpy(np.stack([np.array(Image.open(p).convert("RGB"))
                                      for p in sorted(held_out.glob("*.png"))])).permute(0, 3, 1, 2)

    def probe():
        with torch.no_grad():
            if name == "moco_v2":
                # the training queue changes with training; probe against a fixed set of negatives
                # instead: the current key encoder's keys of 2 views of the 16 held-out grids
                bank = m.key_projector(m.key_backbone(m.prepare(held, torch.Generator().manual_seed(7))))
                saved = m.queue.clone()
                m.queue.copy_(F.normalize(bank, dim=1))
            out = m.training_step(m.prepare(x, torch.Generator().manual_seed(123)))
            if name == "moco_v2":
                m.queue.copy_(saved)
        return float(out["loss"])

    loss0 = probe()
    trainer.fit()
    loss1 = probe()
    low, fraction = PROBE[name]
    assert loss1 - low < fraction * (loss0 - low), (loss0, loss1)

    # Collapse check (SimSiam Sec. 4.1): the per-dimension std over the images of the L2-normalised
    # features is ~1/sqrt(d) when they are spread over the sphere and 0 when every image maps to the
    # same point. Post-ReLU pooled backbone features share a positive mean direction, so even the
    # random-init network sits near 0.3/sqrt(d) (trained: 0.26-0.58/sqrt(d)); the threshold is the
    # project's collapse-warning level 0.1/sqrt(d) (monitor.STD_COLLAPSE), with the effective rank
    # above 2 (monitor.RANK_COLLAPSE; trained: 4.4-8 of 64 images). A collapsing run falls far below:
    # MoCo with m=0 (which the MoCo paper reports fails) ends near 0.07/sqrt(d) on the backbone and
    # 0.002/sqrt(d) on the embedding. The embeddings the loss sees (projector output) must stay near
    # the healthy 1/sqrt(d_z): above 0.3/sqrt(d_z) (trained: 0.66-0.97).
    health = trainer.health()
    d = m.backbone.out_dim
    assert health["feat_std"] > STD_COLLAPSE / math.sqrt(d), health
    assert health["rankme"] > RANK_COLLAPSE, health
    m.eval()
    with torch.no_grad():
        z = m.projector(m.backbone(eval_view(x, cfg.aug)))
    z_std = float(F.normalize(z, dim=1).std(dim=0).mean())
    assert z_std > 0.3 / math.sqrt(z.shape[1]), z_std

    state = trainer.state()["model"]
    if name == "moco_v2":
        assert {"queue", "queue_ptr"} <= state.keys() and any(k.startswith("key_backbone.") for k in state)
    if name == "byol":
        assert any(k.startswith("target_backbone.") for k in state)


def test_moco_checkpoint_holds_key_encoder_and_queue_and_resume_is_exact(grids, tmp_path):
    """An interrupted MoCo v2 run resumed from its checkpoint ends with the same weights, key encoder
    and queue as an uninterrupted one: all of them are in the checkpoint."""
    train, _ = grids
    cfg = build_config("moco_v2", {
        "model": {"backbone": "convnet"}, "data": {"path": str(train), "image_size": 16},
        "train": {"epochs": 2, "batch_size": 16, "ckpt_every": 1000, "device": "cpu"},
        "optim": {"name": "sgd", "lr": 0.5, "warmup_epochs": 0}, "params": {**SMALL["moco_v2"], "queue_size": 48}})
    model = assert_resume_is_exact(cfg, tmp_path, stop_step=4).state()["model"]
    assert {"queue", "queue_ptr"} <= model.keys()
    assert any(k.startswith("key_backbone.") for k in model) and any(k.startswith("key_projector.") for k in model)
    assert int(model["queue_ptr"]) == (8 * 32) % 48  # 8 steps of 2 x 16 keys into a ring of 48
