"""Score every sample of a split, list the hard ones (Dice < 0.75) and the temporal hard clusters.

A frame is hard when the model's Dice on it is below --threshold_hard (0.75, the methodology's
stage 3). --by disagreement ranks frames instead by how much the model's own sampled masks
disagree: --num_samples masks per frame drawn from its per-pixel distribution
(common.forward.sample_masks, the sampler of make_dpo_pairs.py), scored by their mean pairwise
(1 - IoU) (common.rewards.mean_pairwise_disagreement); hard = the --hard_share most uncertain
frames, or those at or above --disagreement_threshold. It needs no ground truth to rank and finds
frames the model is unsure of even where its greedy mask happens to score well. --by both = the
union of the two lists. Frames of one video are neighbours in time, so runs of consecutive hard
frames ("temporal hard clusters": a hard anatomy, a washed-out stretch, fast motion) are reported too.
Scoring runs the batched forward path (common/evaluation.score_loader) on any number of
processes; rank 0 writes.

    python mine_hard.py --model /path/to/Sa2VA-4B --init runs/dpo_x/best --data /path/to/vessels \
        --output runs/mine --plot

Writes <output>/hard_samples.json (atomically): model, init, data, split, thresholds, Dice
buckets, per-sample scores, the hard list (keys = file stems, hardest first: lowest Dice, or
with --by disagreement highest disagreement) and the clusters; with --by disagreement or both
also each sample's `disagreement` and `hard_by`, and the sampling settings (`disagreement`);
with --plot, <output>/dice_plots/<video>.png (Dice over frame index, clusters shaded).
Prints the bucket histogram, the hardest samples and the clusters.
"""
import contextlib
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from common import cli
from common.data import EvalSampler, VesselDataset, file_names, select_split
from common.engine import all_gather_objects, cleanup, init_distributed, is_main, print0, seed_everything
from common.evaluation import score_loader
from common.files import write_json
from common.forward import (SAMPLE_NOISE_SIGMA, FeatureCache, forward_batch, move_batch, sample_generator,
                            sample_masks)
from common.rewards import mean_pairwise_disagreement

HARD_THRESHOLD = 0.75  # the methodology's stage-3 definition of a hard sample
HARD_FILE = "hard_samples.json"
BUCKET_EDGES = (0.50, 0.65, 0.75)  # the buckets the methodology reports: < 0.50, 0.50-0.65, 0.65-0.75, >= 0.75
HARD_SHARE = 0.2  # --by disagreement: share of frames that are hard (the methodology's Dice rule gave 20.8%)


def parse_args(argv=None):
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_model_args(p)
    cli.add_data_args(p)
    g = p.add_argument_group("mining")
    g.add_argument("--split", default="train", help="split to score: train, val (test if splits.json has it) or all")
    g.add_argument("--threshold_hard", type=float, default=HARD_THRESHOLD,
                   help="a sample is hard when its Dice is below this (--threshold stays the probability threshold)")
    g.add_argument("--min_cluster_len", type=int, default=2, help="hard frames a temporal cluster needs")
    g.add_argument("--max_gap", type=int, default=0,
                   help="easy frames that may be bridged inside a cluster (0 = only unbroken runs)")
    g.add_argument("--top", type=int, default=10, help="hardest samples listed in the report")
    g.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    g.add_argument("--output", default="mine", help="folder for hard_samples.json (and dice_plots/)")
    g.add_argument("--overwrite", action="store_true", help="replace the folder's hard_samples.json if it has one")
    g.add_argument("--plot", action="store_true", help="one PNG per video of Dice over frame index in dice_plots/")
    g.add_argument("--by", choices=("dice", "disagreement", "both"), default="dice",
                   help="hard = Dice below --threshold_hard; or the frames whose sampled masks disagree most; or both "
                        "(the union)")
    d = p.add_argument_group("disagreement (--by disagreement | both)")
    d.add_argument("--hard_share", type=float, default=HARD_SHARE,
                   help="share of the frames, most disagreeing first, that are hard (frames whose samples all agree "
                        "never are)")
    d.add_argument("--disagreement_threshold", type=float, default=None,
                   help="instead of --hard_share: hard when the mean pairwise 1 - IoU of the samples is >= this")
    d.add_argument("--num_samples", type=int, default=8, help="masks sampled per frame (>= 2)")
    d.add_argument("--temperature", type=float, default=1.0, help="T in sigmoid(logits / T); 1 = the model's own "
                                                                  "distribution")
    d.add_argument("--noise_sigma", type=float, default=SAMPLE_NOISE_SIGMA,
                   help="spatial correlation of the sampling noise, in low-res pixels (0 = independent pixels)")
    return cli.parse(p, argv)


def find_clusters(scores_by_video, threshold, min_len=2, max_gap=0, hard_keys=None):
    """Temporal hard clusters: runs of hard frames (Dice < threshold) of one video.

    scores_by_video: {video: sequence} where each item is a Dice (frame = its position), a
    (frame, dice) pair or a (frame, dice, key) triple. With `hard_keys` (a set of keys) a frame is
    hard when its key is in it, whatever its Dice (--by disagreement). Frames are ordered by index, and
    "consecutive" means neighbours among the frames present (data sampled every k-th frame
    still forms runs). Two hard frames with at most `max_gap` easy frames between them belong
    to one cluster; a cluster starts and ends with a hard frame and needs at least `min_len`
    hard frames. Returns a list of dict(video, first_frame, last_frame, length (frames in the
    span, bridged ones included), hard_frames, mean_dice and min_dice over the span, frames,
    keys (None where not given)), by video then first frame."""
    if min_len < 1 or max_gap < 0:
        raise ValueError(f"min_len must be >= 1 and max_gap >= 0, got {min_len} and {max_gap}")
    clusters = []
    for video in sorted(scores_by_video):
        rows = [(i, float(r), None) if np.isscalar(r) else (int(r[0]), float(r[1]), r[2] if len(r) > 2 else None)
                for i, r in enumerate(scores_by_video[video])]
        rows.sort(key=lambda r: r[0])
        frames = [r[0] for r in rows]
        if len(set(frames)) != len(frames):
            raise ValueError(f"video {video!r}: frame index {next(f for f in frames if frames.count(f) > 1)} twice")
        hard = [pos for pos, r in enumerate(rows) if (r[2] in hard_keys if hard_keys is not None else r[1] < threshold)]
        groups = []
        for pos in hard:
            if groups and pos - groups[-1][-1] - 1 <= max_gap:  # only easy frames lie between two hard ones
                groups[-1].append(pos)
            else:
                groups.append([pos])
        for group in groups:
            if len(group) < min_len:
                continue
            span = rows[group[0]:group[-1] + 1]
            dices = [r[1] for r in span]
            clusters.append(dict(video=video, first_frame=span[0][0], last_frame=span[-1][0], length=len(span),
                                 hard_frames=len(group), mean_dice=float(np.mean(dices)), min_dice=min(dices),
                                 frames=[r[0] for r in span], keys=[r[2] for r in span]))
    return clusters


def dice_buckets(dices, edges=BUCKET_EDGES):
    """Histogram of Dice values: [dict(label, low, high, count, share)], counts summing to len(dices)."""
    bounds = [0.0] + list(edges) + [None]
    out = []
    for low, high in zip(bounds[:-1], bounds[1:]):
        label = f"< {high:.2f}" if low == 0.0 else f">= {low:.2f}" if high is None else f"{low:.2f}-{high:.2f}"
        # the first bucket takes everything below its upper edge, the last everything from its lower edge
        count = sum(1 for d in dices if (low == 0.0 or d >= low) and (high is None or d < high))
        out.append(dict(label=label, low=low, high=high, count=count, share=count / len(dices) if dices else 0.0))
    return out


@torch.no_grad()
def disagreement_scores(model, loader, device, args, cache=None, autocast=contextlib.nullcontext):
    """{dataset index: mean pairwise (1 - IoU) of --num_samples masks sampled from the model} of every
    frame, all ranks. Samples are seeded by frame (the same scores on any number of ranks)."""
    out = {}
    for batch in tqdm(loader, desc="sampling", leave=False, disable=not is_main()):
        batch = move_batch(batch, device)
        with autocast():
            low_res = forward_batch(model, batch, cache)["low_res_logits"].float().cpu()
        for i, index in enumerate(batch["index"].tolist()):
            masks = sample_masks(model, low_res[i:i + 1], batch["image_sizes"][i], args.num_samples, args.temperature,
                                 args.noise_sigma, sample_generator(args.seed, index))
            out[index] = mean_pairwise_disagreement(masks)
    return {k: v for part in all_gather_objects(out) for k, v in part.items()}


def hard_by(scores, args):
    """{key: reasons} of the hard frames, reasons a list of "dice" and/or "disagreement" (--by)."""
    reasons = {}
    if args.by in ("dice", "both"):
        for s in scores:
            if s["dice"] < args.threshold_hard:
                reasons.setdefault(s["key"], []).append("dice")
    if args.by in ("disagreement", "both"):
        uncertain = sorted((s for s in scores if s["disagreement"] > 0), key=lambda s: -s["disagreement"])
        if args.disagreement_threshold is not None:
            uncertain = [s for s in uncertain if s["disagreement"] >= args.disagreement_threshold]
        else:
            uncertain = uncertain[:round(args.hard_share * len(scores))]
        for s in uncertain:
            reasons.setdefault(s["key"], []).append("disagreement")
    return reasons


def build_report(records, frames, args, disagreement=None):
    """The content of hard_samples.json from score_loader records (one threshold) and, with --by
    disagreement | both, disagreement_scores' {index: score}."""
    scores = []
    for r in records:
        f = frames[r["index"]]
        scores.append(dict(key=f.key, video=f.video, frame=f.frame, dice=r["dice"][0], iou=r["iou"][0],
                           recall=r["recall"][0], precision=r["precision"][0]))
        if disagreement is not None:
            scores[-1]["disagreement"] = disagreement[r["index"]]
    dices = [s["dice"] for s in scores]
    reasons = hard_by(scores, args)
    hardest = (lambda s: -s["disagreement"]) if args.by == "disagreement" else (lambda s: s["dice"])
    hard = sorted((s for s in scores if s["key"] in reasons), key=hardest)
    by_video = {}
    for s in scores:
        by_video.setdefault(s["video"], []).append((s["frame"], s["dice"], s["key"]))
    report = dict(model=args.model, init=args.init, data=os.path.abspath(args.data), split=args.split,
                  probability_threshold=args.threshold, threshold_hard=args.threshold_hard,
                  min_cluster_len=args.min_cluster_len, max_gap=args.max_gap, prompt=args.prompt, answer=args.answer,
                  created=time.strftime("%Y-%m-%d %H:%M:%S"), samples=len(scores),
                  mean_dice=float(np.mean(dices)) if dices else None, hard_count=len(hard),
                  hard_share=len(hard) / len(scores) if scores else 0.0, buckets=dice_buckets(dices),
                  hard=[s["key"] for s in hard], clusters=find_clusters(by_video, args.threshold_hard,
                                                                        args.min_cluster_len, args.max_gap,
                                                                        hard_keys=set(reasons)),
                  scores=scores)
    if args.by != "dice":  # the default report stays exactly what it was
        for s in scores:
            s["hard_by"] = reasons.get(s["key"], [])
        report.update(by=args.by, disagreement=dict(
            num_samples=args.num_samples, temperature=args.temperature, noise_sigma=args.noise_sigma,
            hard_share=None if args.disagreement_threshold is not None else args.hard_share,
            threshold=args.disagreement_threshold, mean=float(np.mean([s["disagreement"] for s in scores])),
            hard_by_dice=sum("dice" in r for r in reasons.values()),
            hard_by_disagreement=sum("disagreement" in r for r in reasons.values())))
    return report


def print_report(report, top=10):
    n = report["samples"]
    d = report.get("disagreement")
    rule = f"Dice < {report['threshold_hard']:g}"
    if d:
        rule = " or ".join(([rule] if report["by"] == "both" else []) + [
            f"the top {100 * d['hard_share']:g}% by sample disagreement" if d["threshold"] is None else
            f"sample disagreement >= {d['threshold']:g}"])
    print(f"{report['hard_count']} of {n} samples ({100 * report['hard_share']:.1f}%) are hard "
          f"({rule}); mean Dice {report['mean_dice']:.4f}" + (f", mean disagreement {d['mean']:.4f} "
                                                               f"({d['num_samples']} samples per frame)" if d else ""))
    print("Dice buckets:")
    for b in report["buckets"]:
        print(f"  {b['label']:>10} {b['count']:6d} {100 * b['share']:6.1f}%  " + "#" * round(40 * b["share"]))
    ranked = sorted(report["scores"], key=lambda s: s["dice"])[:top]
    if d and report["by"] == "disagreement":
        ranked = sorted(report["scores"], key=lambda s: -s["disagreement"])[:top]
    print(f"hardest {len(ranked)}:")
    print(f"  {'key':<32} {'video':<20} {'frame':>6} {'dice':>7} {'recall':>7} {'precision':>9}"
          + (f" {'disagree':>8}" if d else ""))
    for s in ranked:
        print(f"  {s['key']:<32} {s['video']:<20} {s['frame']:6d} {s['dice']:7.4f} {s['recall']:7.4f} "
              f"{s['precision']:9.4f}" + (f" {s['disagreement']:8.4f}" if d else ""))
    clusters = report["clusters"]
    single = len({s["video"] for s in report["scores"]}) == len(report["scores"])
    print(f"temporal hard clusters (>= {report['min_cluster_len']} hard frames, gaps <= {report['max_gap']}): "
          f"{len(clusters)}" + (" (every video has one frame: still images have no temporal clusters)" if single else ""))
    for c in clusters:
        print(f"  {c['video']:<20} frames {c['first_frame']}-{c['last_frame']} ({c['length']} frames, "
              f"{c['hard_frames']} hard) mean Dice {c['mean_dice']:.4f} min {c['min_dice']:.4f}")


def plot_video(path, video, rows, threshold, clusters, height=220):
    """PNG of Dice over frame position: points red when hard, threshold dashed, clusters shaded.
    rows: [(frame, dice)] sorted by frame. Pillow only."""
    left, right, top, bottom = 44, 12, 24, 28
    width = max(360, left + right + 16 * len(rows))
    step = (width - left - right) / max(1, len(rows) - 1)
    x = lambda pos: left + pos * step  # noqa: E731 (a two-use mapping)
    y = lambda d: top + (1.0 - d) * (height - top - bottom)  # noqa: E731
    im = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(im)
    position = {frame: pos for pos, (frame, _) in enumerate(rows)}
    for c in clusters:
        a, b = position[c["first_frame"]], position[c["last_frame"]]
        draw.rectangle([max(left, x(a) - step / 2), top, min(width - right, x(b) + step / 2), height - bottom],
                       fill=(255, 215, 215))
    for d in (0.0, 0.5, 1.0):
        draw.line([left, y(d), width - right, y(d)], fill=(210, 210, 210))
        draw.text((4, y(d) - 6), f"{d:.1f}", fill="black")
    for x0 in range(left, width - right, 8):  # dashed threshold line
        draw.line([x0, y(threshold), min(x0 + 4, width - right), y(threshold)], fill=(220, 0, 0))
    points = [(x(pos), y(d)) for pos, (_, d) in enumerate(rows)]
    if len(points) > 1:
        draw.line(points, fill=(30, 80, 200), width=2)
    label_every = max(1, len(rows) // 12)
    for pos, ((frame, d), (px, py)) in enumerate(zip(rows, points)):
        colour = (220, 0, 0) if d < threshold else (30, 80, 200)
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        if pos % label_every == 0:
            draw.text((px - 6, height - bottom + 6), str(frame), fill="black")
    draw.text((left, 4), f"{video}: Dice per frame (threshold {threshold:g})", fill="black")
    im.save(path)


def write_plots(report, folder):
    """One plot per video of two or more frames (a one-point plot says nothing); returns how many."""
    by_video = {}
    for s in report["scores"]:
        by_video.setdefault(s["video"], []).append((s["frame"], s["dice"]))
    names = file_names([v for v, rows in by_video.items() if len(rows) > 1])  # unique even when ids sanitise alike
    if names:
        os.makedirs(folder, exist_ok=True)
    for video, name in names.items():
        plot_video(os.path.join(folder, name + ".png"), video, sorted(by_video[video]), report["threshold_hard"],
                   [c for c in report["clusters"] if c["video"] == video])
    return len(names)


def main(args):
    path = os.path.join(args.output, HARD_FILE)
    if os.path.exists(path) and not args.overwrite:
        raise SystemExit(f"{path} exists; pass --overwrite to replace it (or another --output)")
    if args.by != "dice" and args.num_samples < 2:
        raise SystemExit(f"--by {args.by} needs --num_samples >= 2 (disagreement is between samples)")
    rank, world_size, device = init_distributed(False)
    seed_everything(args.seed)
    frames = select_split(args, args.split)
    dataset = VesselDataset(frames, args.resize_masks)
    model, processor, autocast = cli.load_for_inference(args, args.init, device)
    loader = torch.utils.data.DataLoader(dataset, args.batch_size, sampler=EvalSampler(len(dataset), rank, world_size),
                                         collate_fn=processor, num_workers=args.num_workers)
    print0(f"mining {len(dataset)} frames of {args.data} ({args.split}) with {args.init or args.model}")
    cache, disagreement = None, None
    if args.by != "dice":  # two passes: nothing trains, so the second reuses the frozen features of the first
        model.requires_grad_(False)
        cache = FeatureCache(device)
    records = score_loader(model, loader, device, (args.threshold,), cache=cache, autocast=autocast, desc="mining")
    if args.by != "dice":
        disagreement = disagreement_scores(model, loader, device, args, cache, autocast)
    report = build_report(records, frames, args, disagreement)
    if is_main():
        os.makedirs(args.output, exist_ok=True)
        write_json(path, report, overwrite=args.overwrite)  # a list another run wrote meanwhile is kept
        print_report(report, args.top)
        print(f"wrote {path}")
        if args.plot:
            n = write_plots(report, os.path.join(args.output, "dice_plots"))
            print(f"wrote {n} plot(s) to {os.path.join(args.output, 'dice_plots')}" if n else
                  "no Dice plot: every video has one frame (still images have no Dice over time)")
    cleanup()
    return report


if __name__ == "__main__":
    cli.run_main(main, parse_args)
