"""Distributed training is provably right: 2 processes x batch B give the loss and the gradients of
1 process x batch 2B (gloo, CPU), for every method whose loss couples the samples of a batch; and a
2-process `torchrun ... -m selfsup pretrain` run trains, writes once (rank 0) and resumes."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def _torchrun(nproc: int, args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    # the reference, one process with the whole batch, runs here (no process group: 1 s, not a torchrun
    # launch of 8 s); the two processes under torchrun
    sys.path.insert(0, str(HERE / "helpers"))
    try:
        import dist_worker
    finally:
        sys.path.pop(0)
    dist_worker.main(str(tmp / "w1.pt"))
    _torchrun(2, [str(HERE / "helpers" / "dist_worker.py"), str(tmp / "w2.pt")], tmp)
    return {n: torch.load(tmp / f"w{n}.pt", weights_only=True) for n in (1, 2)}


def test_gather_with_gradients_sums_gradients_over_processes(worker_results):
    g = worker_results[2]["gather"]
    # rank r contributes a (2, 3) block of value r+1, gathered in rank order
    assert torch.equal(g["value"], torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)]))
    # loss_r = sum(y * idx) on each rank, so d(sum_r loss_r)/dx_r = 2 * idx[rank's slice]
    idx = torch.arange(12, dtype=torch.float32).view(4, 3)
    assert torch.equal(g["all_grads"][0], 2 * idx[:2]) and torch.equal(g["all_grads"][1], 2 * idx[2:])


@pytest.mark.parametrize("method", ["simclr", "barlow_twins", "vicreg", "swav", "dino", "moco_v3"])
def test_two_processes_match_one_process_with_twice_the_batch(worker_results, method):
    one, two = worker_results[1][method], worker_results[2][method]
    assert torch.allclose(one["loss"], two["loss"], rtol=1e-5, atol=1e-6), (one["loss"], two["loss"])
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 10
    scale = max(float(g.abs().max()) for g in one["grads"].values())
    for k in one["grads"]:  # float32 round-off only (gradients that are exactly 0 in theory are ~1e-6)
        a, b = one["grads"][k], two["grads"][k]
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * scale), (k, (a - b).abs().max(), scale)
    # a wrong gather (no all-reduce in the backward) would halve the cross-process gradient terms: make sure
    # the gradients are not trivially small, so the comparison above has teeth
    assert sum(float(g.abs().sum()) for g in one["grads"].values()) > 1e-3


def test_dino_centre_moves_to_the_global_batch_mean(worker_results):
    """DINO's centre update all-reduces the teacher outputs: after one step every process holds the centre
    of the single-process run on the whole batch (a per-process mean would differ: different images)."""
    one, two = worker_results[1]["dino"], worker_results[2]["dino"]
    assert torch.equal(one["center_before"], two["center_before"])
    assert not torch.allclose(one["center"], one["center_before"], atol=1e-3)  # it moved
    diff = (one["center"] - two["center"]).abs().max()
    assert torch.allclose(one["center"], two["center"], rtol=1e-5, atol=1e-6), diff


def test_sinkhorn_codes_of_two_processes_are_those_of_the_global_batch(worker_results):
    """SwAV's Sinkhorn all-reduces its sums over the batch: the codes of 2 processes x 4 samples are the
    rows of the codes of 1 process x 8 samples, which a per-process Sinkhorn does not give."""
    from selfsup.losses import sinkhorn

    one, two = worker_results[1]["sinkhorn"], worker_results[2]["sinkhorn"]
    assert torch.allclose(one["codes"], two["codes"], rtol=1e-5, atol=1e-6), (one["codes"] - two["codes"]).abs().max()
    scores = one["scores"]
    local = torch.cat([sinkhorn(scores[:4], 0.5, 3), sinkhorn(scores[4:], 0.5, 3)])
    assert (local - one["codes"]).abs().max() > 1e-2  # the test would see a missing all-reduce


def test_torchrun_pretrain_two_processes_writes_once_and_resumes(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    base = ["-m", "selfsup", "pretrain", "--data", str(tiny_dataset / "train"), "--out", str(run), "--backbone",
            "convnet", "--image-size", "16", "--batch-size", "16", "--no-progress"]
    _torchrun(2, base + ["--method", "simclr", "--epochs", "1", "train.log_every=1",
                         "params.proj_hidden_dim=64", "params.proj_dim=32"], tmp_path)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]  # 64 images / global batch 16; one writer
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4
    _torchrun(2, base + ["--resume", "--epochs", "2"], tmp_path)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 8


def test_torchrun_deepcluster_two_processes(tiny_dataset, tmp_path):
    """DeepCluster under torchrun: one clustering (rank 0's, broadcast), each process labels its own
    slice of the batch by dataset index; the run trains and its checkpoint holds the labels."""
    run = tmp_path / "dc"
    _torchrun(2, ["-m", "selfsup", "pretrain", "--method", "deepcluster", "--data", str(tiny_dataset / "train"),
                  "--out", str(run), "--backbone", "convnet", "--image-size", "16", "--batch-size", "16",
                  "--epochs", "2", "--no-progress", "train.log_every=1", "params.num_clusters=4",
                  "params.pca_dim=8", "params.kmeans_iters=5"], tmp_path)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert all(math.isfinite(float(r["loss"])) and 0 <= float(r["pretext_acc"]) <= 1 for r in rows)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]["_extra_state"]
    assert state["epoch"] == 1 and state["labels"].shape == (64,) and int(state["labels"].max()) <= 3
