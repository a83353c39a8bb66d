"""The command line, end to end: pretrain -> evaluate (pretrained and random baseline), errors."""

import json
import subprocess
import sys

import pytest

from conftest import assert_backbone_moved
from selfsup.cli import main


def test_methods_lists_one_line_per_method(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == [
        "rotation", "jigsaw", "relative_location", "deepcluster",  # context-based
        "colorization", "inpainting", "dcgan", "bigan", "mae",  # generation-based
        "simclr", "moco_v2", "byol", "simsiam", "barlow_twins", "vicreg", "moco_v3", "simclr_v2", "distill",
        "swav", "dino", "emp_ssl",  # joint-embedding
        "patches"]  # no gradient
    families = {ln.split()[0]: ln.split()[1] for ln in lines}
    assert families["jigsaw"] == "[context-based]" and families["mae"] == "[generation-based]"


def test_pretrain_then_evaluate(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--method", "simclr", "--data", str(tiny_dataset / "train"), "--backbone", "convnet",
                 "--image-size", "16", "--epochs", "2", "--batch-size", "16", "--out", str(run), "--no-progress",
                 "params.temperature=0.5", "optim.lr=0.3"]) == 0
    assert (run / "checkpoints" / "last.pt").exists()
    assert main(["evaluate", str(run), "--protocol", "knn", "--train", str(tiny_dataset), "--test",
                 str(tiny_dataset), "--no-progress"]) == 0
    assert "knn top-1:" in capsys.readouterr().out
    r = json.loads((run / "eval" / "knn.json").read_text())
    assert r["top1"] > 0.25 and r["backbone"]["image_size"] == 16  # 4 classes
    assert_backbone_moved(run)
    assert main(["evaluate", "random:convnet", "--image-size", "16", "--protocol", "linear", "--train",
                 str(tiny_dataset), "--test", str(tiny_dataset), "--out", str(tmp_path / "rnd"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "rnd" / "linear.json").read_text())["top1"] > 0.25


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--method", "rotation", "--data", "/no/such/folder"], "/no/such/folder"),
    (["pretrain", "--method", "rotation", "--data", "DATA", "optim.lrr=0.1"], "did you mean 'optim.lr'"),
    (["pretrain", "--method", "rotation", "--data", "DATA", "train.epochs=many"], "train.epochs: expected an integer"),
    (["pretrain", "--method", "rotation", "--data", "DATA", "oops"], "key=value"),
    (["pretrain", "--method", "rotation", "--data", "DATA", "--backbone", "vgg"], "unknown backbone 'vgg'"),
    (["pretrain", "--method", "rotation"], "no training data"),
    (["pretrain", "--method", "rotation", "--data", "DATA", "--batch-size", "1000"], "fewer than one batch"),
    (["pretrain", "--resume", "--out", "NOWHERE"], "no config.yaml"),
])
def test_bad_input_gives_a_clear_error_before_work(argv, message, tiny_dataset, tmp_path, capsys):
    argv = [str(tiny_dataset / "train") if a == "DATA" else str(tmp_path / "x") if a == "NOWHERE" else a
            for a in argv]
    assert main(argv + ["--no-progress"] if argv[0] == "pretrain" else argv) == 2
    assert message in capsys.readouterr().err


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["pretrain", "--method", "rotation", "--data", str(tmp_path / "empty"), "--no-progress"]) == 2
    assert "no image files" in capsys.readouterr().err


def test_unknown_method_is_rejected_by_the_parser():
    r = subprocess.run([sys.executable, "-m", "selfsup", "pretrain", "--method", "nope", "--data", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr and "rotation" in r.stderr


def test_help_mentions_every_command():
    r = subprocess.run([sys.executable, "-m", "selfsup", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("pretrain", "evaluate", "demo", "methods"):
        assert cmd in r.stdout


def test_demo_never_deletes_a_run_it_did_not_make(tmp_path, capsys):
    """A second ``selfsup demo --out DIR`` (or one pointed at the user's runs) refuses in one line and
    leaves what is there untouched; it used to delete DIR/rotation and DIR/simclr."""
    ckpt = tmp_path / "simclr" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"a run of the user's")
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "already exists" in err and "another --out" in err and "Traceback" not in err
    assert ckpt.read_bytes() == b"a run of the user's" and not (tmp_path / "rotation").exists()


def test_the_api_chains_pretrain_into_evaluate_and_revalidates_a_changed_config(tiny_dataset, tmp_path):
    """``selfsup.evaluate(selfsup.pretrain(...), ...)``: pretrain returns a Path, evaluate takes it (and
    Paths for the data). A Config changed after build_config is derived and checked again by Trainer."""
    import selfsup
    from selfsup.config import ConfigError

    cfg = selfsup.build_config("rotation", {"model": {"backbone": "convnet"}, "optim": {"warmup_epochs": 0},
                                            "train": {"epochs": 1, "batch_size": 16, "device": "cpu"}})
    cfg.data.path, cfg.data.image_size = str(tiny_dataset / "train"), 16  # changed after build_config
    assert cfg.aug.size == 0  # stale (0: the size is chosen from the data) until the Trainer derives it again
    run = selfsup.pretrain(cfg, tmp_path / "run", progress=False)
    assert isinstance(run, type(tmp_path)) and cfg.aug.size == 16
    res = selfsup.evaluate(run, "knn", tiny_dataset, tiny_dataset, k=5, progress=False)
    assert 0.0 <= res["top1"] <= 1.0 and res["backbone"]["image_size"] == 16

    bad = selfsup.build_config("rotation", {"train": {"device": "cpu"}})
    bad.params["no_such_param"] = 1
    with pytest.raises(ConfigError, match="no_such_param"):
        selfsup.Trainer(bad, tmp_path / "bad", progress=False)
    bad = selfsup.build_config("rotation", {"train": {"device": "cpu"}})
    bad.train.batch_size = 0
    with pytest.raises(ConfigError, match="batch_size"):
        selfsup.Trainer(bad, tmp_path / "bad", progress=False)
