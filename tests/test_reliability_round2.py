"""Reliability, round two (issue #21): samplers that keep ranks in step, metrics reduced over ranks,
arguments refused at the start, one-line errors, truncated weights and mismatched --resume named,
16-bit frames, and runs that cannot overwrite each other. All fast: no tiny model is built here."""
import os

import numpy as np
import pytest
from PIL import Image

from common.data import EvalSampler, ShardedSampler, VesselDataset, read_image, scan_folder
from common.internvl import pil_to_normalized
from test_data import make_folder


# ---------------------------------------------------------------- item 2: samplers

@pytest.mark.parametrize("world_size", range(1, 9))
def test_sharded_sampler_gives_every_rank_the_same_count_and_covers_every_sample(world_size):
    for size in range(1, 9):
        for shuffle in (False, True):
            shards = [list(ShardedSampler(size, rank, world_size, shuffle=shuffle, seed=3)) for rank in range(world_size)]
            lengths = {len(ShardedSampler(size, rank, world_size)) for rank in range(world_size)}
            assert lengths == {len(s) for s in shards} and len(lengths) == 1, (size, world_size)
            assert set(i for s in shards for i in s) == set(range(size)), (size, world_size)
            assert all(0 <= i < size for s in shards for i in s)


@pytest.mark.parametrize("world_size", range(1, 9))
def test_eval_sampler_counts_each_sample_once(world_size):
    for size in range(0, 9):
        shards = [list(EvalSampler(size, rank, world_size)) for rank in range(world_size)]
        assert sorted(i for s in shards for i in s) == list(range(size)), (size, world_size)
        assert [len(EvalSampler(size, rank, world_size)) for rank in range(world_size)] == [len(s) for s in shards]


# ---------------------------------------------------------------- item 7: 16-bit frames

def test_16_bit_frame_gives_the_8_bit_input_tensor(tmp_path):
    root = make_folder(tmp_path / "8bit", stems=("v1_frame_1",))
    path8 = os.path.join(root, "images", "v1_frame_1.png")
    grey = np.asarray(Image.open(path8).convert("L"))
    Image.fromarray(grey).save(path8)
    root16 = make_folder(tmp_path / "16bit", stems=("v1_frame_1",))
    path16 = os.path.join(root16, "images", "v1_frame_1.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(path16)  # the same frame, 16 bits
    assert Image.open(path16).mode == "I;16"
    a, b = VesselDataset(scan_folder(root))[0]["image"], VesselDataset(scan_folder(root16))[0]["image"]
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    x, y = pil_to_normalized(a, 32), pil_to_normalized(b, 32)  # the encoder's input: ImageNet std < 1
    assert (x - y).abs().max() <= 1 / 255 / 0.225 + 1e-6


@pytest.mark.parametrize("bits", [10, 12, 14])
def test_frames_of_fewer_significant_bits_fill_the_8_bit_range_without_clipping(tmp_path, bits):
    ramp = np.linspace(0, 2 ** bits - 1, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "f.png")
    out = np.asarray(read_image(str(tmp_path / "f.png")).convert("L")).astype(int)
    assert out.min() == 0 and out.max() == 255 and (np.diff(out.ravel()) >= 0).all()  # monotone: nothing clipped
    assert np.abs(out - np.round(ramp / (2 ** bits - 1) * 255)).max() <= 1


def test_float_and_32_bit_frames_are_scaled_not_clipped(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "f.tif")
    Image.fromarray(grey.astype(np.int32) * 257).save(tmp_path / "i.tif")
    for name in ("f.tif", "i.tif"):
        out = np.asarray(read_image(str(tmp_path / name)).convert("L")).astype(int)
        assert np.abs(out - grey).max() <= 1, name


# ---------------------------------------------------------------- item 4: arguments checked at the start

SCRIPTS = {"train_sft": ["--data", "d"], "train_dpo": ["--data", "d", "--pairs", "p"], "train_ppo": ["--data", "d"],
           "train_hard": ["--data", "d"], "mine_hard": ["--data", "d"], "evaluate": ["--data", "d"],
           "make_dpo_pairs": ["--data", "d", "--mode", "gt", "--output", "o"],
           "merge_lora": ["--base_model", "tiny", "--lora_weights", "w", "--output_model", "o"]}
TRAIN = ("train_sft", "train_dpo", "train_ppo", "train_hard")
HOSTILE = [(TRAIN, "--batch_size", "0"), (TRAIN, "--lr", "-1"), (TRAIN, "--lr", "nan"), (TRAIN, "--lr", "inf"),
           (TRAIN, "--grad_accum", "0"), (TRAIN, "--epochs", "0"), (TRAIN, "--epochs", "-1"),
           (TRAIN, "--weight_decay", "-0.1"), (TRAIN, "--warmup_ratio", "1.5"), (TRAIN, "--grad_clip", "nan"),
           (tuple(SCRIPTS), "--seed", "-1"), (tuple(s for s in SCRIPTS if s != "merge_lora"), "--threshold", "1"),
           (tuple(s for s in SCRIPTS if s != "merge_lora"), "--val_fraction", "-0.2"),
           (tuple(s for s in SCRIPTS if s != "merge_lora"), "--num_workers", "-1"),
           (("train_dpo",), "--beta", "0"), (("train_dpo",), "--label_smoothing", "0.5"),
           (("train_ppo",), "--clip", "0"), (("train_ppo",), "--temperature", "-1"), (("train_ppo",), "--kl_coef", "-1"),
           (("train_ppo",), "--recall_target", "0"), (("train_hard",), "--easy_ratio", "2"),
           (("train_hard", "mine_hard"), "--threshold_hard", "0"), (("make_dpo_pairs",), "--min_iou_gap", "-0.1"),
           (("make_dpo_pairs",), "--num_samples", "0"), (("evaluate",), "--thresholds", "0.3,1.5"),
           (("evaluate",), "--clip_frames", "0"), (("merge_lora",), "--max_mask_diff", "nan")]


def script_module(name):
    import importlib
    return importlib.import_module(name)


@pytest.mark.parametrize("scripts,flag,value", HOSTILE, ids=[f"{f}={v}" for _, f, v in HOSTILE])
def test_impossible_values_are_refused_in_one_line_with_exit_code_2(capsys, scripts, flag, value):
    for name in scripts:
        with pytest.raises(SystemExit) as e:
            script_module(name).parse_args(SCRIPTS[name] + [flag, value])
        assert e.value.code == 2, name
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert f": error: argument {flag}: " in last, (name, last)
        assert value in last


def test_output_naming_a_file_and_missing_resume_folder_are_refused(tmp_path, capsys):
    existing = tmp_path / "a_file"
    existing.write_text("mine")
    for name, flag in (("train_sft", "--output"), ("mine_hard", "--output"), ("evaluate", "--output"),
                       ("make_dpo_pairs", "--output"), ("merge_lora", "--output_model"), ("train_sft", "--resume")):
        bad = str(existing / "sub") if flag != "--resume" else str(tmp_path / "no_run")
        argv = [a for a in SCRIPTS[name]]
        if flag in argv:
            argv[argv.index(flag) + 1] = bad
        else:
            argv += [flag, bad]
        with pytest.raises(SystemExit) as e:
            script_module(name).parse_args(argv)
        assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err, name
    assert existing.read_text() == "mine"


def test_every_numeric_flag_of_every_script_has_a_rule_and_its_default_passes(monkeypatch):
    from common import cli
    parsers = []
    with monkeypatch.context() as m:
        m.setattr(cli, "parse", lambda p, argv=None: parsers.append(p))
        for name in SCRIPTS:
            script_module(name).parse_args([])
    numeric = {a.dest for p in parsers for a in p._actions if a.type in (int, float)}
    assert numeric - {"zero_stage"} <= set(cli.ARG_RULES), sorted(numeric - set(cli.ARG_RULES))  # zero_stage: choices
    for name in SCRIPTS:
        script_module(name).parse_args(SCRIPTS[name])  # the defaults pass


# ---------------------------------------------------------------- item 5: one line, no traceback

def test_user_errors_are_one_line_on_stderr_and_the_traceback_needs_debug(capsys, monkeypatch):
    import argparse

    from common import cli
    from common.data import DataError

    def parse_args(argv=None):
        return cli.parse(argparse.ArgumentParser(prog="x.py"), argv)

    def main(args):
        raise DataError("data/images/a.png: cannot read image")
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as e:
        cli.run_main(main, parse_args, [])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.strip().endswith("error: data/images/a.png: cannot read image")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(DataError):  # --debug: the exception itself, traceback and all
        cli.run_main(main, parse_args, ["--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(DataError):
        cli.run_main(main, parse_args, [])
    monkeypatch.delenv(cli.DEBUG_ENV)

    def exits(args):
        raise SystemExit("pass exactly one of --hard_list FILE and --mine")
    with pytest.raises(SystemExit) as e:
        cli.run_main(exits, parse_args, [])
    assert e.value.code == 1 and capsys.readouterr().err.strip().endswith("error: pass exactly one of --hard_list "
                                                                          "FILE and --mine")


def test_a_script_prints_the_reason_not_a_traceback(tmp_path):
    """End to end: make_dpo_pairs.py on a folder that is no data folder (checked before any model loads)."""
    import subprocess
    import sys
    from conftest import ROOT
    result = subprocess.run([sys.executable, "make_dpo_pairs.py", "--data", str(tmp_path / "none"), "--mode", "gt",
                             "--output", str(tmp_path / "pairs")], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={k: v for k, v in os.environ.items() if k != "SA2VA_DEBUG"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"make_dpo_pairs.py: error: {tmp_path / 'none'}: folder not found"]


# ---------------------------------------------------------------- item 6: truncated weights, --resume arguments

def write_safetensors(path):
    import torch
    from safetensors.torch import save_file
    save_file({"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3)}, str(path))
    return os.path.getsize(path)


@pytest.mark.parametrize("cut", ["header", "data", "garbage"])
def test_truncated_weights_are_named_with_what_to_do(tmp_path, cut):
    from common.lora import PARTS_FILE, load_stage
    from common.sa2va import CheckpointError, check_safetensors, load_model
    stage = tmp_path / "best"
    stage.mkdir()
    (stage / "stage.json").write_text('{"stage": "sft", "trained_parts": []}')
    size = write_safetensors(stage / PARTS_FILE)
    check_safetensors(str(stage / PARTS_FILE), "-")  # whole: passes
    data = (stage / PARTS_FILE).read_bytes()
    (stage / PARTS_FILE).write_bytes({"header": data[:20], "data": data[:size - 100], "garbage": b"\xff" * 50}[cut])
    with pytest.raises(CheckpointError, match=rf"{PARTS_FILE}: truncated or damaged safetensors.*save the stage again"):
        load_stage(None, str(stage))  # refused before the model is touched
    base = tmp_path / "model"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes((stage / PARTS_FILE).read_bytes())
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated .*copy or download the model folder"):
        load_model(str(base))


def test_resume_with_other_arguments_names_them(tmp_path, monkeypatch):
    import argparse

    from common.engine import ARGS_FILE, check_resume_args
    from common.files import RunError, write_json
    run = tmp_path / "sft_x"
    run.mkdir()
    saved = dict(lr=1e-3, lora_rank=8, batch_size=4, num_workers=2, log_every=10, resume=None, output="a", seed=0)
    write_json(str(run / ARGS_FILE), saved)
    same = argparse.Namespace(**dict(saved, num_workers=0, log_every=1, resume=str(run), output="b"))
    check_resume_args(str(run), same)  # only where and how it runs differ: fine
    other = argparse.Namespace(**dict(saved, lr=2e-3, lora_rank=16, resume=str(run)))
    with pytest.raises(RunError, match=r"--lr 0\.001 \(now 0\.002\), --lora_rank 8 \(now 16\)") as e:
        check_resume_args(str(run), other)
    assert "batch_size" not in str(e.value) and "args.json" in str(e.value)


# ---------------------------------------------------------------- item 8: runs into one --output

def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    import time

    from common.engine import make_run_dir
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101_120000")
    dirs = [make_run_dir(str(tmp_path / "out"), "sft", None) for _ in range(3)]
    assert [os.path.basename(d) for d in dirs] == ["sft_20260101_120000", "sft_20260101_120000_2",
                                                   "sft_20260101_120000_3"]
    assert all(os.path.isdir(d) and not os.listdir(d) for d in dirs)


def test_shared_output_files_are_never_overwritten_by_another_run(tmp_path):
    from common.files import RunError, publish_folder, write_json
    path = str(tmp_path / "hard_samples.json")
    write_json(path, {"run": 1}, overwrite=False)
    with pytest.raises(RunError, match="hard_samples.json: already exists"):
        write_json(path, {"run": 2}, overwrite=False)
    assert open(path).read().count('"run": 1') == 1 and os.listdir(tmp_path) == ["hard_samples.json"]  # no temp left
    final, mine, theirs = tmp_path / "pairs", tmp_path / "pairs.tmpA", tmp_path / "pairs.tmpB"
    for folder, name in ((mine, "mine"), (theirs, "theirs")):
        folder.mkdir()
        (folder / "dpo_annotations.json").write_text(name)
    publish_folder(str(theirs), str(final))  # the other run finished first
    with pytest.raises(RunError, match=r"another run wrote it .* result is in .*pairs\.tmpA"):
        publish_folder(str(mine), str(final))
    assert (final / "dpo_annotations.json").read_text() == "theirs" and (mine / "dpo_annotations.json").exists()
    publish_folder(str(mine), str(final), overwrite=True)
    assert (final / "dpo_annotations.json").read_text() == "mine" and sorted(os.listdir(tmp_path)) == [
        "hard_samples.json", "pairs"]


def test_mine_hard_refuses_an_existing_hard_list_before_loading_a_model(tmp_path):
    import mine_hard
    (tmp_path / "hard_samples.json").write_text("{}")
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        mine_hard.main(mine_hard.parse_args(["--data", "d", "--output", str(tmp_path)]))
    assert (tmp_path / "hard_samples.json").read_text() == "{}"


# ---------------------------------------------------------------- item 3: logged metrics are the run's

LOG_WORKER = """
import json, os, sys
from common.engine import RunLogger, cleanup, init_distributed, is_main, log_train_window, mean_over_ranks
rank, world, _ = init_distributed(False)
# rank 0 saw easy pairs, rank 1 hard ones: its share of the data alone would log accuracy 1.0
window = [dict(loss=1.0 + rank, accuracy=1.0 - rank)] * (2 + rank) + ([dict(loss=5.0, reward=0.5)] if rank else [])
logger = RunLogger(sys.argv[1], enabled=is_main())
avg = log_train_window(logger, 3, "step 3", window, 1.0, 1, 8, 1e-3)
assert avg == mean_over_ranks(window)  # every rank gets the same numbers
logger.close()
if is_main():
    json.dump(avg, open(os.path.join(sys.argv[1], "avg.json"), "w"))
cleanup()
"""


def test_logged_train_metrics_are_averaged_over_ranks(tmp_path):
    """2 CPU processes (gloo): the log line and metrics.jsonl hold the mean over both ranks' windows."""
    import json

    from test_distributed import launch
    launch(["-c", LOG_WORKER, str(tmp_path)], world_size=2, timeout=300)
    with open(tmp_path / "metrics.jsonl") as f:
        (record,) = [json.loads(line) for line in f]
    # rank 0: 2 x (loss 1, acc 1); rank 1: 3 x (loss 2, acc 0) + 1 x (loss 5, reward 0.5)
    assert record["train/loss"] == pytest.approx((2 * 1 + 3 * 2 + 5) / 6)
    assert record["train/accuracy"] == pytest.approx(2 / 5) and record["train/reward"] == pytest.approx(0.5)
    assert "loss 2.1667 accuracy 0.4000 reward 0.5000" in (tmp_path / "train.log").read_text()
