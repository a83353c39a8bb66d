"""MoCo v3, SimCLR v2 and self-supervised distillation (SimCLR v2 Sec. 2 / SEED).

Losses against hand computations; MoCo v3's step against its Algorithm 1 written out (symmetrised
ctr, momentum encoder moved by EMA only, ViT variant); SimCLR v2's head layers and the backbone +
projector-layer encoder of a trained run; tiny runs that lower their loss on a fixed batch without
collapse and evaluate with kNN; a distillation run from a tiny teacher run (the student's SEED loss
falls, the teacher stays out of the checkpoint); exact resume; a missing teacher is a ConfigError.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_resume_is_exact, make_folder, assert_backbone_moved

from selfsup.config import ConfigError
from selfsup.configure import build_config
from selfsup.data.views import eval_view
from selfsup.ema import cosine_momentum
from selfsup.evaluate import evaluate
from selfsup.losses import distillation_loss, moco_v3_loss, seed_logits, seed_loss
from selfsup.methods import METHODS
from selfsup.methods.simclr_v2 import BackboneWithProjector, encoder_with_projector, head_layers, projected_encoder
from selfsup.monitor import RANK_COLLAPSE, STD_COLLAPSE
from selfsup.train import Trainer
from selfsup.run import read_metrics


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


# --------------------------------------------------------------------------------------------------
# losses


def test_moco_v3_loss_matches_hand_computation_and_keys_get_no_gradient():
    q = torch.tensor([[1.0, 0.0], [1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    k = torch.tensor([[2.0, 1.0], [0.0, 1.0], [1.0, -1.0]], requires_grad=True)
    t = 0.5
    total = 0.0
    for i in range(3):  # query i against the 3 keys of the batch, its own key k[i] is the positive
        logits = [_cos(q[i].tolist(), k[j].tolist()) / t for j in range(3)]
        total += -math.log(_softmax(logits)[i])
    expected = 2 * t * total / 3  # scaled by 2 tau as in the official code
    loss = moco_v3_loss(q, k, t)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert q.grad is not None and k.grad is None
    # matched keys beat mismatched ones; scale invariant (cosine)
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    assert moco_v3_loss(3 * z, z, 0.2) < moco_v3_loss(z, z.roll(1, 0), 0.2) - 1.0


def test_distillation_and_seed_losses_match_hand_computation():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], requires_grad=True)
    t = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 1.0]], requires_grad=True)
    # SimCLR v2 Eq. 2: -sum_y P_T(y; tau_T) log P_S(y; tau_S), averaged over the 2 samples
    expected = -sum(sum(pt * math.log(ps) for pt, ps in zip(_softmax([v / 0.5 for v in t[i].tolist()]),
                                                            _softmax([v / 2.0 for v in s[i].tolist()])))
                    for i in range(2)) / 2
    loss = distillation_loss(s, t, temperature=2.0, teacher_temperature=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert s.grad is not None and t.grad is None
    # one temperature for both by default; the minimum over student logits is the teacher's entropy (student = teacher)
    same = distillation_loss(t.detach(), t.detach(), 1.0).item()
    entropy = -sum(sum(p * math.log(p) for p in _softmax(t[i].tolist())) for i in range(2)) / 2
    assert same == pytest.approx(entropy, rel=1e-5) and distillation_loss(s, t, 1.0).item() > same

    # SEED: similarity distributions over D+ = [z_T; queue], every embedding L2-normalised
    zs = [[1.0, 1.0], [0.0, 2.0]]
    zt = [[2.0, 0.0], [1.0, 1.0]]
    queue = [[0.0, 1.0], [-1.0, 0.0], [1.0, -1.0]]
    tau_s, tau_t = 0.2, 0.05
    total = 0.0
    for i in range(2):
        bank = [zt[i]] + queue
        p_t = _softmax([_cos(zt[i], d) / tau_t for d in bank])
        p_s = _softmax([_cos(zs[i], d) / tau_s for d in bank])
        total += -sum(a * math.log(b) for a, b in zip(p_t, p_s))
    got = seed_loss(torch.tensor(zs), torch.tensor(zt), torch.tensor(queue), tau_s, tau_t)
    assert got.item() == pytest.approx(total / 2, rel=1e-5)


# --------------------------------------------------------------------------------------------------
# mechanics


def _method(name, backbone="convnet", **params):
    cfg = build_config(name, {"model": {"backbone": backbone}, "data": {"image_size": 16}, "params": params})
    torch.manual_seed(0)
    return METHODS[name](cfg)


def _images(n, seed=0):
    return torch.randint(0, 256, (n, 3, 16, 16), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_registered_as_joint_embedding():
    for name, views in (("moco_v3", 2), ("simclr_v2", 2), ("distill", 1)):
        m = METHODS[name]
        assert m.name == name and m.family == "joint-embedding" and m.views_per_image == views and m.summary


def test_moco_v3_step_is_the_symmetrised_ctr_and_the_momentum_encoder_moves_by_ema_only():
    m = _method("moco_v3", proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32)
    assert len([x for x in m.projector if isinstance(x, nn.Linear)]) == 2  # ResNet/ConvNet: 2-layer projector
    assert isinstance(m.projector[-1], nn.BatchNorm1d) and not isinstance(m.predictor[-1], nn.BatchNorm1d)
    momentum = list(m.momentum_backbone.parameters()) + list(m.momentum_projector.parameters())
    online = list(m.backbone.parameters()) + list(m.projector.parameters())
    assert all(not p.requires_grad for p in momentum)
    assert not {id(p) for g in m.param_groups() for p in g["params"]} & {id(p) for p in momentum}
    for a, b in zip(momentum, online):
        assert torch.equal(a, b)  # f_k starts as a copy of f_q

    views = m.prepare(_images(4), torch.Generator().manual_seed(0))
    assert views.shape == (8, 3, 16, 16)
    m.eval()  # fixed BN statistics, so the hand computation sees the same network
    x1, x2 = views.chunk(2)
    with torch.no_grad():
        q1, q2 = m.predictor(m.projector(m.backbone(x1))), m.predictor(m.projector(m.backbone(x2)))
        k1, k2 = m.momentum_projector(m.momentum_backbone(x1)), m.momentum_projector(m.momentum_backbone(x2))

    def ctr(q, k, tau=0.2):
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / tau
        return 2 * tau * F.cross_entropy(logits, torch.arange(4))

    out = m.training_step(views)
    assert out["loss"].item() == pytest.approx((ctr(q1, k2) + ctr(q2, k1)).item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is None for p in momentum)
    assert all(p.grad is not None for p in online + list(m.predictor.parameters()))
    before = [p.clone() for p in momentum]
    torch.optim.SGD(m.param_groups(), lr=0.5).step()
    assert all(torch.equal(p, b) for p, b in zip(momentum, before))  # the optimizer never moves f_k
    m.after_step(3, 10)
    mom = cosine_momentum(3, 10, 0.9, 1.0)  # a 10-step run starts at the floor 0.9 (ema.run_momentum)
    assert m.momentum(0, 10) == pytest.approx(0.9) and m.momentum(10, 10) == pytest.approx(1.0)
    assert m.momentum(0, 195_000) == pytest.approx(0.99)  # the recipe's value at the recipe's length
    for p, b, o in zip(momentum, before, online):
        assert torch.allclose(p, mom * b + (1 - mom) * o, atol=1e-6)


def test_moco_v3_on_a_vit_has_a_fixed_patch_projection_and_3_layer_heads_and_trains_in_bf16():
    m = _method("moco_v3", backbone="vit_tiny", proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32)
    assert len([x for x in m.projector if isinstance(x, nn.Linear)]) == 3  # paper: 3 layers for ViT
    assert isinstance(m.predictor[-1], nn.BatchNorm1d)  # and a BN after the ViT predictor
    assert not any(p.requires_grad for p in m.backbone.conv_proj.parameters())  # random patch projection
    trainable = {id(p) for g in m.param_groups() for p in g["params"]}
    assert not trainable & {id(p) for p in m.backbone.conv_proj.parameters()}
    proj_before = m.backbone.conv_proj.weight.clone()
    views = m.prepare(_images(4), torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.training_step(views)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    torch.optim.SGD(m.param_groups(), lr=0.1).step()
    m.after_step(0, 4)
    assert torch.equal(m.backbone.conv_proj.weight, proj_before)
    assert m.backbone.class_token.grad is not None
    assert _method("moco_v3", backbone="vit_tiny", fixed_patch_embed=False).backbone.conv_proj.weight.requires_grad


def test_simclr_v2_has_a_deeper_head_and_its_layers_split_at_each_linear():
    m = _method("simclr_v2", proj_hidden_dim=32, proj_dim=8)
    linears = [x for x in m.projector if isinstance(x, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(256, 32), (32, 32), (32, 8)]
    assert isinstance(m.projector[-1], nn.BatchNorm1d) and not m.projector[-1].affine
    # layer 1 = Linear-BN-ReLU (the paper's fine-tuning point), layer 0 = nothing, layer 3 = the whole head
    assert [type(x) for x in head_layers(m.projector, 1)] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert len(head_layers(m.projector, 0)) == 0 and len(head_layers(m.projector, 3)) == len(m.projector)
    with pytest.raises(ValueError):
        head_layers(m.projector, 4)
    enc = m.finetune_encoder()
    assert isinstance(enc, BackboneWithProjector) and enc.out_dim == 32
    x = eval_view(_images(3), m.cfg.aug)
    m.eval()
    with torch.no_grad():
        h = m.backbone(x)
        assert torch.allclose(enc(x), F.relu(m.projector[1](m.projector[0](h))), atol=1e-6)
    assert m.finetune_encoder(0).out_dim == 256
    with pytest.raises(ConfigError):
        _method("simclr_v2", proj_layers=2, finetune_from_layer=3)
    # the SimCLR loss is reused unchanged
    views = m.prepare(_images(4), torch.Generator().manual_seed(0))
    out = m.training_step(views)
    assert torch.isfinite(out["loss"]) and out["loss"].item() > 0


# --------------------------------------------------------------------------------------------------
# tiny runs


def _cfg(name, train, epochs, **params):
    return build_config(name, {
        "model": {"backbone": "convnet"}, "data": {"path": str(train), "image_size": 16},
        "train": {"epochs": epochs, "batch_size": 16, "ckpt_every": 1000, "log_every": 2, "device": "cpu"},
        "optim": {"name": "adamw", "lr": 0.1, "weight_decay": 0.0, "warmup_epochs": 0},
        "aug": {"crop_scale": [0.5, 1.0], "jitter_p": 0.5, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2,
                "hue": 0.02, "gray_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0},
        "params": params})


# small heads for speed, milder views; MoCo v3's momentum starts at 0.9: at 0.99 the momentum encoder barely
# follows in 60 steps (observed: its probe loss fell only from 3.67 to 2.70)
SMALL = {"moco_v3": {"proj_hidden_dim": 64, "proj_dim": 32, "pred_hidden_dim": 64, "view2_solarize_p": None,
                     "base_momentum": 0.9},
         "simclr_v2": {"proj_hidden_dim": 64, "proj_dim": 32}}


def _probe(method, x, seed=123):
    """The loss on a fixed batch of views; the model (BN running statistics) is left as it was."""
    state = {k: v.clone() for k, v in method.state_dict().items()}
    with torch.no_grad():
        loss = float(method.training_step(method.prepare(x, torch.Generator().manual_seed(seed)))["loss"])
    method.load_state_dict(state)
    return loss


def _all_images(trainer):
    return torch.from_numpy(np.array(trainer.data.images)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_folder(root / "train", 16, seed=0)
    make_folder(root / "test", 8, seed=1)
    return root


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """One tiny run of MoCo v3 and SimCLR v2 each (64 images, batch 16, 15 epochs = 60 steps), with the
    loss on a fixed batch of views (same seed) before and after."""
    out = {}
    root = tmp_path_factory.mktemp("runs")
    for name in ("moco_v3", "simclr_v2"):
        trainer = Trainer(_cfg(name, data / "train", 15, **SMALL[name]), root / name, progress=False)
        x = _all_images(trainer)
        before = _probe(trainer.method, x)
        trainer.fit()
        out[name] = (trainer, before, _probe(trainer.method, x), root / name)
    return out


@pytest.mark.parametrize("name", ["moco_v3", "simclr_v2"])
def test_tiny_run_lowers_its_loss_without_collapse_and_evaluates_with_knn(name, runs, data):
    trainer, before, after, run_dir = runs[name]
    # observed (64 images in the probe batch): MoCo v3 3.67 -> 2.26 (uniform over the 64 keys: 2 x 2 tau x
    # log 64 = 3.3), SimCLR v2 4.94 -> 2.35 (uniform over 127 candidates: log 127 = 4.8)
    assert after < 0.8 * before, (before, after)
    rows = read_metrics(run_dir)
    assert len(rows) == 30 and "pretext_acc" in rows[0]
    assert float(rows[-1]["pretext_acc"]) > 0.2  # chance: 1/16 (MoCo v3), 1/31 (SimCLR v2); observed 0.41, 0.69
    health = trainer.health()  # collapse: see tests/test_joint_embedding.py
    assert health["feat_std"] > STD_COLLAPSE / math.sqrt(trainer.method.backbone.out_dim), health
    assert health["rankme"] > RANK_COLLAPSE, health
    r = evaluate(str(run_dir), "knn", str(data), str(data), progress=False, k=10)
    assert 0.25 < r["top1"] <= 1.0 and r["n_train"] == 64 and r["n_test"] == 32  # chance: 0.25; observed 0.97, 0.84


def test_simclr_v2_encoder_with_projector_loads_backbone_and_first_head_layer(runs, data):
    trainer, _, _, run_dir = runs["simclr_v2"]
    m = trainer.method.eval()
    net = encoder_with_projector(run_dir)  # the run's finetune_from_layer: 1
    assert isinstance(net, nn.Module) and not net.training and net.out_dim == 64
    x = eval_view(_images(5), m.cfg.aug)
    with torch.no_grad():
        assert torch.allclose(net(x), m.finetune_encoder(1)(x), atol=1e-5)
        assert torch.allclose(encoder_with_projector(run_dir, 0)(x), m.backbone(x), atol=1e-5)
        assert torch.allclose(encoder_with_projector(run_dir, 3)(x), m.projector(m.backbone(x)), atol=1e-5)
    with pytest.raises(ConfigError):
        encoder_with_projector(run_dir, 4)
    with pytest.raises(ConfigError, match="simclr_v2"):
        encoder_with_projector(runs["moco_v3"][3])
    # the evaluation protocols run on it (here kNN on the 64-d layer-1 features)
    r = evaluate(str(run_dir), "knn", str(data), str(data), out=run_dir / "eval_l1", progress=False, k=10,
                 encoder=projected_encoder(run_dir))
    assert r["top1"] > 0.25 and r["backbone"]["name"] == "convnet"
    assert_backbone_moved(run_dir)


def test_moco_v3_resume_is_exact(data, tmp_path):
    cfg = _cfg("moco_v3", data / "train", 2, **SMALL["moco_v3"])
    state = assert_resume_is_exact(cfg, tmp_path).state()["model"]
    assert any(k.startswith("momentum_backbone.") for k in state) and any(k.startswith("momentum_projector.")
                                                                          for k in state)


# --------------------------------------------------------------------------------------------------
# distillation


def test_distill_needs_an_existing_teacher(data, tmp_path):
    for teacher in ("", str(tmp_path / "nope")):
        with pytest.raises(ConfigError, match="params.teacher"):
            Trainer(_cfg("distill", data / "train", 1, teacher=teacher), tmp_path / "student", progress=False)
    with pytest.raises(ConfigError, match="teacher_output"):
        _method("distill", teacher=str(tmp_path), teacher_output="logits")


def test_distill_from_a_tiny_teacher_run(runs, data, tmp_path, monkeypatch):
    teacher_dir = runs["simclr_v2"][3]
    # the teacher's embedding: its projection head by default, its pooled features on request
    m = _method("distill", teacher=str(teacher_dir), queue_size=32)
    assert m.teacher.output == "projector" and m.teacher.dim == 32 and m.head[-1].out_features == 32
    feats = _method("distill", teacher=str(teacher_dir), teacher_output="features", queue_size=32)
    assert feats.teacher.output == "features" and feats.teacher.dim == 256

    monkeypatch.chdir(teacher_dir.parent)  # a relative teacher path is stored absolute
    # one temperature for teacher and student (SimCLR v2's Eq. 2): a student equal to the teacher then
    # reaches KL(p_T || p_S) = 0, so the KL measures how far the student is from its teacher
    cfg = _cfg("distill", data / "train", 15, teacher=teacher_dir.name, queue_size=32, head_hidden_dim=64,
               teacher_temperature=0.2)
    trainer = Trainer(cfg, tmp_path / "student", progress=False)
    m = trainer.method
    assert cfg.params["teacher"] == str(teacher_dir.resolve())
    assert all(not p.requires_grad for p in m.teacher.net.parameters())
    assert not {id(p) for g in m.param_groups() for p in g["params"]} & {id(p) for p in m.teacher.net.parameters()}
    teacher_before = [p.clone() for p in m.teacher.net.parameters()]
    # the teacher sees exactly the student's view: same normalisation and size (both runs use the defaults)
    x = _all_images(trainer)
    views, teacher_views = m.prepare(x[:4], torch.Generator().manual_seed(0))
    assert torch.equal(views, teacher_views)
    with torch.no_grad():  # the teacher embedding is the teacher run's own projector output
        tm = runs["simclr_v2"][0].method.eval()
        assert torch.allclose(m.embed_teacher(teacher_views), F.normalize(tm.projector(tm.backbone(teacher_views)),
                                                                          dim=1), atol=1e-5)

    m.on_epoch_start(trainer.run_state(), 0)  # what fit() does first: the queue holds teacher embeddings of the data
    assert bool(m.queue_filled)
    with torch.no_grad():
        expected = m.embed_teacher(m.teacher_input(eval_view(x[np.arange(32) * 64 // 32], cfg.aug)))
    assert torch.allclose(m.queue, expected, atol=1e-5)
    bank = m.queue.clone()  # a fixed instance set for the probe (the training queue moves on)

    def kl_to_teacher():
        """KL(p_T || p_S) on a fixed batch of views: the SEED loss minus its minimum, the teacher's entropy."""
        state = {k: v.clone() for k, v in m.state_dict().items()}
        with torch.no_grad():
            xs, xt = m.prepare(x, torch.Generator().manual_seed(123))
            z_s, z_t = m.head(m.backbone(xs)), m.embed_teacher(xt)
            p_t = F.softmax(seed_logits(z_t, z_t, bank) / m.hp.teacher_temperature, dim=1)
            entropy = -(p_t * p_t.clamp_min(1e-30).log()).sum(1).mean()
            loss = seed_loss(z_s, z_t, bank, m.hp.temperature, m.hp.teacher_temperature)
        m.load_state_dict(state)
        return float(loss - entropy)

    before = kl_to_teacher()
    trainer.fit()
    after = kl_to_teacher()
    assert after < 0.6 * before, (before, after)  # observed: 1.91 -> 0.9
    assert all(torch.equal(p, b) for p, b in zip(m.teacher.net.parameters(), teacher_before))

    # the student's checkpoint holds no teacher weights; evaluation sees the student backbone
    ckpt = torch.load(tmp_path / "student" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["model"].keys() == m.state_dict().keys()
    assert {k.split(".")[0] for k in ckpt["model"]} == {"backbone", "head", "queue", "queue_ptr", "queue_filled"}
    assert ckpt["config"]["params"]["teacher"] == str(teacher_dir.resolve())
    r = evaluate(str(tmp_path / "student"), "knn", str(data), str(data), progress=False, k=10)
    assert r["top1"] > 0.25 and r["n_test"] == 32
    assert_backbone_moved(tmp_path / "student")


def test_distill_resume_reloads_the_teacher_and_is_exact(runs, data, tmp_path):
    cfg = _cfg("distill", data / "train", 2, teacher=str(runs["moco_v3"][3]), queue_size=24, head_hidden_dim=32)
    straight = assert_resume_is_exact(cfg, tmp_path)
    assert straight.method.teacher.output == "projector" and bool(straight.state()["model"]["queue_filled"])
