"""Runs that survive damage: the previous checkpoint is kept, damaged / foreign / hostile checkpoints
get one clear line in every command that reads them, resume on a machine with fewer GPUs, a full disk
while writing a checkpoint."""

from __future__ import annotations

import errno
import os
import pickle
import shutil

import pytest
import torch

import selfsup.checkpoint as ckpt_mod
from selfsup.checkpoint import CheckpointError, load_checkpoint
from selfsup.cli import main
from selfsup.configure import build_config
from selfsup.train import Trainer, restore_cuda_rng


def _cfg(data, method="rotation", **train):
    over = {"model": {"backbone": "convnet"}, "data": {"path": str(data), "image_size": 16},
            "train": {"epochs": 2, "batch_size": 16, "ckpt_every": 2, "log_every": 4, "device": "cpu", **train}}
    if method == "byol":
        over["params"] = {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32}
    return build_config(method, over)


def _train(data, run, method="rotation", **train) -> Trainer:
    t = Trainer(_cfg(data, method, **train), run, progress=False)
    t.draw_figures = list  # pictures are tested elsewhere
    t.fit()
    return t


@pytest.fixture
def run(tiny_dataset, tmp_path):
    """A finished 8-step rotation run, checkpoints every 2 steps: last.pt (step 8), previous.pt (step 6)."""
    t = _train(tiny_dataset / "train", tmp_path / "run")
    return tmp_path / "run", t


def _truncate(path, n=1000):
    data = path.read_bytes()[:n]
    path.write_bytes(data)


def _cli(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_the_previous_checkpoint_is_kept_and_keep_every(tiny_dataset, tmp_path, run):
    run_dir, _ = run
    last, previous = (load_checkpoint(run_dir / "checkpoints" / n) for n in ("last.pt", "previous.pt"))
    assert (last["step"], previous["step"]) == (8, 6)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt", "previous.pt"]  # no temp files
    _train(tiny_dataset / "train", tmp_path / "kept", keep_every=4)
    names = sorted(p.name for p in (tmp_path / "kept" / "checkpoints").iterdir())
    assert names == ["last.pt", "previous.pt", "step_4.pt", "step_8.pt"]
    assert load_checkpoint(tmp_path / "kept" / "checkpoints" / "step_4.pt")["step"] == 4
    _train(tiny_dataset / "train", tmp_path / "kept3", keep_every=3)  # not a multiple of ckpt_every (2)
    names = sorted(p.name for p in (tmp_path / "kept3" / "checkpoints").iterdir())
    assert names == ["last.pt", "previous.pt", "step_3.pt", "step_6.pt"]
    assert load_checkpoint(tmp_path / "kept3" / "checkpoints" / "step_3.pt")["step"] == 3


def test_resume_from_a_damaged_last_checkpoint_continues_from_the_previous_one(tiny_dataset, run, capsys, caplog):
    run_dir, straight = run
    _truncate(run_dir / "checkpoints" / "last.pt")
    # the data moved since: --data given again
    moved = run_dir.parent / "moved"
    shutil.copytree(tiny_dataset / "train", moved)
    code, text = _cli(["pretrain", "--out", str(run_dir), "--resume", "--data", str(moved), "--no-progress"], capsys)
    assert code == 0, text
    assert "damaged or truncated" in caplog.text and "continuing from previous.pt (step 6)" in caplog.text
    resumed = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert resumed["step"] == 8
    for k, v in straight.state()["model"].items():  # steps 7-8 replayed exactly
        assert torch.equal(resumed["model"][k], v), k


def _hostile(path, marker):
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path.write_bytes(pickle.dumps({"model": Boom()}))


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "hostile", "foreign", "folder"])
def test_every_command_answers_a_bad_checkpoint_in_one_line(damage, run, tmp_path, capsys, tiny_dataset):
    run_dir, _ = run
    last = run_dir / "checkpoints" / "last.pt"
    marker = tmp_path / "executed"
    (run_dir / "checkpoints" / "previous.pt").unlink()  # nothing to fall back to
    if damage == "truncated":
        _truncate(last)
    elif damage == "empty":
        last.write_bytes(b"")
    elif damage == "text":
        last.write_text("hello, not a checkpoint\n")
    elif damage == "hostile":
        _hostile(last, marker)
    elif damage == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, last)  # some other program's torch file
    else:
        last.unlink()
        last.mkdir()
    expected = {"truncated": "damaged or truncated", "empty": "damaged or truncated", "text": "not a readable",
                "hostile": "refused", "foreign": "not a selfsup checkpoint", "folder": "a folder"}[damage]
    data = str(tiny_dataset)
    for argv in (["evaluate", str(run_dir), "--protocol", "knn", "--train", data, "--test", data, "--no-progress"],
                 ["export", str(run_dir)], ["embed", str(run_dir), "--data", data, "--out", str(tmp_path / "e")],
                 ["report", str(run_dir), "--data", data],
                 ["pretrain", "--out", str(run_dir), "--resume", "--no-progress"]):
        code, text = _cli(argv, capsys)
        assert code == 2, (argv, text)
        lines = [line for line in text.splitlines() if line.startswith("selfsup ") and "error" in line]
        assert len(lines) == 1 and "last.pt" in lines[0] and expected in lines[0], (argv, text)
        assert "Traceback" not in text
    assert not marker.exists()  # the hostile pickle was refused, never run


def test_a_checkpoint_of_another_run_is_refused(tiny_dataset, tmp_path, run, capsys):
    run_dir, _ = run
    other = _train(tiny_dataset / "train", tmp_path / "byol", method="byol", epochs=1)
    for name in ("last.pt", "previous.pt"):
        shutil.copy(other.ckpt_path, run_dir / "checkpoints" / name)
    data = str(tiny_dataset)
    for argv in (["pretrain", "--out", str(run_dir), "--resume", "--no-progress"],
                 ["evaluate", str(run_dir), "--protocol", "knn", "--train", data, "--test", data, "--no-progress"],
                 ["export", str(run_dir)]):
        code, text = _cli(argv, capsys)
        assert code == 2 and "a checkpoint of a byol run with backbone convnet" in text and "rotation" in text, text
        assert "Traceback" not in text


def test_load_backbone_answers_a_damaged_export(run, capsys):
    from selfsup import load_backbone

    run_dir, _ = run
    code, _ = _cli(["export", str(run_dir)], capsys)
    assert code == 0
    path = run_dir / "export" / "backbone.safetensors"
    _truncate(path, 200)
    with pytest.raises(CheckpointError, match="not a usable exported backbone"):
        load_backbone(path)


def test_cuda_generators_restore_onto_the_gpus_this_machine_has(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(device))
    states = [torch.zeros(16, dtype=torch.uint8) for _ in range(8)]  # saved on 8 GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    restore_cuda_rng(states)
    assert calls == [0]  # resumed on 1 GPU: its generator only
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    calls.clear()
    restore_cuda_rng(states[:1])  # saved on 1, resumed on 2
    assert calls == [0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU-only machine, CUDA run
    calls.clear()
    restore_cuda_rng(states)
    assert calls == []


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoints(tiny_dataset, tmp_path, monkeypatch):
    t = Trainer(_cfg(tiny_dataset / "train", epochs=2), tmp_path / "run", progress=False)
    t.draw_figures = list
    real_save = torch.save
    saves = []

    def full_disk(obj, f, *a, **k):
        saves.append(1)
        if len(saves) == 3:  # the checkpoint of step 6: the disk is full
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*last.pt and previous.pt kept"):
        t.fit()
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "previous.pt"]  # no temporary file left
    assert load_checkpoint(folder / "last.pt")["step"] == 4 and load_checkpoint(folder / "previous.pt")["step"] == 2


def test_a_full_disk_for_the_decode_cache_is_a_clear_error_and_keeps_the_old_entry(tiny_dataset, tmp_path,
                                                                                   monkeypatch):
    import json
    from collections import namedtuple

    import selfsup.data.cache as cache
    from selfsup.data import DataError, load_images

    folder = tmp_path / "imgs"
    shutil.copytree(tiny_dataset / "train", folder)
    cache_dir = tmp_path / "c"
    old = load_images(str(folder), image_size=16, cache_dir=str(cache_dir), progress=False)
    entries = sorted(p.name for p in cache_dir.iterdir())
    (folder / "class0" / "000.png").unlink()  # the folder changed: its entry must be rebuilt
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))  # 1 MB free
    with pytest.raises(DataError, match=r"needs 0 MB .* has 1 MB free; set SELFSUP_CACHE"):
        load_images(str(folder), image_size=16, cache_dir=str(cache_dir), progress=False)
    monkeypatch.undo()
    # the disk fills up while the entry is written: a clear error, no temporary file, the old entry kept
    monkeypatch.setattr(cache.json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space "
                                                                                         "left on device")))
    with pytest.raises(DataError, match=r"No space left on device\); earlier cache entries are untouched"):
        load_images(str(folder), image_size=16, cache_dir=str(cache_dir), progress=False)
    assert sorted(p.name for p in cache_dir.iterdir()) == entries
    monkeypatch.undo()
    json.loads((cache_dir / [n for n in entries if n.endswith(".json")][0]).read_text())  # still readable
    assert len(old) == 64
