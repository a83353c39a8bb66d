"""The time budget (``--time``): its plan, its rehearsal that leaves no trace, exact resume; the plain
progress lines; ``params.KEY=...`` overrides that merge into the preset."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml

import selfsup.train as train_mod
from selfsup.cli import main
from selfsup.config import ConfigError, parse_duration
from selfsup.configure import build_config
from selfsup.train import Trainer, TrainingInterrupted, planned_steps
from selfsup.run import read_metrics
from selfsup.configure import resume_config


def test_durations():
    assert [parse_duration(t) for t in ("90s", "20m", "2h", "1h30m", "45", "1.5m", "2m 30s")] == \
        [90, 1200, 7200, 5400, 45, 90, 150]
    for bad in ("abc", "0s", "5x", "m", "-3", "10m extra"):
        with pytest.raises(ConfigError):
            parse_duration(bad)
    with pytest.raises(ConfigError, match="time budget"):
        build_config("rotation", {"train": {"time_budget": "soon"}})


def test_planned_steps_by_hand():
    # 0.1 s a step, 1 s at every epoch end (10 steps), 0.5 s per checkpoint (every 25 steps), 10 s:
    # 49 steps cost 4.9 + 4 + 0.5 = 9.4 s; 50 steps cost 5 + 5 + 1 = 11 s
    assert planned_steps(10.0, 0.1, 10, 0, 1.0, 0.5, 25) == 49
    # from step 20 on, 5 s: to step 45 -> 2.5 + 2 (epoch ends 30, 40) + 0.5 (checkpoint 25) = 5.0; 46 -> 5.1
    assert planned_steps(5.0, 0.1, 10, 20, 1.0, 0.5, 25) == 45
    assert planned_steps(-3.0, 0.1, 10, 0, 1.0, 0.5, 25) == 1  # no time left: one step, never zero


def _cfg(data, method="rotation", **train):
    over = {"model": {"backbone": "convnet"}, "data": {"path": str(data), "image_size": 16},
            "train": {"batch_size": 16, "ckpt_every": 1000, "device": "cpu", "log_every": 4, **train},
            "optim": {"warmup_epochs": 0}}
    if method == "byol":
        over["params"] = {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32}
    if method == "deepcluster":
        over["params"] = {"num_clusters": 4, "pca_dim": 8, "kmeans_iters": 3}
    return build_config(method, over)


@pytest.mark.parametrize("method", ["rotation", "byol", "deepcluster"])
def test_a_budget_run_plans_its_length_and_the_rehearsal_leaves_no_trace(method, tiny_dataset, tmp_path,
                                                                          monkeypatch, caplog):
    """A run with a time budget measures its steps on a rehearsal that it then rolls back, fixes
    ``total_steps`` and records it in config.yaml. Interrupted after the plan and resumed, it ends
    bit-identical to a run given that length from the start (no budget, no rehearsal)."""
    monkeypatch.setattr(train_mod, "PLAN_MIN_SECONDS", 0.2)
    # the length itself is the plan's arithmetic (test_planned_steps_by_hand); fixed here, so that a slow
    # or busy machine (a CI run spent 1.5 s of a 3 s budget on the figures) cannot leave room for 1 step
    monkeypatch.setattr(train_mod, "planned_steps", lambda *args: 10)
    monkeypatch.setattr(Trainer, "draw_figures", lambda self: [])
    cfg = _cfg(tiny_dataset / "train", method, time_budget="5s")
    budget = Trainer(cfg, tmp_path / "budget", progress=False)
    assert not budget.planned
    fit_step = budget.train_step

    def stop_after_plan(images, s):  # a SIGTERM in the 3rd step of the real run (not of the rehearsal)
        out = fit_step(images, s)
        if budget.planned and s == 2:
            budget._stop_signal = 15
        return out

    budget.train_step = stop_after_plan
    with caplog.at_level(logging.INFO, logger="selfsup"), pytest.raises(TrainingInterrupted):
        budget.fit()
    assert "time budget 5s:" in caplog.text and "steps); expected end" in caplog.text
    total = budget.total_steps
    saved = yaml.safe_load((tmp_path / "budget" / "config.yaml").read_text())
    assert saved["train"]["total_steps"] == total and saved["train"]["time_budget"] == "5s"
    assert total == 10  # room for more than the steps before the interruption

    resumed = Trainer(resume_config(tmp_path / "budget"), tmp_path / "budget", resume=True, progress=False)
    assert resumed.planned and resumed.total_steps == total and resumed.step == 3
    resumed.fit()
    assert int(read_metrics(tmp_path / "budget")[-1]["step"]) == total  # may end mid-epoch

    fixed = Trainer(_cfg(tiny_dataset / "train", method, total_steps=total), tmp_path / "fixed", progress=False)
    fixed.fit()
    _assert_same(fixed.state()["model"], resumed.state()["model"])


def _assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if k != "history":  # DeepCluster's log of its clusterings (wall-clock seconds)
                _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_the_budget_is_kept_and_progress_lines_are_written_without_a_terminal(tiny_dataset, tmp_path, caplog):
    """The real probe (not shortened); a 6 s budget ends within it (with slack for this machine's noise:
    the accuracy of the plan is measured in benchmarks/results_table.py, not here)."""
    import time

    cfg = _cfg(tiny_dataset / "train", time_budget="6s", log_seconds=0.0)
    t0 = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="selfsup"):
        Trainer(cfg, tmp_path / "run", progress=True).fit()  # pytest's stderr is not a terminal: lines
    assert time.perf_counter() - t0 < 6 * 1.5
    total = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["total_steps"]
    assert f"step {total}/{total}" in caplog.text and "img/s" in caplog.text and "ETA" in caplog.text


def test_params_overrides_merge_into_the_preset(tiny_dataset, tmp_path):
    # barlow_twins' preset has scale_loss 0.1 (its dataclass default is 1.0) and proj_hidden_dim 2048
    cfg = build_config("barlow_twins", {"params": {"lambd": 0.005}})
    assert cfg.params["lambd"] == 0.005 and cfg.params["scale_loss"] == 0.1 and cfg.params["view2_solarize_p"] == 0.2
    from selfsup.methods.barlow_twins import BarlowTwins

    assert BarlowTwins.Params().scale_loss == 1.0  # so the preset's value above did not come from the defaults
    # on --resume: the saved params stay, the override changes one key
    run = tmp_path / "run"
    assert main(["pretrain", "--method", "barlow_twins", "--data", str(tiny_dataset / "train"), "--out", str(run),
                 "--backbone", "convnet", "--image-size", "16", "--batch-size", "16", "--epochs", "1",
                 "--no-progress", "params.proj_hidden_dim=32", "params.proj_dim=16"]) == 0
    again = resume_config(run, {"params": {"lambd": 0.01}, "train": {"epochs": 2}})
    assert again.params["lambd"] == 0.01 and again.params["proj_hidden_dim"] == 32 and again.params["scale_loss"] == 0.1


def test_swav_rehearses_with_its_queue_in_use_and_the_plan_rolls_it_back(tiny_dataset, tmp_path, monkeypatch):
    """SwAV's queue makes a step dearer once full (from ``queue_start_frac`` of the run on): the budget's
    rehearsal times steps with the queue in use (``Method.rehearse``), then the real run starts empty."""
    monkeypatch.setattr(train_mod, "PLAN_MIN_SECONDS", 0.2)
    cfg = _cfg(tiny_dataset / "train", "swav", time_budget="3s")
    cfg.params.update(proj_hidden_dim=32, proj_dim=16, num_prototypes=8, queue_length=32, n_local=2)
    trainer = Trainer(cfg, tmp_path / "swav", progress=False)
    m, seen = trainer.method, []
    step = trainer.train_step

    def record(images, s):
        seen.append((trainer.planned, m.queue_in_use()))
        return step(images, s)

    trainer.train_step = record
    trainer.fit()
    rehearsal = [used for planned, used in seen if not planned]
    run = [used for planned, used in seen if planned]
    assert rehearsal and all(rehearsal)  # every rehearsal step with a full queue
    assert run and not run[0]  # the run itself starts with an empty queue (restored)


def test_a_run_that_slows_down_after_its_plan_replans_and_still_ends_on_time(tiny_dataset, tmp_path,
                                                                              monkeypatch, caplog):
    """The machine gets slower after the rehearsal (each real step sleeps 60 ms more): at 30% of the
    budget the run re-measures its pace, shortens itself, records the new length and ends near the
    budget instead of far past it."""
    import time

    monkeypatch.setattr(train_mod, "PLAN_MIN_SECONDS", 0.2)
    monkeypatch.setattr(train_mod, "REPLAN_AT", (0.3,))
    monkeypatch.setattr(train_mod, "REPLAN_MIN_BUDGET", 1.0)
    monkeypatch.setattr(Trainer, "draw_figures", lambda self: [])
    cfg = _cfg(tiny_dataset / "train", time_budget="5s")
    t = Trainer(cfg, tmp_path / "run", progress=False)
    fit_step = t.train_step

    def slower(images, s):
        if t.planned:
            time.sleep(0.06)
        return fit_step(images, s)

    t.train_step = slower
    t0 = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="selfsup"):
        t.fit()
    took = time.perf_counter() - t0
    planned = int(caplog.text.split(" -> ")[1].split(" steps")[0])
    assert "instead of" in caplog.text and t.total_steps < planned
    assert took < 5 * 1.25, took
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["total_steps"]
    assert saved == t.total_steps == int(read_metrics(tmp_path / "run")[-1]["step"])


def test_a_recipe_runs_over_its_methods_preset_and_keeps_checkpoints_by_time(tiny_dataset, tmp_path, capsys):
    """``--recipe fast_vicreg``: the recipe's method and settings over the method's preset, the command
    line's on top; ``train.keep_seconds`` keeps the step reached at a time mark (a curve of one run).
    ``--recipe fast`` is the patches layer with its output whitening."""
    from selfsup.config import recipe
    from selfsup.evaluate import load_encoder

    method, settings = recipe("fast")
    assert method == "patches" and settings["params"]["whiten_dim"] > 0
    run = tmp_path / "run"
    assert main(["pretrain", "--recipe", "fast_vicreg", "--data", str(tiny_dataset / "train"), "--image-size", "16",
                 "--epochs", "1", "--batch-size", "16", "--out", str(run), "--no-progress",
                 "params.proj_hidden_dim=32", "params.proj_dim=16", "train.keep_seconds=[0.001]"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == "vicreg" and saved["model"]["backbone"] == "airbench"  # the recipe
    assert saved["data"]["view_frac"] == 0.75 and saved["aug"]["size"] == 12  # its views: 3/4 of 16 px
    assert saved["optim"]["lars_clip"] is False  # the vicreg preset under it
    assert saved["train"]["batch_size"] == 16 and saved["params"]["proj_dim"] == 16  # the command line on top
    kept = run / "checkpoints" / "at_0.001s.pt"
    assert kept.exists() and load_encoder(kept).spec["name"] == "airbench"
    assert main(["pretrain", "--recipe", "fast_vicreg", "--method", "simclr", "--data", str(tiny_dataset / "train"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "drop --method" in capsys.readouterr().err


def test_results_table_random_row_is_the_mean_of_its_initialisations(tiny_dataset, tmp_path):
    """benchmarks/results_table.py: the random-init row is evaluated with ``--seed 0..N-1`` of ``selfsup
    evaluate`` (N = ``--random-seeds``) and is their mean; each seed's figures are those of its own eval."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "results_table.py"
    out = tmp_path / "table"
    subprocess.run([sys.executable, str(script), "--data", str(tiny_dataset), "--out", str(out), "--methods",
                    "--image-size", "16", "--k", "5", "--random-seeds", "2"], check=True, capture_output=True)
    row = json.loads((out / "results.json").read_text())["random:convnet"]
    for s, d in (("0", out / "random"), ("1", out / "random_s1")):
        for p in ("knn", "linear"):
            ev = json.loads((d / "eval" / f"{p}.json").read_text())
            assert row["seeds"][s][p] == ev["top1"]
    assert json.loads((out / "random_s1" / "eval" / "knn.json").read_text())["seed"] == 1
    for p in ("knn", "linear"):
        assert row[p] == pytest.approx((row["seeds"]["0"][p] + row["seeds"]["1"][p]) / 2)
    table = (out / "results.md").read_text()
    assert "random:convnet (mean of 2 initialisations: kNN" in table


def test_one_machine_table_completes_a_run_with_the_earlier_rows_of_that_machine(tmp_path):
    """benchmarks/one_machine_table.py: the table's own rows are kept, the methods it lacks come from the
    committed fp32 results (means of three seeds), a preset measured again since (presets_5m_fp32.json)
    replaces its row, each row says its source, and a row counts as above random init only when both probes
    are above the random row's mean, "level" when not above every initialisation."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    seeds = {"0": {"knn": 0.42, "linear": 0.44}, "1": {"knn": 0.40, "linear": 0.42}}
    rows = {"random:convnet": {"knn": 0.41, "linear": 0.43, "seeds": seeds},
            "moco_v2": {"knn": 0.43, "linear": 0.45, "steps": 300},  # above every initialisation
            "moco_v3": {"knn": 0.415, "linear": 0.45, "steps": 200},  # above the mean only: level
            "barlow_twins": {"knn": 0.40, "linear": 0.50, "steps": 300},  # below on kNN
            "byol": {"knn": 0.10, "linear": 0.10, "steps": 300},  # measured again since: presets_5m_fp32.json
            "simclr_v2": {"knn": 0.30, "linear": 0.30, "steps": 300}}  # more seeds in seeds_5m_fp32.json
    (tmp_path / "t.json").write_text(json.dumps({"settings": {}, "rows": rows}))
    subprocess.run([sys.executable, str(root / "benchmarks" / "one_machine_table.py"), "--table", str(tmp_path / "t"),
                    "--out", str(tmp_path / "all")], check=True, capture_output=True)
    got = json.loads((tmp_path / "all.json").read_text())
    results = root / "benchmarks" / "results"
    earlier = json.loads((results / "budget_5m.json").read_text())["rows"]
    assert got["rows"]["jigsaw"]["knn"] == earlier["jigsaw"]["knn"] and "fp32" in earlier["jigsaw"]["machine"]
    assert "simclr" not in got["rows"]  # measured on the faster machine only: not taken
    # a method with more seeds: the mean of the committed seeds file's values replaces the table's own
    more = json.loads((results / "seeds_5m_fp32.json").read_text())["rows"]["simclr_v2"]
    knns = [s["knn"] for s in more["seeds"].values()]
    assert len(knns) == 3 and got["rows"]["simclr_v2"]["knn"] == pytest.approx(sum(knns) / 3)
    assert "mean of 3 seeds" in got["rows"]["simclr_v2"]["source"]
    # presets measured again as they are now replace the table's rows and the earlier ones (SwAV's)
    now = json.loads((results / "presets_5m_fp32.json").read_text())["rows"]
    for name in ("byol", "swav"):
        vals = [s["knn"] for s in now[name]["seeds"].values()]
        assert got["rows"][name]["knn"] == pytest.approx(sum(vals) / len(vals))
        assert got["rows"][name]["source"].startswith("presets_5m_fp32.json (2026-12-07: optim.freeze_backbone_frac=")
    assert got["rows"]["moco_v2"]["source"] == "t.json" and got["rows"]["moco_v2"]["knn"] == 0.43
    md = (tmp_path / "all.md").read_text()
    assert "| moco_v2 | 0.430 |" in md and "| moco_v3 (level: above the mean" in md
    assert "| barlow_twins (not above random init) |" in md
    # above the mean on both: moco_v2, moco_v3, and the other rows whose both probes beat 0.41 / 0.43
    trained = {n: r for n, r in got["rows"].items() if not n.startswith("random:")}
    bar = {n: got["rows"][r.get("baseline", "random:convnet")] for n, r in trained.items()}
    above = [n for n, r in trained.items() if r["knn"] > bar[n]["knn"] and r["linear"] > bar[n]["linear"]]
    assert got["summary"].startswith(f"{len(above)} of {len(trained)} rows above random init (0.410 / 0.430")
    names = list(got["rows"])  # MAE (a ViT, mae_5m_fp32.json) against its own random-init row, shown above it
    assert names[names.index("mae") - 1] == "random:vit_tiny" and bar["mae"] is got["rows"]["random:vit_tiny"]
    assert "mae against random:vit_tiny (0.334 / 0.392)" in got["summary"] and "mae" not in got["summary"].split("missing:")[1]
