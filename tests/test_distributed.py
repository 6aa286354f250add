"""Several processes give the single-process results (CPU, gloo, 2 processes): an optimizer step
on 2 x B frames equals one process on 2B; evaluate.py and mine_hard.py on 2 processes write
exactly what one process writes, with an odd number of frames (no sample dropped or counted twice)."""
import csv
import json
import os
import socket
import subprocess
import sys

import torch

from common.sa2va import load_model
from conftest import ROOT
from dist_step import LR


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv, world_size, timeout=600):
    """Run `python argv` as `world_size` processes of one gloo group; fail with their output."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen([sys.executable] + argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def test_two_processes_step_equals_one_process_on_the_double_batch(synth_data, tmp_path):
    """Per-process loss = mean over its B frames; the engine averages gradients over the 2
    processes, so the optimizer sees the gradient of the mean over 2B frames. Exact by construction:
    - gradients differ only by float32 summation order: a few ulps of the largest gradient element
      (measured 2.8e-8 at a scale of 0.07, i.e. 4e-7 of it); allowed 1e-5 of it, 25x that, on the
      absolute scale, so a near-zero element is held to the same absolute bound as any other;
    - the worker steps AdamW with eps = 1 (tests/dist_step.py), whose first step lr * g / (|g| + 1)
      moves a parameter by at most lr times a gradient difference; plus two float32 ulps of the
      parameter itself (the two updates may round it to neighbouring floats). With the default eps
      the first step is ~lr * sign(g) and turns rounding noise in a near-zero gradient into a step
      of up to lr (the flake this test had: 4/12,288 parameters off by 2.1e-4)."""
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    launch(["tests/dist_step.py", synth_data, one, "4"], world_size=1)
    launch(["tests/dist_step.py", synth_data, two, "2"], world_size=2)
    a, b = torch.load(one), torch.load(two)
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 0
    scale = max(g.abs().max().item() for g in a["grads"].values())
    assert scale > 0
    grad_atol = 1e-5 * scale
    for name in a["grads"]:
        torch.testing.assert_close(a["grads"][name], b["grads"][name], atol=grad_atol, rtol=0)
    start = dict(load_model("tiny")[0].named_parameters())
    moved = 0
    for name, p in a["params"].items():
        torch.testing.assert_close(p, b["params"][name], atol=LR * grad_atol, rtol=2 * torch.finfo(p.dtype).eps)
        if name in start and not torch.equal(start[name], p):
            moved += 1
    assert moved > 0  # the step changed the heads (LoRA's A/B have no counterpart in the plain model)


def rows(path):
    with open(path) as f:
        return sorted(csv.DictReader(f), key=lambda r: (r["checkpoint"], r["sample"]))


def test_evaluate_on_two_processes_equals_one_process(synth_data, tmp_path):
    """17 validation frames (one video of 12, one of 5: odd, and the ranks get unequal shares), batch 1
    so each frame's numbers are computed identically, per frame and with --video_mode (which shards
    whole videos over the ranks): the per-frame CSV and the summary must be equal exactly."""
    common = ["evaluate.py", "--data", synth_data, "--max_val_samples", "17", "--batch_size", "1", "--num_workers", "0",
              "--no_cldice", "--overlays", "0", "--video_mode"]
    launch(common + ["--output", str(tmp_path / "one")], world_size=1)
    launch(common + ["--output", str(tmp_path / "two")], world_size=2)
    one, two = rows(tmp_path / "one" / "metrics.csv"), rows(tmp_path / "two" / "metrics.csv")
    assert len(one) == 34 and {r["checkpoint"] for r in one} == {"base", "base+video"}
    assert len({r["sample"] for r in one}) == 17
    assert one == two
    with open(tmp_path / "one" / "summary.json") as f, open(tmp_path / "two" / "summary.json") as g:
        s1, s2 = json.load(f)["checkpoints"], json.load(g)["checkpoints"]
    assert s1 == s2


def test_mine_hard_on_two_processes_writes_the_one_process_hard_list(synth_data, tmp_path):
    common = ["mine_hard.py", "--data", synth_data, "--split", "val", "--batch_size", "1", "--num_workers", "0",
              "--threshold_hard", "0.2"]
    launch(common + ["--output", str(tmp_path / "one")], world_size=1)
    launch(common + ["--output", str(tmp_path / "two")], world_size=2)
    reports = []
    for name in ("one", "two"):
        with open(tmp_path / name / "hard_samples.json") as f:
            reports.append(json.load(f))
    one, two = reports
    assert one["samples"] == two["samples"] and one["samples"] > 0
    assert one["hard"] == two["hard"] and one["scores"] == two["scores"] and one["clusters"] == two["clusters"]

