"""The run directory module (selfsup.run): results, metrics and the saved config, read back safely."""

import json

import pytest

from selfsup.config import ConfigError
from selfsup.configure import build_config, resume_config
from selfsup.run import eval_dir, read_metrics, read_results, read_saved_config, write_result


def test_results_are_written_whole_and_junk_is_left_out(tmp_path):
    folder = eval_dir(tmp_path)
    path = write_result(folder, "knn", {"top1": 0.5, "k": 20})
    assert path == tmp_path / "eval" / "knn.json" and json.loads(path.read_text()) == {"top1": 0.5, "k": 20}
    assert [p.name for p in folder.iterdir()] == ["knn.json"]  # no temporary file left behind
    write_result(folder, "linear", {"top1": 0.625})
    (folder / "broken.json").write_text('{"top1": 0.')  # cut short
    (folder / "plan.json").write_text('{"steps": 3}')  # not a result
    (folder / "list.json").write_text("[1, 2]")
    assert read_results(tmp_path) == {"knn": {"top1": 0.5, "k": 20}, "linear": {"top1": 0.625}}
    # a folder of result files itself (evaluate random:... --out DIR)
    assert set(read_results(folder)) == {"knn", "linear"}


def test_metrics_and_saved_config(tmp_path):
    assert read_metrics(tmp_path, missing_ok=True) == []
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path)
    (tmp_path / "metrics.csv").write_text("step,loss\n1,2.5\n2,2.0\n")
    assert read_metrics(tmp_path) == [{"step": "1", "loss": "2.5"}, {"step": "2", "loss": "2.0"}]

    with pytest.raises(ConfigError, match="has no config.yaml"):
        read_saved_config(tmp_path)
    with pytest.raises(ConfigError, match="--resume: .* has no config.yaml"):
        resume_config(tmp_path)
    (tmp_path / "config.yaml").write_text("a: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_saved_config(tmp_path)
    (tmp_path / "config.yaml").write_text("model: {}\n")
    with pytest.raises(ConfigError, match="not a selfsup run config"):
        read_saved_config(tmp_path)

    from selfsup.config import save_config

    cfg = build_config("barlow_twins", {"params": {"lambd": 0.01}, "train": {"epochs": 3}})
    save_config(cfg, tmp_path / "config.yaml")
    back = resume_config(tmp_path, {"train": {"epochs": 5}})
    assert back.train.epochs == 5 and back.params == {**cfg.params} and back.params["lambd"] == 0.01
