"""Reliability: randomly corrupted inputs give clean, named errors (never a crash deep inside
torch or PIL); non-finite losses are skipped, counted and stop a run past the limit; a LoRA
preset that matches no module is refused; the same seed gives the same run."""
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

import train_sft
from common.data import DataError, VesselDataset, scan_folder
from common.engine import finite_or_zero
from common.internvl import LORA_TARGETS
from common.lora import lora_target_modules
from common.pairs import load_pairs
from common.sa2va import CheckpointError, load_model
from test_data import make_folder


def corrupt(path, rng):
    """One random corruption of an image file: truncated, random bytes, empty, another mode,
    another size, or a directory in its place."""
    kind = rng.choice(["truncate", "random", "empty", "mode16", "palette", "rgba", "resize", "dir"])
    data = open(path, "rb").read()
    if kind == "truncate":
        open(path, "wb").write(data[:rng.randrange(1, len(data))])
    elif kind == "random":
        open(path, "wb").write(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))))
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "dir":
        os.remove(path)
        os.makedirs(path)
    else:
        im = Image.open(path)
        im = {"mode16": lambda: Image.fromarray(np.asarray(im.convert("L"), dtype=np.uint16) * 257),
              "palette": lambda: im.convert("P"), "rgba": lambda: im.convert("RGBA"),
              "resize": lambda: im.resize((im.width + 3, im.height))}[kind]()
        im.save(path)
    return kind


@pytest.mark.parametrize("seed", range(24))
def test_fuzzed_folders_load_or_fail_with_the_file_named(tmp_path, seed):
    rng = random.Random(seed)
    root = make_folder(tmp_path, stems=("v1_frame_1", "v1_frame_2", "v2_frame_1"))
    clean = [s["mask"] for s in VesselDataset(scan_folder(root))]
    sub = rng.choice(["images", "masks"])
    name = rng.choice(sorted(os.listdir(os.path.join(root, sub))))
    kind = corrupt(os.path.join(root, sub, name), rng)
    try:
        frames = scan_folder(root)
        samples = [VesselDataset(frames)[i] for i in range(len(frames))]
    except DataError as e:
        assert os.path.splitext(name)[0] in str(e), (kind, str(e))
        return
    # it loaded: only another encoding of the same picture (or a PNG cut after its pixel data) gets here
    assert kind in ("mode16", "palette", "rgba", "truncate"), kind
    for s, mask in zip(samples, clean):
        assert s["image"].mode == "RGB" and s["mask"].shape == s["image"].size[::-1]
        assert np.array_equal(s["mask"], mask)


@pytest.mark.parametrize("content", ["{not json", "[]", "{}", json.dumps([{"image": "a.png"}]),
                                     json.dumps([{"image": "images/v1_frame_1.png", "chosen_mask": "nope.png",
                                                  "rejected_mask": "masks/v1_frame_1.png", "chosen_iou": 1.0,
                                                  "rejected_iou": 0.5, "iou_gap": 0.5, "prompt": "<image>"}])])
def test_bad_pairs_files_fail_with_the_file_named(tmp_path, content):
    root = make_folder(tmp_path)
    path = os.path.join(root, "dpo_annotations.json")
    open(path, "w").write(content)
    with pytest.raises(DataError, match="dpo_annotations.json"):
        load_pairs(path)


def test_non_finite_loss_is_skipped_counted_and_stops_past_the_limit():
    params = [torch.nn.Parameter(torch.ones(3))]
    state, lines = dict(step=7, bad_steps=0), []
    good = params[0].sum()
    assert finite_or_zero(good, params, state, 2, lines.append) is good and state["bad_steps"] == 0
    for bad in (float("nan"), float("inf")):
        zero = finite_or_zero(params[0].sum() * bad, params, state, 2, lines.append)
        zero.backward()  # every rank still runs the same backward; the step changes nothing
        assert float(zero.detach()) == 0.0 and torch.equal(params[0].grad, torch.zeros(3))
    assert state["bad_steps"] == 2 and len(lines) == 2 and "step 7" in lines[0]
    with pytest.raises(RuntimeError, match="non-finite losses"):
        finite_or_zero(params[0].sum() * float("nan"), params, state, 2, lines.append)


def test_lora_preset_that_matches_no_module_is_refused(monkeypatch):
    model, _ = load_model("tiny")
    arch = type(model.language_model).__name__
    monkeypatch.setitem(LORA_TARGETS, arch, (["self_attn.wqkv"], []))  # InternLM2 names on a Qwen2 LLM
    with pytest.raises(CheckpointError, match="matches no module"):
        lora_target_modules(model)


def test_same_seed_same_run(synth_data, tmp_path):
    """Two 1-epoch SFT runs with one seed on CPU: same data order, same metrics, same weights."""
    infos = []
    for name in ("a", "b"):
        args = train_sft.parse_args(["--data", synth_data, "--output", str(tmp_path / name), "--max_train_samples",
                                     "16", "--max_val_samples", "6", "--epochs", "1", "--lr", "3e-3", "--batch_size",
                                     "4", "--num_workers", "0", "--lora_preset", "small", "--log_every", "1"])
        run = train_sft.main(args)
        with open(os.path.join(run, "training_info.json")) as f:
            infos.append(json.load(f))
        with open(os.path.join(run, "metrics.jsonl")) as f:
            infos[-1]["losses"] = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
        final = os.path.join(run, "final")
        infos[-1]["weights"] = {n: open(os.path.join(final, n), "rb").read() for n in sorted(os.listdir(final))
                                if n.endswith(".safetensors")}
    a, b = infos
    assert a["losses"] and a["losses"] == b["losses"]
    assert a["history"] == b["history"] and a["initial_val"] == b["initial_val"]
    assert a["weights"] and a["weights"] == b["weights"]
