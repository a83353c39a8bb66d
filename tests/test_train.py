"""The training loop: checkpoints, exact resume after SIGKILL, SIGTERM, NaN, metrics, config."""

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_folder
from selfsup.configure import build_config, load_config
from selfsup.config import ConfigError
from selfsup.methods.rotation import Rotation
from selfsup.optim import backbone_factor, lr_factor, warmup_steps_for
from selfsup.train import NonFiniteLoss, load_checkpoint, pretrain
from selfsup.run import read_metrics

EPOCHS, BATCH, N_IMAGES = 4, 8, 256  # 32 steps per epoch, 128 steps


def _cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "selfsup", "pretrain", "--method", "rotation", "--data", str(data),
            "--backbone", "convnet", "--image-size", "16", "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
            "--out", str(out), "--no-progress", "train.ckpt_every=5", "train.log_every=1", *extra]


def _env(tmp: Path) -> dict:
    return {**os.environ, "SELFSUP_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "2"}


def _reference_run(cmd: list[str], env: dict, monkeypatch_env) -> None:
    """The uninterrupted reference run of ``cmd`` (a ``python -m selfsup ...`` command) in this process,
    through the same command-line entry point, with the subprocess's environment and thread count: the
    comparison is bit-exact, and a fresh process would add 5 s of imports (torch, torch._dynamo)."""
    from selfsup.cli import main

    threads = torch.get_num_threads()
    with monkeypatch_env.context() as mp:
        for k in ("SELFSUP_CACHE", "OMP_NUM_THREADS"):
            mp.setenv(k, env[k])
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        try:
            assert main(cmd[3:]) == 0
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data = make_folder(tmp / "imgs", N_IMAGES // 4, size=16)
    ref = tmp / "reference"
    _reference_run(_cmd(data, ref), _env(tmp), pytest.MonkeyPatch())
    return tmp, data, load_checkpoint(ref / "checkpoints" / "last.pt")


def _last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.csv").read_text().strip().splitlines()
        return int(lines[-1].split(",")[0]) if len(lines) > 1 else 0
    except (FileNotFoundError, ValueError):
        return 0


def _run_until(cmd, env, run: Path, step: int, sig: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while _last_step(run) < step:
        assert proc.poll() is None, f"run ended before it could be interrupted: {proc.communicate()}"
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(resume_setup):
    tmp, data, ref = resume_setup
    run = tmp / "killed"
    total = EPOCHS * N_IMAGES // BATCH
    proc = _run_until(_cmd(data, run), _env(tmp), run, 47, signal.SIGKILL)  # step 45 is saved before 47 is logged
    assert proc.returncode == -signal.SIGKILL
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert 45 <= ckpt["step"] < total and ckpt["step"] % 5 == 0
    assert ckpt["step"] % (N_IMAGES // BATCH) != 0  # mid-epoch
    logged = _last_step(run)
    assert logged >= 47 and logged - 5 < ckpt["step"] <= logged  # the newest checkpoint: at most 5 steps behind

    done = subprocess.run(_cmd(data, run, "--resume"), env=_env(tmp), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    steps = [int(r["step"]) for r in read_metrics(run)]
    assert steps == list(range(1, total + 1))  # no step twice, none missing
    final = load_checkpoint(run / "checkpoints" / "last.pt")
    assert final["step"] == total
    _assert_same_weights(final["model"], ref["model"])


STATEFUL = {  # a momentum encoder + queue, an EMA target, a centre + multi-crop + EMA teacher
    "moco_v2": ["params.proj_hidden_dim=32", "params.proj_dim=16", "params.queue_size=64"],
    "byol": ["params.proj_hidden_dim=32", "params.proj_dim=16", "params.pred_hidden_dim=32"],
    "dino": ["params.hidden_dim=32", "params.bottleneck_dim=16", "params.out_dim=32", "params.n_local=2"],
}


# A real SIGKILL costs three fresh processes (about 30 s): BYOL's EMA target is killed here; the key
# encoder and queue of MoCo v2 and DINO's teacher and centre resume exactly in-process in
# test_joint_embedding.py::test_moco_checkpoint_holds_key_encoder_and_queue_and_resume_is_exact and
# test_swav_dino.py::test_resume_is_exact_with_queue_teacher_and_centre (the same checkpoint code).
@pytest.mark.parametrize("method", ["byol"])
def test_sigkill_mid_epoch_then_resume_is_exact_for_stateful_methods(method, tmp_path, monkeypatch):
    """A real SIGKILL of the training process mid-epoch, then --resume: the weights, the key encoder and
    its queue (MoCo v2), the EMA target (BYOL), the teacher and its centre (DINO) all end bit-identical
    to an uninterrupted run's."""
    data = make_folder(tmp_path / "imgs", 32, size=16)  # 128 images, batch 8: 16 steps per epoch

    def cmd(out, *extra):
        return [sys.executable, "-m", "selfsup", "pretrain", "--method", method, "--data", str(data),
                "--backbone", "convnet", "--image-size", "16", "--epochs", "2", "--batch-size", "8",
                "--out", str(out), "--no-progress", "train.ckpt_every=5", "train.log_every=1",
                "train.log_seconds=1000", *STATEFUL[method], *extra]

    env = _env(tmp_path)
    _reference_run(cmd(tmp_path / "ref"), env, monkeypatch)
    ref = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")
    run = tmp_path / "killed"
    proc = _run_until(cmd(run), env, run, 23, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert 20 <= ckpt["step"] < 32 and ckpt["step"] % 16 != 0  # mid-epoch 2
    done = subprocess.run(cmd(run, "--resume"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    final = load_checkpoint(run / "checkpoints" / "last.pt")
    assert final["step"] == 32
    state = {"moco_v2": "queue", "byol": "target_backbone.stages.0.0.weight", "dino": "center"}[method]
    assert state in final["model"]
    _assert_same_weights(final["model"], ref["model"])


def test_sigterm_writes_a_checkpoint_and_resume_finishes_identically(resume_setup):
    tmp, data, ref = resume_setup
    run = tmp / "terminated"
    proc = _run_until(_cmd(data, run), _env(tmp), run, 12, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM
    err = proc.stderr.read()
    assert "SIGTERM received" in err and "--resume" in err
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == _last_step(run) >= 12  # the state at the moment it stopped, not an older one
    done = subprocess.run(_cmd(data, run, "--resume"), env=_env(tmp), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _assert_same_weights(load_checkpoint(run / "checkpoints" / "last.pt")["model"], ref["model"])


def _cfg(data, **train):
    return build_config("rotation", {"model": {"backbone": "convnet"}, "data": {"path": str(data), "image_size": 16},
                                     "train": {"epochs": 2, "batch_size": 16, "ckpt_every": 3, **train}})


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    original = Rotation.training_step
    calls = {"n": 0}

    def poisoned(self, batch):
        out = original(self, batch)
        calls["n"] += 1
        if calls["n"] == 5:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Rotation, "training_step", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(NonFiniteLoss, match=r"loss became nan at step 5 .*last good checkpoint"):
        pretrain(_cfg(tiny_dataset / "train"), run, progress=False)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def _nan_gradient_at(calls_to_poison):
    """A ``Rotation.training_step`` whose loss stays finite but whose gradient is NaN at the given
    calls (a loss ``x + 0 * sqrt(0 * w)``: its value is ``x``, its gradient ``0 * inf``)."""
    original = Rotation.training_step
    calls = {"n": 0}

    def poisoned(self, batch):
        out = original(self, batch)
        calls["n"] += 1
        if calls_to_poison == "all" or calls["n"] in calls_to_poison:
            w = next(self.backbone.parameters())
            out["loss"] = out["loss"] + 0 * (0 * w.sum()).sqrt()
        return out

    return poisoned


def test_a_finite_loss_with_nan_gradients_skips_the_step_and_never_writes_nan_weights(tiny_dataset, tmp_path,
                                                                                      monkeypatch):
    from selfsup.train import Trainer

    monkeypatch.setattr(Rotation, "training_step", _nan_gradient_at({2}))
    t = Trainer(_cfg(tiny_dataset / "train", device="cpu", precision="fp32"), tmp_path / "run", progress=False)
    before = {k: v.clone() for k, v in t.method.state_dict().items()}
    t.fit()
    assert t.skipped_steps == 1
    weights = t.method.state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in weights.items())  # the other steps were taken
    _assert_same_weights(load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"], weights)


def test_nan_gradients_step_after_step_stop_the_run_like_a_nan_loss(tiny_dataset, tmp_path, monkeypatch):
    import selfsup.train

    monkeypatch.setattr(Rotation, "training_step", _nan_gradient_at("all"))
    monkeypatch.setattr(selfsup.train, "MAX_NONFINITE_GRAD_STEPS", 2)
    with pytest.raises(NonFiniteLoss, match=r"gradients were NaN or Inf in 2 steps in a row"):
        pretrain(_cfg(tiny_dataset / "train", device="cpu", precision="fp32"), tmp_path / "run", progress=False)


def test_run_directory_contents_and_config_roundtrip(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset / "train", log_every=2)
    run = pretrain(cfg, tmp_path / "run", progress=False)
    saved = load_config(run / "config.yaml")
    assert saved == cfg
    assert yaml.safe_load((run / "config.yaml").read_text())["method"] == "rotation"
    rows = read_metrics(run)
    assert {"step", "epoch", "loss", "lr", "img_per_s", "pretext_acc", "elapsed_s"} <= rows[0].keys()
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]  # 64 images / 16 = 4 steps per epoch, 2 epochs
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 8 and ckpt["backbone_spec"]["name"] == "convnet"
    assert not list((run / "checkpoints").glob(".*tmp*"))  # no temporary file left behind
    with pytest.raises(Exception, match="already holds a run"):
        pretrain(cfg, run, progress=False)


def test_lr_schedule_warmup_then_cosine():
    cfg = build_config("rotation", {"optim": {"warmup_epochs": 1}})
    w = warmup_steps_for(cfg.optim, 4, 80)
    assert w == 4
    assert lr_factor(0, 80, 4) == pytest.approx(0.25) and lr_factor(3, 80, 4) == pytest.approx(1.0)
    assert lr_factor(4, 80, 4) == pytest.approx(1.0) and lr_factor(42, 80, 4) == pytest.approx(0.5)
    assert lr_factor(80, 80, 4) == pytest.approx(0.0, abs=1e-9)
    assert warmup_steps_for(cfg.optim, 100, 80) == 8  # capped at 10% of the run


def test_backbone_factor_holds_then_ramps_over_the_warmup():
    assert [backbone_factor(s, 5, 2) for s in (0, 4, 5, 6, 19)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert backbone_factor(0, 0, 2) == 1.0 and backbone_factor(5, 5, 0) == 1.0  # nothing held: no ramp


def test_freeze_backbone_frac_trains_the_heads_first_then_ramps_the_backbone_in(tiny_dataset, tmp_path):
    """``optim.freeze_backbone_frac=0.25`` of a 20-step run: the backbone's weights stay as they were for
    steps 0-4 while the head learns; from step 5 its rate is the run's times 1/2, then 1 (2 warm-up
    steps); the head's rate is the run's throughout."""
    from selfsup.train import Trainer

    cfg = _cfg(tiny_dataset / "train", epochs=5, device="cpu", precision="fp32")
    cfg.optim.freeze_backbone_frac, cfg.optim.warmup_epochs = 0.25, 0.5
    t = Trainer(cfg, tmp_path / "run", progress=False)
    assert (t.total_steps, t.steps_per_epoch, t.warmup_steps) == (20, 4, 2)
    assert t.freeze_backbone_steps == 5  # 0.25 of 20 steps
    cfg.optim.freeze_backbone_max_steps = 3
    assert Trainer(cfg, tmp_path / "capped", progress=False).freeze_backbone_steps == 3  # capped in steps
    cfg.optim.freeze_backbone_max_steps = 200
    base = cfg.optim.lr * cfg.train.batch_size / 256
    bb = [g for g in t.optimizer.param_groups if g.get("backbone")]
    heads = [g for g in t.optimizer.param_groups if not g.get("backbone")]
    assert {id(p) for g in bb for p in g["params"]} == {id(p) for p in t.method.backbone.parameters()}
    for step, fb in ((2, 0.0), (5, 0.5), (6, 1.0), (12, 1.0)):
        t.set_lr(step)
        f = lr_factor(step, 20, 2)
        assert all(g["lr"] == pytest.approx(base * f * fb) for g in bb)
        assert all(g["lr"] == pytest.approx(base * f) for g in heads)

    def params(module):
        return [p.detach().clone() for p in module.parameters()]

    start_bb, start_head = params(t.method.backbone), params(t.method.head)
    after = {}
    train_step = t.train_step

    def recorded(images, step):
        out = train_step(images, step)
        after[step] = params(t.method.backbone), params(t.method.head)
        return out

    t.train_step = recorded
    t.fit()
    for step in range(5):
        assert all(torch.equal(a, b) for a, b in zip(after[step][0], start_bb)), step
    assert not all(torch.equal(a, b) for a, b in zip(after[0][1], start_head))  # the head learns from step 0
    assert not all(torch.equal(a, b) for a, b in zip(after[5][0], start_bb))  # the backbone from step 5
    with pytest.raises(ConfigError, match="freeze_backbone_frac"):
        build_config("rotation", {"optim": {"freeze_backbone_frac": 1.0}})
    with pytest.raises(ConfigError, match="freeze_backbone_max_steps"):
        build_config("rotation", {"optim": {"freeze_backbone_max_steps": -1}})


def test_a_replan_that_lengthens_the_run_does_not_hold_a_backbone_that_already_learns(tiny_dataset, tmp_path):
    """A time-budget run re-measures its pace and grows from 20 to about 56 steps at step 8, after its backbone
    started to learn at step 5 (0.25 of 20): 0.25 of 56 would hold it again until step 14 (seen in a
    5-minute SimSiam run); it keeps 5, recorded in config.yaml as the cap so a resumed run holds the same.
    Before the backbone starts, a replan moves the hold with the run's length."""
    from selfsup.train import Trainer

    cfg = _cfg(tiny_dataset / "train", epochs=5, device="cpu", precision="fp32")
    cfg.optim.freeze_backbone_frac = 0.25

    def replanned(name: str, step: int) -> Trainer:
        t = Trainer(copy.deepcopy(cfg), tmp_path / name, progress=False)
        assert (t.total_steps, t.freeze_backbone_steps) == (20, 5)
        now = time.perf_counter()
        t.step, t.budget, t.started = step, 100.0, now - 50.0  # half the budget used, 1 s per step so far
        t._replan = {"marks": [0.3], "step": 0, "t0": now - step * 1.0, "end_s": 0.0}
        assert t.replan()
        return t

    t = replanned("started", 8)
    assert t.total_steps > 50 and round(0.25 * t.total_steps) > 10  # about 8 + (98 - 50) / 1 s
    assert t.freeze_backbone_steps == 5 and t.cfg.optim.freeze_backbone_max_steps == 5
    assert load_config(tmp_path / "started" / "config.yaml").optim.freeze_backbone_max_steps == 5
    t = replanned("held", 3)
    assert t.total_steps > 45 and t.freeze_backbone_steps == round(0.25 * t.total_steps) > 10
    assert t.cfg.optim.freeze_backbone_max_steps == 200


def test_undecodable_files_are_skipped_listed_and_the_run_goes_on(tiny_dataset, tmp_path):
    train = tiny_dataset / "train"
    (train / "class0" / "broken.png").write_bytes(b"not a png at all")
    (train / "class1" / "empty.jpg").write_bytes(b"")
    run = pretrain(_cfg(train), tmp_path / "run", progress=False)
    listed = (run / "skipped.txt").read_text()
    assert "broken.png" in listed and "empty.jpg" in listed
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 8


def test_fixed_lr_groups_keep_their_base_rate(tiny_dataset, tmp_path):
    cfg = build_config("simsiam", {"model": {"backbone": "convnet"},
                                   "data": {"path": str(tiny_dataset / "train"), "image_size": 16},
                                   "train": {"epochs": 2, "batch_size": 16},
                                   "params": {"proj_hidden_dim": 32, "proj_dim": 32, "pred_hidden_dim": 8}})
    from selfsup.train import Trainer

    t = Trainer(cfg, tmp_path / "run", progress=False)
    t.set_lr(t.total_steps - 1)  # near the end of the cosine: the schedule factor is ~0
    fixed = [g for g in t.optimizer.param_groups if g.get("fixed_lr")]
    others = [g for g in t.optimizer.param_groups if not g.get("fixed_lr")]
    assert fixed and others
    base = cfg.optim.lr * cfg.train.batch_size / 256
    assert all(g["lr"] == pytest.approx(base) for g in fixed)
    assert all(g["lr"] < 0.2 * base for g in others)


def test_training_views_can_be_smaller_than_the_images(tiny_dataset, tmp_path):
    """``data.view_size``: the augmented views at 8 px of 16 px images (cheaper steps); the backbone is
    stored and evaluated at the image size."""
    import numpy as np

    from selfsup.evaluate import load_encoder
    from selfsup.train import Trainer

    cfg = build_config("simclr", {"model": {"backbone": "convnet"},
                                  "data": {"path": str(tiny_dataset / "train"), "image_size": 16, "view_size": 8},
                                  "train": {"epochs": 1, "batch_size": 16, "device": "cpu"},
                                  "params": {"proj_hidden_dim": 32, "proj_dim": 16}})
    assert cfg.aug.size == 8
    t = Trainer(cfg, tmp_path / "run", progress=False)
    x = t.method.prepare(torch.from_numpy(np.array(t.data.images[:4])).permute(0, 3, 1, 2),
                         torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 8, 8)
    t.fit()
    assert load_encoder(tmp_path / "run").spec["image_size"] == 16
    # the same as a fraction of the image size, for any folder: 0.75 of 16 px, and of the size chosen from the images
    frac = {"model": {"backbone": "convnet"}, "data": {"path": str(tiny_dataset / "train"), "view_frac": 0.75},
            "train": {"batch_size": 16, "device": "cpu"},
            "params": {"proj_hidden_dim": 32, "proj_dim": 16}}
    assert build_config("simclr", {**frac, "data": {**frac["data"], "image_size": 16}}).aug.size == 12
    t = Trainer(build_config("simclr", frac), tmp_path / "auto", progress=False)
    assert t.cfg.data.image_size == 16 and t.cfg.aug.size == 12
    with pytest.raises(ConfigError, match="both set"):
        build_config("simclr", {**frac, "data": {**frac["data"], "view_size": 8}})
    with pytest.raises(ConfigError, match="view_frac must be in"):
        build_config("simclr", {**frac, "data": {**frac["data"], "view_frac": 1.5}})


def test_tensorboard_logger_writes_the_metrics_as_scalars(tiny_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from selfsup.train import Trainer

    cfg = build_config("rotation", {"model": {"backbone": "convnet"},
                                    "data": {"path": str(tiny_dataset / "train"), "image_size": 16},
                                    "train": {"epochs": 2, "batch_size": 16, "device": "cpu", "log_every": 1,
                                              "logger": "tensorboard"}, "optim": {"warmup_epochs": 0}})
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("loss")
    rows = read_metrics(tmp_path / "run")
    assert [e.step for e in loss] == [int(r["step"]) for r in rows]
    assert [round(e.value, 4) for e in loss] == [round(float(r["loss"]), 4) for r in rows]
    assert "rankme" in acc.Tags()["scalars"]
