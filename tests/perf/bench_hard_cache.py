"""Benchmark: one epoch of hard-sample training with the frozen features cached vs recomputed.

    python tests/perf/bench_hard_cache.py                      # CPU, tiny model, synthetic data
    python tests/perf/bench_hard_cache.py --model /path/to/Sa2VA-4B --init runs/sft_x/best \
        --data /path/to/vessels --bf16 --samples 64 --feature_cache_gb 40

Runs train_hard.main twice on the same model and the same hard list (the first --samples train
frames), --epochs epochs each: with the feature cache, and with --feature_cache_gb 0 (every step
runs the frozen LLM and SAM2 image encoder, and decodes and preprocesses every image). The
measured epoch is the last one: a warm cache against the full forward; the cached run's first
epoch (cold: features computed once, then the heads) is reported too. Prints a table and writes
--output (JSON: samples/s, epoch seconds, ratio, device). Not collected by pytest (bench_*.py).
"""
import argparse
import json
import math
import os
import platform
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import train_hard  # noqa: E402
from common.data import build_splits  # noqa: E402
from common.files import write_json  # noqa: E402
from common.synth import write_dataset  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", help="base model: tiny or a local Sa2VA folder")
    p.add_argument("--init", default=None, help="stage checkpoint to start from (its LoRA stays frozen)")
    p.add_argument("--data", default=None, help="data folder (default: synthetic videos in a temporary folder)")
    p.add_argument("--samples", type=int, default=32, help="hard frames trained per epoch (the first train frames)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is measured (>= 2)")
    p.add_argument("--batch_size", type=int, default=4, help="samples per micro-step")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--feature_cache_gb", type=float, default=8.0, help="cache memory of the cached run")
    p.add_argument("--max_val_samples", type=int, default=4, help="validation frames per epoch (not measured)")
    p.add_argument("--bf16", action="store_true", help="bf16 (GPU)")
    p.add_argument("--output", default="bench_hard_cache.json", help="JSON result")
    return p.parse_args(argv)


def device_name():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def run(args, data, hard_list, out, cache_gb):
    argv = ["--model", args.model, "--data", data, "--hard_list", hard_list, "--output", out,
            "--epochs", str(args.epochs), "--batch_size", str(args.batch_size), "--grad_accum", str(args.grad_accum),
            "--num_workers", str(args.num_workers), "--feature_cache_gb", str(cache_gb),
            "--max_val_samples", str(args.max_val_samples), "--threshold_hard", "1.01", "--log_every", "1000",
            "--engine", "torch"] + (["--init", args.init] if args.init else []) + (["--bf16"] if args.bf16 else [])
    run_dir = train_hard.main(train_hard.parse_args(argv))
    with open(os.path.join(run_dir, "training_info.json")) as f:
        return json.load(f)["history"]


def main(args):
    if args.epochs < 2:
        raise SystemExit("--epochs must be >= 2: the first epoch fills the cache")
    work = tempfile.mkdtemp(prefix="bench_hard_")
    data = args.data or str(write_dataset(os.path.join(work, "synth"), frames_per_video=8, size=96,
                                                num_videos=max(10, math.ceil(args.samples / 8 / 0.75))))
    train, _ = build_splits(data)
    keys = [f.key for f in train[:args.samples]]
    hard_list = os.path.join(work, "hard_samples.json")
    write_json(hard_list, dict(hard=keys, note="benchmark: the first train frames"))

    results = {}
    for mode, cache_gb in (("uncached", 0.0), ("cached", args.feature_cache_gb)):
        history = run(args, data, hard_list, os.path.join(work, mode), cache_gb)
        last = history[-1]
        results[mode] = dict(epoch_seconds=last["train_seconds"], samples=last["train_samples"],
                             samples_per_s=last["train_samples"] / last["train_seconds"],
                             first_epoch_seconds=history[0]["train_seconds"], cache=last["cache"],
                             served_from_cache=last["train_cache_hits"])
    ratio = results["uncached"]["epoch_seconds"] / results["cached"]["epoch_seconds"]
    report = dict(model=args.model, init=args.init, data=data, samples=len(keys), batch_size=args.batch_size,
                  bf16=args.bf16, device=device_name(), torch=torch.__version__, results=results,
                  ratio_uncached_over_cached=ratio)

    print(f"\nhard training, one epoch of {len(keys)} samples, {args.model} on {report['device']}")
    print(f"{'mode':<22} {'epoch s':>9} {'samples/s':>10} {'from cache':>11}")
    for mode, r in results.items():
        print(f"{mode:<22} {r['epoch_seconds']:9.2f} {r['samples_per_s']:10.1f} {r['served_from_cache']:11d}")
    c = results["cached"]
    print(f"{'cached, first epoch':<22} {c['first_epoch_seconds']:9.2f} {c['samples'] / c['first_epoch_seconds']:10.1f}"
          f" {'(fills)':>11}")
    print(f"ratio uncached / cached epoch: {ratio:.2f}x")
    write_json(args.output, report)
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main(parse_args())
