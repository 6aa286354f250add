"""Evaluate Sa2VA checkpoints on vessel masks: Dice, IoU, precision, recall, clDice per
sample and mean, a threshold sweep, and several checkpoints side by side.

    python evaluate.py --model /path/to/Sa2VA-4B --data /path/to/vessels \
        --checkpoints base sft=runs/sft_x/best hard=runs/hard_y/best --thresholds 0.3,0.35,0.4,0.5

`base` is the model without any stage checkpoint. Scoring runs the batched forward path with
the teacher-forced answer (the same masks as the released predict_forward when it answers
"It is [SEG]."; see README). Writes to --output: metrics.csv (one row per sample and
checkpoint), summary.json (means per checkpoint and threshold, best threshold, per-sample
deltas vs the first checkpoint) and overlays/ (true positive white, false positive red,
false negative blue) for the best and worst samples.
"""
import csv
import os

import numpy as np
import torch
from PIL import Image

from common import cli
from common.data import EvalSampler, VesselDataset, select_split
from common.engine import all_gather_objects, cleanup, init_distributed, is_main, print0, seed_everything, write_json
from common.evaluation import METRICS, score_loader, summarize
from common.lora import load_stage
from common.rewards import cldice
from common.sa2va import Sa2VAProcessor, describe, load_model


def parse_args(argv=None):
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_model_args(p)
    cli.add_data_args(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--checkpoints", nargs="+", default=["base"],
                   help="NAME=PATH stage checkpoints (or `base`, or a bare PATH named by its folder), compared in order")
    g.add_argument("--split", default="val", help="split to score: train, val, test (from splits.json) or all")
    g.add_argument("--thresholds", default="0.3,0.35,0.4,0.45,0.5,0.55,0.6",
                   help="comma list swept for every checkpoint (--threshold is always included)")
    g.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    g.add_argument("--output", default="eval", help="folder for metrics.csv, summary.json, overlays/")
    g.add_argument("--overlays", type=int, default=3, help="overlay PNGs of the N best and N worst samples (0 = none)")
    g.add_argument("--no_cldice", action="store_true", help="skip clDice (skeletons are the slow part on big sets)")
    g.add_argument("--panel", type=int, default=0,
                   help="write panel.png: N frames (hardest for the first checkpoint) x (frame, GT, every checkpoint)")
    return p.parse_args(argv)


def parse_checkpoints(specs):
    out = []
    for spec in specs:
        if spec == "base":
            out.append(("base", None))
        elif "=" in spec:
            name, path = spec.split("=", 1)
            out.append((name, path))
        else:
            out.append((os.path.basename(os.path.dirname(spec.rstrip("/"))) or spec, spec))
    return out


def overlay(image, gt, pred):
    """Frame with true positives white, false positives red, false negatives blue."""
    out = np.asarray(image.convert("RGB")).astype(np.float32) * 0.6
    for m, colour in ((gt & pred, (255, 255, 255)), (pred & ~gt, (255, 40, 40)), (gt & ~pred, (40, 120, 255))):
        out[m] = colour
    return Image.fromarray(out.astype(np.uint8))


def stage_table(summary):
    """Markdown table: checkpoint, path, mean Dice/recall/precision/IoU, delta Dice vs the row above."""
    lines = ["| stage | checkpoint | mean Dice | recall | precision | IoU | delta Dice vs previous |",
             "|---|---|---|---|---|---|---|"]
    previous = None
    for name, s in summary.items():
        delta = "" if previous is None else f"{s['mean_dice'] - previous:+.4f}"
        lines.append(f"| {name} | {s['checkpoint'] or 'base model'} | {s['mean_dice']:.4f} | {s['mean_recall']:.4f} | "
                     f"{s['mean_precision']:.4f} | {s['mean_iou']:.4f} | {delta} |")
        previous = s["mean_dice"]
    return "\n".join(lines)


def write_panel(path, samples, masks_by_checkpoint, size=160):
    """One row per frame: the frame, its GT, then each checkpoint's overlay (TP white, FP red, FN blue)."""
    columns = 2 + len(masks_by_checkpoint)
    panel = Image.new("RGB", (columns * size, len(samples) * size + 14), "black")
    from PIL import ImageDraw
    draw = ImageDraw.Draw(panel)
    for c, title in enumerate(["frame", "ground truth"] + list(masks_by_checkpoint)):
        draw.text((c * size + 4, 1), title, fill="white")
    for r, sample in enumerate(samples):
        gt = sample["mask"]
        tiles = [sample["image"], overlay(sample["image"], gt, gt)]
        tiles += [overlay(sample["image"], gt, m[sample["key"]]) for m in masks_by_checkpoint.values()]
        for c, tile in enumerate(tiles):
            panel.paste(tile.convert("RGB").resize((size, size), Image.NEAREST), (c * size, 14 + r * size))
    panel.save(path)


def main(args):
    rank, world_size, device = init_distributed(False)
    seed_everything(args.seed)
    thresholds = sorted({float(t) for t in args.thresholds.split(",") if t} | {args.threshold})
    main_t = thresholds.index(args.threshold)
    frames = select_split(args, args.split)
    dataset = VesselDataset(frames, args.resize_masks)
    by_key = {f.key: i for i, f in enumerate(frames)}
    print0(f"scoring {len(dataset)} frames of {args.data} ({args.split}) at thresholds {thresholds}")
    os.makedirs(args.output, exist_ok=True)

    rows, summary, panel_masks, panel_keys = [], {}, {}, None
    for name, ckpt in parse_checkpoints(args.checkpoints):
        model, tokenizer = load_model(args.model, seed=args.seed)
        if ckpt:
            load_stage(model, ckpt)
        model.to(device).eval()
        processor = Sa2VAProcessor(describe(model, tokenizer), tokenizer, args.prompt, args.answer)
        loader = torch.utils.data.DataLoader(dataset, args.batch_size, sampler=EvalSampler(len(dataset), rank, world_size),
                                             collate_fn=processor, num_workers=args.num_workers)
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.bf16 and device.type == "cuda" else None
        records, probs = score_loader(model, loader, device, thresholds, autocast=autocast, desc=f"scoring {name}",
                                      keep_probs=True)
        # probabilities stay on the rank that made them: clDice and overlays are computed there
        local = {}
        for key, p in probs.items():
            pred = (p > args.threshold).numpy()
            local[key] = dict(cldice=None if args.no_cldice else cldice(pred, dataset[by_key[key]]["mask"]))
        extra = {k: v for part in all_gather_objects(local) for k, v in part.items()}
        if args.panel:
            if panel_keys is None:  # the hardest frames for the first checkpoint (the baseline)
                panel_keys = [r["key"] for r in sorted(records, key=lambda r: r["dice"][main_t])[:args.panel]]
            local_masks = {k: (probs[k] > args.threshold).numpy() for k in panel_keys if k in probs}
            panel_masks[name] = {k: v for part in all_gather_objects(local_masks) for k, v in part.items()}
        sweep = summarize(records, thresholds)
        best_t = max(sweep, key=lambda t: sweep[t]["mean_dice"])
        summary[name] = dict(checkpoint=ckpt, threshold=args.threshold, **sweep[float(args.threshold)],
                             mean_cldice=None if args.no_cldice else float(np.mean([e["cldice"] for e in extra.values()])),
                             best_threshold=best_t, best_threshold_mean_dice=sweep[best_t]["mean_dice"],
                             sweep={str(t): v for t, v in sweep.items()})
        for r in records:
            f = frames[r["index"]]
            rows.append(dict(checkpoint=name, sample=r["key"], video=f.video, frame=f.frame,
                             **{k: r[k][main_t] for k in METRICS}, cldice=extra[r["key"]]["cldice"]))
        if is_main() and args.overlays:
            ranked = sorted(records, key=lambda r: r["dice"][main_t])
            chosen = {r["key"]: "worst" for r in ranked[:args.overlays]} | {r["key"]: "best" for r in ranked[-args.overlays:]}
            os.makedirs(os.path.join(args.output, "overlays"), exist_ok=True)
            for key, tag in chosen.items():
                if key not in probs:
                    continue  # scored by another rank
                sample = dataset[by_key[key]]
                overlay(sample["image"], sample["mask"], (probs[key] > args.threshold).numpy()).save(
                    os.path.join(args.output, "overlays", f"{name}_{tag}_{key}.png"))
        s = summary[name]
        print0(f"{name:>12}: dice {s['mean_dice']:.4f} iou {s['mean_iou']:.4f} recall {s['mean_recall']:.4f} "
               f"precision {s['mean_precision']:.4f}" + ("" if args.no_cldice else f" cldice {s['mean_cldice']:.4f}")
               + f" | best threshold {best_t:g} -> dice {s['best_threshold_mean_dice']:.4f}")
        del model

    names = list(summary)
    table = stage_table(summary)
    print0(table)
    if is_main() and args.panel:
        write_panel(os.path.join(args.output, "panel.png"), [dataset[by_key[k]] for k in panel_keys], panel_masks)
    if len(names) > 1:
        base = {r["sample"]: r["dice"] for r in rows if r["checkpoint"] == names[0]}
        for name in names[1:]:
            deltas = [r["dice"] - base[r["sample"]] for r in rows if r["checkpoint"] == name]
            summary[name]["delta_mean_dice_vs_" + names[0]] = float(np.mean(deltas))
            summary[name]["improved_samples"] = int(sum(d > 0 for d in deltas))
            summary[name]["worsened_samples"] = int(sum(d < 0 for d in deltas))
            print0(f"{name} vs {names[0]}: mean dice {np.mean(deltas):+.4f}, {summary[name]['improved_samples']} "
                   f"samples better, {summary[name]['worsened_samples']} worse")
    if is_main():
        with open(os.path.join(args.output, "metrics.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        write_json(os.path.join(args.output, "summary.json"), dict(data=args.data, split=args.split, model=args.model,
                                                                   samples=len(dataset), checkpoints=summary))
        with open(os.path.join(args.output, "stage_table.md"), "w") as f:
            f.write(table + "\n")
        print0(f"wrote {args.output}/metrics.csv, summary.json, stage_table.md" + (", overlays/" if args.overlays else "")
               + (", panel.png" if args.panel else ""))
    cleanup()
    return summary


if __name__ == "__main__":
    main(parse_args())
