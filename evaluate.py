"""Evaluate Sa2VA checkpoints on vessel masks: Dice, IoU, precision, recall, clDice per
sample and mean, a threshold sweep, and several checkpoints side by side.

    python evaluate.py --model /path/to/Sa2VA-4B --data /path/to/vessels \
        --checkpoints base sft=runs/sft_x/best hard=runs/hard_y/best --thresholds 0.3,0.35,0.4,0.5

`base` is the model without any stage checkpoint; `--init PATH` alone scores that one checkpoint
(giving both --init and --checkpoints is refused: one of them would be ignored). Scoring runs the batched forward path with
the teacher-forced answer (the same masks as the released predict_forward when it answers
"It is [SEG]."; see README). Writes to --output: metrics.csv (one row per sample and
checkpoint), summary.json (means per checkpoint and threshold, best threshold, per-sample
deltas vs the first checkpoint) and overlays/ (true positive white, false positive red,
false negative blue) for the best and worst samples.

Frames without ground truth (a folder of images with no masks/ or annotations.json, or
--predict_only) are segmented instead of scored:

    python evaluate.py --model /path/to/Sa2VA-4B --init runs/hard_x/best --data new_run/ --output pred

(one checkpoint: --init, or a single --checkpoints NAME=PATH; predictions.json names it)

writes pred/masks/<stem>.png (0/255, original size), pred/overlays/<stem>.png, one animated
pred/gifs/<video>.gif per video (frames in order), --save_probs pred/probs/<stem>.png (8-bit),
and pred/predictions.json (threshold, answer mode, per-frame vessel pixels, frames without [SEG]).

--baselines frangi,unet,grid adds rows scored with the same metrics, threshold and frames: Frangi
vesselness (no learning; polarity, sigmas and threshold fitted on the train split), a U-Net
trained on the stages' train split (--unet RUN reuses a `python -m common.baselines` run; without
it one is trained into <output>/unet/), and the ceiling of SAM2's mask grid (the ground truth
through the model's low-res mask grid). stage_table.md then gives every row's Dice gap to the U-Net.

--video_mode segments each video with SAM2's memory across frames, as the released Sa2VA video
inference does (common/video.py): on a labelled folder every checkpoint is scored per frame and in
video mode (rows NAME and NAME+video; --hard_clusters adds the temporal hard clusters' mean Dice),
on an unlabelled one the masks, overlays and GIFs come from video mode.
"""
import csv
import json
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from common import baselines
from common import cli
from common.data import (ANNOTATIONS_FILE, DataError, EvalSampler, VesselDataset, describe_split, file_names,
                         list_images, no_images_error, parse_video, read_image, select_split)
from common.engine import all_gather_objects, barrier, cleanup, init_distributed, is_main, print0, seed_everything
from common.evaluation import METRICS, frame_record, gather_records, predict_probabilities, score_loader, summarize
from common.files import write_json
from common.forward import move_batch
from common.lora import read_stage_meta
from common.rewards import cldice
from common.sa2va import SEG, CheckpointError, predict
from common.video import PROMPTS, RELEASED_CLIP_FRAMES, check_video_model, segment_video


def parse_args(argv=None):
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_model_args(p)
    cli.add_data_args(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--checkpoints", nargs="+", default=None,
                   help="NAME=PATH stage checkpoints (or `base`, or a bare PATH named by its folder), compared in order "
                        "(default: --init if given, else base); prediction without ground truth takes one")
    g.add_argument("--split", default="val",
                   help="split to score: train, val, test (from splits.json) or all; a separate test folder: all")
    g.add_argument("--thresholds", default="0.3,0.35,0.4,0.45,0.5,0.55,0.6",
                   help="comma list swept for every checkpoint (--threshold is always included)")
    g.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    g.add_argument("--output", default="eval", help="folder for metrics.csv, summary.json, overlays/")
    g.add_argument("--overlays", type=int, default=3, help="overlay PNGs of the N best and N worst samples (0 = none)")
    g.add_argument("--no_cldice", action="store_true", help="skip clDice (skeletons are the slow part on big sets)")
    g.add_argument("--panel", type=int, default=0,
                   help="write panel.png: N frames (hardest for the first checkpoint) x (frame, GT, every checkpoint)")
    g = p.add_argument_group("baselines (README, Baselines)")
    g.add_argument("--baselines", default="",
                   help="comma list of frangi, unet, grid: rows beside the checkpoints, same frames, metrics and "
                        "threshold. frangi: no learning, polarity/sigmas/threshold fitted on the train split; unet: a "
                        "U-Net trained on the train split (--unet, or trained here into <output>/unet/); grid: the "
                        "ground truth through SAM2's low-res mask grid, about the best any Sa2VA can score")
    g.add_argument("--unet", default=None,
                   help="a `python -m common.baselines` run folder (or its best/) to score as the unet row")
    g.add_argument("--unet_preset", default="auto", choices=("auto",) + tuple(baselines.UNET_PRESETS),
                   help="preset of a U-Net trained here (no --unet): auto = strong on a GPU, small on a CPU")
    g = p.add_argument_group("prediction without ground truth")
    g.add_argument("--predict_only", action="store_true",
                   help="segment the frames instead of scoring them (on by itself when --data has no masks/ and no "
                        "annotations.json); the model is --model + --init")
    g.add_argument("--answer_mode", choices=("fixed", "generate"), default="fixed",
                   help="fixed: the teacher-forced --answer, as in training (batched); generate: the model's own answer "
                        "through predict_forward, one frame at a time (frames where it writes no [SEG] are reported); "
                        "its masks are predict_forward's own (sigmoid > 0.5), so --threshold must stay 0.5")
    g.add_argument("--save_probs", action="store_true", help="also write 8-bit vessel probability PNGs (fixed answer)")
    g.add_argument("--gif_ms", type=int, default=100, help="milliseconds per frame of the per-video GIFs")
    g = p.add_argument_group("SAM2 video memory (InternVL family)")
    g.add_argument("--video_mode", action="store_true",
                   help="segment each video as the released Sa2VA video inference does (the LLM sees its first "
                        "--clip_frames frames, SAM2 tracks the rest with its memory). Scoring: every checkpoint gets "
                        "a second row NAME+video beside its per-frame row; prediction: the masks come from video mode")
    g.add_argument("--video_prompt", choices=PROMPTS, default="first",
                   help="first: the first --clip_frames frames get the [SEG] prompt, later ones only memory (released); "
                        "every: every frame gets memory and the [SEG] prompt (frame 0 alone has no memory)")
    g.add_argument("--clip_frames", type=int, default=RELEASED_CLIP_FRAMES,
                   help="frames of each video the LLM sees (the released inference uses 5)")
    g.add_argument("--hard_clusters", default=None,
                   help="a hard_samples.json of mine_hard.py on the same split: also report mean Dice over the frames "
                        "of its temporal hard clusters (cluster_mean_dice)")
    return cli.parse(p, argv)


def parse_checkpoints(specs):
    """[(name, path or None for the base model)] of --checkpoints specs."""
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


def resolve_checkpoints(args, predicting):
    """[(name, path)] of the checkpoints this run uses, from --init and --checkpoints; SystemExit
    for a combination where one of them would be ignored (the rows and files must name the
    checkpoint that made them). Prediction writes one set of masks: exactly one checkpoint."""
    init = [(parse_checkpoints([args.init])[0][0], args.init)] if args.init else []
    named = parse_checkpoints(args.checkpoints) if args.checkpoints else []
    if init and named and not (predicting and len(named) == 1 and named[0][1] == args.init):
        raise SystemExit(f"--init {args.init} and --checkpoints {' '.join(args.checkpoints)} both name checkpoints; "
                         f"one would be ignored. " + ("Prediction uses one: keep --init." if predicting else
                                                      f"To score it beside others add it to --checkpoints "
                                                      f"(e.g. --checkpoints base {init[0][0]}={args.init})."))
    chosen = named or init or [("base", None)]
    if predicting and len(chosen) > 1:
        raise SystemExit(f"prediction without ground truth writes one set of masks: name one checkpoint (--init PATH), "
                         f"not {len(chosen)} ({', '.join(n for n, _ in chosen)})")
    return chosen


def overlay(image, gt, pred):
    """Frame with true positives white, false positives red, false negatives blue."""
    out = np.asarray(image.convert("RGB")).astype(np.float32) * 0.6
    for m, colour in ((gt & pred, (255, 255, 255)), (pred & ~gt, (255, 40, 40)), (gt & ~pred, (40, 120, 255))):
        out[m] = colour
    return Image.fromarray(out.astype(np.uint8))


BASELINES = ("frangi", "unet", "grid")


def score_baseline(args, name, dataset, thresholds, rank, world_size, device, sam_size):
    """(checkpoint, records, this rank's probabilities, info) of a baseline on the scored frames: Frangi
    fitted on the stages' train split, a U-Net trained on it (here, or the --unet run), or the ground
    truth through the `sam_size` model's mask grid."""
    if name == "grid":  # needs no train frame: also on a folder that has none (a separate test folder, --split all)
        grid = sam_size // 4
        ckpt, predict = None, lambda sample: baselines.mask_grid_probabilities(sample["mask"], sam_size, args.threshold)
        info = dict(baseline="grid", sam_size=sam_size,
                    description=f"ceiling: the ground truth through SAM2's {grid} x {grid} mask grid (no model)")
    elif name == "frangi":
        try:
            params = baselines.fit_frangi(select_split(args, "train"), log=print0)
        except ValueError as e:
            raise SystemExit(f"--baselines frangi: {e}")
        ckpt, predict = None, lambda sample: torch.from_numpy(baselines.frangi_probabilities(sample["image"], params,
                                                                                             args.threshold))
        info = dict(baseline="frangi", frangi=params, description=f"no learning: Frangi vesselness, polarity, sigmas and "
                                                                  f"threshold fitted on {len(params['fit_frames'])} train frames")
    else:
        run = args.unet
        if run is None:  # trained on rank 0 into <output>/unet/, then every rank reads it
            argv = ["--data", args.data, "--data_format", args.data_format, "--val_fraction", str(args.val_fraction),
                    "--max_train_samples", str(args.max_train_samples), "--max_val_samples", str(args.max_val_samples),
                    "--threshold", str(args.threshold), "--seed", str(args.seed), "--mask_rule", args.mask_rule,
                    "--preset", args.unet_preset, "--output", os.path.join(args.output, "unet")]
            argv += ["--still_images"] if args.video_regex is None else ["--video_regex", args.video_regex]
            argv += ["--vessel_values", args.vessel_values] if args.vessel_values else []
            argv += ["--resize_masks"] * args.resize_masks + ["--allow_empty_annotations"] * args.allow_empty_annotations
            run = baselines.train_unet(baselines.parse_args(argv)) if is_main() else None
            run = all_gather_objects(run)[0]
        model, meta = baselines.load_unet(run, device)
        trained_on, scored = set(meta["train_frames"]), {f.key for f in dataset.frames}
        if trained_on & scored and args.split not in ("train", "all"):
            raise SystemExit(f"--unet {run}: trained on {len(trained_on & scored)} of the {args.split} frames scored here "
                             f"(e.g. {sorted(trained_on & scored)[0]}): no held-out comparison. Train it on this split: "
                             f"python -m common.baselines --data {args.data} with the stages' --seed, --val_fraction, "
                             f"--max_train_samples")
        train_keys = {f.key for f in select_split(args, "train")}
        same = trained_on == train_keys
        if not same:
            print0(f"warning: the U-Net {run} trained on {len(trained_on)} frames, not on this split's "
                   f"{len(train_keys)} train frames")
        ckpt, predict = meta["checkpoint"], lambda sample: baselines.unet_probabilities(model, sample["image"], device)
        info = dict(baseline="unet", parameters=meta["parameters"], preset=meta["args"]["preset"],
                    description=f"U-Net, {meta['parameters']:,} parameters, trained on "
                                + ("the same split" if same else f"another split ({len(trained_on)} frames)"))
    records, probs = [], {}
    for i in EvalSampler(len(dataset), rank, world_size):
        sample = dataset[i]
        probs[sample["key"]] = predict(sample).float()
        records.append(frame_record(sample["key"], i, probs[sample["key"]], sample["mask"], torch.tensor(thresholds)))
    return ckpt, gather_records(records), probs, info


def stage_table(summary, caption=None):
    """Markdown table under a caption saying what was scored: checkpoint (or what a baseline is), mean
    Dice/recall/precision/IoU, delta Dice vs the stage row above, the degenerate masks
    (common.evaluation.degenerate_masks: empty, or near-full, on frames whose ground truth has vessel;
    ! when any, COLLAPSED when most) and, with a unet row, every row's Dice gap to it."""
    unet = summary.get("unet", {}).get("mean_dice") if summary.get("unet", {}).get("baseline") else None
    lines = ([caption, ""] if caption else []) + [
        "| stage | checkpoint | mean Dice | recall | precision | IoU | delta Dice vs previous | degenerate masks |"
        + (" Dice vs U-Net |" if unet is not None else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if unet is not None else "")]
    previous, marked = None, []
    for name, s in summary.items():
        baseline = s.get("baseline")
        delta = "" if previous is None or baseline else f"{s['mean_dice'] - previous:+.4f}"
        flag = "0"
        if s.get("empty_masks", 0) + s.get("full_masks", 0):
            flag = (f"{s['empty_masks']} empty, {s['full_masks']} full of {s['frames_with_vessel']} "
                    f"{'COLLAPSED' if s['collapsed'] else '!'}")
            marked.append(f"{name}: {flag}")
        line = (f"| {name} | {s.get('description') or s['checkpoint'] or 'base model'} | {s['mean_dice']:.4f} | "
                f"{s['mean_recall']:.4f} | {s['mean_precision']:.4f} | {s['mean_iou']:.4f} | {delta} | {flag} |")
        if unet is not None:
            line += " |" if name == "unet" else f" {s['mean_dice'] - unet:+.4f} |"
        lines.append(line)
        if not baseline:
            previous = s["mean_dice"]
    if marked:
        threshold = next(iter(summary.values()))["threshold"]
        lines += ["", f"! degenerate masks: frames with vessel whose mask is empty, or covers most of the frame, at "
                      f"threshold {threshold:g} ({'; '.join(marked)}): a collapsed or badly thresholded model"]
    return "\n".join(lines)


def video_table(summary):
    """Markdown table: per checkpoint, mean Dice per frame vs with SAM2's video memory (and over
    the temporal hard clusters' frames when given)."""
    clusters = any("cluster_mean_dice" in s for s in summary.values())
    lines = ["| checkpoint | per-frame Dice | video-mode Dice | delta |"
             + (" hard-cluster frames | per-frame | video mode | delta |" if clusters else ""),
             "|---|---|---|---|" + ("---|---|---|---|" if clusters else "")]
    for name, s in summary.items():
        video = summary.get(f"{name}+video")
        if name.endswith("+video") or video is None:
            continue
        line = f"| {name} | {s['mean_dice']:.4f} | {video['mean_dice']:.4f} | {video['mean_dice'] - s['mean_dice']:+.4f} |"
        if clusters and not s["cluster_frames"]:  # no nan cells: say why there is no number
            line += " 0 | no temporal hard cluster in the scored split | | |"
        elif clusters:
            line += (f" {s['cluster_frames']} | {s['cluster_mean_dice']:.4f} | {video['cluster_mean_dice']:.4f} | "
                     f"{video['cluster_mean_dice'] - s['cluster_mean_dice']:+.4f} |")
        lines.append(line)
    return "\n".join(lines)


def read_cluster_keys(path, by_key):
    """The frames of the temporal hard clusters of a mine_hard.py hard_samples.json, which must all be
    frames of the scored split."""
    try:
        with open(path) as f:
            clusters = json.load(f)["clusters"]
        keys = {k for c in clusters for k in c["keys"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--hard_clusters {path}: not a hard_samples.json with temporal clusters ({e})")
    unknown = sorted(keys - set(by_key))
    if unknown:
        raise SystemExit(f"--hard_clusters {path}: {len(unknown)} cluster frame(s) are not in the scored split, e.g. "
                         f"{unknown[0]!r} (mine the same --split with the same data flags)")
    if not keys:
        print0(f"warning: --hard_clusters {path} has no temporal clusters")
    return keys


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


class Frames(torch.utils.data.Dataset):
    """Unlabelled frames: dict(image, key = file stem, index)."""

    def __init__(self, paths):
        self.keys, self.paths = list(paths), list(paths.values())

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return dict(image=read_image(self.paths[i]), key=self.keys[i], index=i)


def prediction_overlay(image, pred):
    """Frame dimmed, predicted vessel in yellow (no ground truth to colour errors by)."""
    out = np.asarray(image.convert("RGB")).astype(np.float32) * 0.6
    out[pred] = (255, 215, 0)
    return Image.fromarray(out.astype(np.uint8))


def gif_frame(path, i, n):
    """An overlay as GIF frame i of n: a progress bar along the bottom shows where in the video it
    is (and keeps identical-looking frames from being merged into one by the GIF writer)."""
    tile = Image.open(path).convert("RGB")
    out = np.array(tile)
    out[-3:, :] = 0
    out[-3:, :max(1, round(out.shape[1] * (i + 1) / n))] = (255, 255, 255)
    return Image.fromarray(out)


RELEASED_THRESHOLD = 0.5  # predict_forward thresholds its own masks at sigmoid > 0.5 (released code)


# ---------------------------------------------------------------- video mode (SAM2 memory across frames)

def video_groups(frame_ids):
    """{video: [positions in frame order]} of a list of (video, frame index) pairs, videos sorted."""
    groups = {}
    for i, (video, _) in enumerate(frame_ids):
        groups.setdefault(video, []).append(i)
    return {v: sorted(idx, key=lambda i: frame_ids[i][1]) for v, idx in sorted(groups.items())}


@torch.no_grad()
def video_probabilities(model, processor, frame_ids, load, device, autocast, desc="videos", **video_args):
    """Yields (position, sample, probabilities (H, W) float32 on the CPU) for every frame of this rank's
    share of the videos, segmented with SAM2's video memory (`common.video.segment_video`). Videos are
    sharded over ranks whole (a video's memory needs all its frames on one rank). frame_ids: (video,
    frame index) per position; load(position) -> a sample dict with `image`."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    for positions in tqdm(list(video_groups(frame_ids).values())[rank::world], desc=desc, leave=False,
                          disable=not is_main()):
        samples = [load(i) for i in positions]
        with autocast():
            probs = segment_video(model, processor, [s["image"] for s in samples], device, **video_args)
        for i, s, p in zip(positions, samples, probs):
            yield i, s, p.float().cpu()


@torch.no_grad()
def score_videos(model, processor, dataset, device, thresholds, autocast, desc="scoring videos", keep_probs=False,
                 **video_args):
    """score_loader's records, the frames segmented video by video with SAM2's memory."""
    thresholds = torch.tensor(thresholds, dtype=torch.float32)
    records, probs_out = [], {}
    frame_ids = [(f.video, f.frame) for f in dataset.frames]
    for i, sample, probs in video_probabilities(model, processor, frame_ids, dataset.__getitem__, device, autocast,
                                                desc, **video_args):
        records.append(frame_record(sample["key"], i, probs, sample["mask"], thresholds))
        if keep_probs:
            probs_out[sample["key"]] = probs
    records = gather_records(records)
    return (records, probs_out) if keep_probs else records


def predict_frames(args, rank, world_size, device):
    """Masks, overlays and per-video GIFs for frames without ground truth (see the docstring)."""
    ((name, init),) = resolve_checkpoints(args, predicting=True)
    if args.answer_mode == "generate" and args.threshold != RELEASED_THRESHOLD:
        raise SystemExit(f"--threshold {args.threshold:g} does not apply to --answer_mode generate: its masks are "
                         f"predict_forward's own (sigmoid > {RELEASED_THRESHOLD}); drop --threshold, or use the fixed "
                         f"answer")
    if args.answer_mode == "generate" and args.save_probs:
        raise SystemExit("--save_probs needs the fixed answer: predict_forward returns thresholded masks, no probabilities")
    folder = os.path.join(args.data, "images") if os.path.isdir(os.path.join(args.data, "images")) else args.data
    try:
        dataset = Frames(list_images(folder))
        if not len(dataset):
            raise no_images_error(folder)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    model, processor, autocast = cli.load_for_inference(args, init, device, bf16_weights=args.bf16)
    for sub in ("masks", "overlays") + (("probs",) if args.save_probs else ()):
        os.makedirs(os.path.join(args.output, sub), exist_ok=True)
    n_videos = len({parse_video(k, args.video_regex)[0] for k in dataset.keys})
    print0(f"segmenting {len(dataset)} frames of {n_videos} videos of {folder}"
           + (" (ONE video by --video_regex, shown as one GIF; independent images: --still_images)"
              if n_videos == 1 and len(dataset) > 1 else "") + f" with {init or 'the base model ' + args.model} "
           f"({args.answer_mode} answer, threshold {args.threshold:g}"
           + (f", video mode: {args.video_prompt} prompt, {args.clip_frames} clip frames)" if args.video_mode else ")"))

    def save(key, image, pred, probs=None):
        Image.fromarray(pred.astype(np.uint8) * 255).save(os.path.join(args.output, "masks", f"{key}.png"))
        prediction_overlay(image, pred).save(os.path.join(args.output, "overlays", f"{key}.png"))
        if probs is not None and args.save_probs:
            Image.fromarray((probs * 255).round().astype(np.uint8)).save(os.path.join(args.output, "probs", f"{key}.png"))
        return dict(frame=key, vessel_pixels=int(pred.sum()))

    records = []
    sampler = EvalSampler(len(dataset), rank, world_size)
    if args.video_mode:
        if args.answer_mode != "fixed":
            raise SystemExit("--video_mode takes the fixed answer (the released video inference's [SEG] comes from "
                             "one answer for the whole video); drop --answer_mode generate")
        check_video_model(model)
        frame_ids = [parse_video(k, args.video_regex) for k in dataset.keys]
        for i, sample, probs in video_probabilities(model, processor, frame_ids, dataset.__getitem__, device,
                                                    autocast, prompt=args.video_prompt,
                                                    clip_frames=args.clip_frames, chunk=args.batch_size):
            probs = probs.numpy()
            records.append(dict(save(sample["key"], sample["image"], probs > args.threshold, probs), seg_found=True))
    elif args.answer_mode == "fixed":
        loader = torch.utils.data.DataLoader(dataset, args.batch_size, sampler=sampler, collate_fn=processor,
                                             num_workers=args.num_workers)
        for batch in loader:
            for key, index, probs in zip(batch["keys"], batch["index"].tolist(),
                                         predict_probabilities(model, move_batch(batch, device), autocast=autocast)):
                probs = probs.float().cpu().numpy()
                records.append(dict(save(key, dataset[index]["image"], probs > args.threshold, probs), seg_found=True))
    else:
        with torch.no_grad():
            for index in sampler:
                sample = dataset[index]
                result = predict(model, processor.tokenizer, sample["image"], args.prompt)
                found = SEG in result["prediction"] and len(result["prediction_masks"]) > 0
                pred = np.asarray(result["prediction_masks"][0][0], dtype=bool) if found else \
                    np.zeros(sample["image"].size[::-1], dtype=bool)
                records.append(dict(save(sample["key"], sample["image"], pred), seg_found=found,
                                    answer=result["prediction"]))
    records = sorted((r for part in all_gather_objects(records) for r in part), key=lambda r: r["frame"])
    barrier()
    if not is_main():
        return records
    videos = {}
    for r in records:
        r["video"], r["frame_index"] = parse_video(r["frame"], args.video_regex)
        videos.setdefault(r["video"], []).append(r)
    # one GIF per video of two or more frames (a still image's overlay is its picture), under a name
    # unique in the folder: "left eye" and "left_eye" must not write one left_eye.gif
    gifs = {v: f"{n}.gif" for v, n in file_names([v for v, f in videos.items() if len(f) > 1]).items()}
    if gifs:
        os.makedirs(os.path.join(args.output, "gifs"), exist_ok=True)
    for video, gif in gifs.items():
        frames = sorted(videos[video], key=lambda r: r["frame_index"])
        tiles = [gif_frame(os.path.join(args.output, "overlays", f"{r['frame']}.png"), i, len(frames))
                 for i, r in enumerate(frames)]
        tiles = [t if t.size == tiles[0].size else t.resize(tiles[0].size) for t in tiles]  # one canvas per GIF
        tiles[0].save(os.path.join(args.output, "gifs", gif), save_all=True, append_images=tiles[1:],
                      duration=args.gif_ms, loop=0)
    no_seg = [r["frame"] for r in records if not r["seg_found"]]
    if no_seg:
        print0(f"warning: no {SEG} in the answer for {len(no_seg)} frame(s), their masks are empty: "
               + ", ".join(no_seg[:20]) + (" ..." if len(no_seg) > 20 else ""))
    write_json(os.path.join(args.output, "predictions.json"), dict(
        model=args.model, checkpoint=name, init=init, data=args.data, prompt=args.prompt, answer_mode=args.answer_mode,
        video_mode=dict(prompt=args.video_prompt, clip_frames=args.clip_frames) if args.video_mode else None,
        answer=args.answer if args.answer_mode == "fixed" else None,
        threshold=args.threshold if args.answer_mode == "fixed" else RELEASED_THRESHOLD,
        threshold_from="--threshold" if args.answer_mode == "fixed" else "predict_forward (fixed)",
        frames=records, videos={v: len(f) for v, f in videos.items()}, gifs=gifs, frames_without_seg=no_seg))
    print0(f"wrote {len(records)} masks and overlays of {len(videos)} video(s) and {len(gifs)} GIF(s) (videos of 2+ "
           f"frames) to {args.output}, from {init or 'the base model'}")
    return records


def scoring_args(args):
    """(checkpoints, thresholds, baseline rows) of a scoring run; SystemExit, before any model is loaded, for a
    checkpoint or U-Net folder that is not one, --answer_mode generate, or an unknown or clashing baseline name."""
    checkpoints = resolve_checkpoints(args, predicting=False)
    if args.answer_mode != "fixed":
        raise SystemExit("scoring runs the fixed answer (batched forward path); --answer_mode generate is for frames "
                         "without ground truth (--predict_only)")
    thresholds = sorted({float(t) for t in args.thresholds.split(",") if t} | {args.threshold})
    wanted_baselines = list(dict.fromkeys([b for b in args.baselines.split(",") if b] + ["unet"] * bool(args.unet)))
    if set(wanted_baselines) - set(BASELINES):
        raise SystemExit(f"--baselines: unknown {sorted(set(wanted_baselines) - set(BASELINES))}; "
                         f"choose from {', '.join(BASELINES)}")
    if set(wanted_baselines) & {name for name, _ in checkpoints}:
        raise SystemExit(f"--checkpoints: {sorted(set(wanted_baselines) & {n for n, _ in checkpoints})} is the name of "
                         f"a baseline row; name the checkpoint otherwise (NAME=PATH)")
    for name, ckpt in checkpoints:  # a wrong folder (a U-Net run, say) stops the run before any model is loaded
        try:
            if ckpt:
                read_stage_meta(ckpt)
        except CheckpointError as e:
            raise SystemExit(f"--checkpoints {name}={ckpt}: {e}")
    if args.unet:
        try:
            baselines.unet_checkpoint(args.unet)
        except CheckpointError as e:
            raise SystemExit(f"--unet: {e}")
    return checkpoints, thresholds, wanted_baselines


def cldice_by_key(args, probs, dataset, by_key):
    """{frame key: clDice at --threshold (None with --no_cldice)} of every rank's frames, each computed on the rank
    whose probability maps `probs` hold it (they stay there)."""
    local = {key: None if args.no_cldice else cldice((p > args.threshold).numpy(), dataset[by_key[key]]["mask"])
             for key, p in probs.items()}
    return {k: v for part in all_gather_objects(local) for k, v in part.items()}


def row_summary(args, ckpt, info, records, cldices, thresholds, cluster_keys):
    """A row's summary.json entry: the means at --threshold, clDice, the threshold sweep and its best threshold,
    and with --hard_clusters the clusters' frame count and mean Dice."""
    sweep = summarize(records, thresholds)
    best_t = max(sweep, key=lambda t: sweep[t]["mean_dice"])
    summary = dict(checkpoint=ckpt, **info, threshold=args.threshold, **sweep[float(args.threshold)],
                   mean_cldice=None if args.no_cldice else float(np.mean(list(cldices.values()))),
                   best_threshold=best_t, best_threshold_mean_dice=sweep[best_t]["mean_dice"],
                   sweep={str(t): v for t, v in sweep.items()})
    if cluster_keys is not None:
        dices = [r["dice"][thresholds.index(args.threshold)] for r in records if r["key"] in cluster_keys]
        summary.update(cluster_frames=len(dices), cluster_mean_dice=float(np.mean(dices)) if dices else float("nan"))
    return summary


def row_line(name, s, frames, no_cldice):
    """The printed line of a row's summary `s` over `frames` scored frames."""
    return (f"{name:>12}: dice {s['mean_dice']:.4f} iou {s['mean_iou']:.4f} recall {s['mean_recall']:.4f} "
            f"precision {s['mean_precision']:.4f}" + ("" if no_cldice else f" cldice {s['mean_cldice']:.4f}")
            + f" | best threshold {s['best_threshold']:g} -> dice {s['best_threshold_mean_dice']:.4f}"
            + (f" | {s['empty_masks']} of {frames} frames predicted EMPTY where the ground truth "
               f"has vessel" if s["empty_masks"] else ""))


def write_overlays(args, name, records, probs, dataset, by_key, main_t):
    """overlays/<name>_{worst,best}_<key>.png of the --overlays lowest- and highest-Dice frames this rank scored."""
    ranked = sorted(records, key=lambda r: r["dice"][main_t])
    chosen = {r["key"]: "worst" for r in ranked[:args.overlays]} | {r["key"]: "best" for r in ranked[-args.overlays:]}
    os.makedirs(os.path.join(args.output, "overlays"), exist_ok=True)
    for key, tag in chosen.items():
        if key not in probs:
            continue  # scored by another rank
        sample = dataset[by_key[key]]
        overlay(sample["image"], sample["mask"], (probs[key] > args.threshold).numpy()).save(
            os.path.join(args.output, "overlays", f"{name}_{tag}_{key}.png"))


def compare_to_first(summary, rows):
    """Each later row's per-frame Dice against the first row's (the baseline): mean delta and the frames it
    improved or worsened, added to its summary and printed."""
    names = list(summary)
    if len(names) < 2:
        return
    base = {r["sample"]: r["dice"] for r in rows if r["checkpoint"] == names[0]}
    for name in names[1:]:
        deltas = [r["dice"] - base[r["sample"]] for r in rows if r["checkpoint"] == name]
        summary[name]["delta_mean_dice_vs_" + names[0]] = float(np.mean(deltas))
        summary[name]["improved_samples"] = int(sum(d > 0 for d in deltas))
        summary[name]["worsened_samples"] = int(sum(d < 0 for d in deltas))
        print0(f"{name} vs {names[0]}: mean dice {np.mean(deltas):+.4f}, {summary[name]['improved_samples']} "
               f"samples better, {summary[name]['worsened_samples']} worse")


def write_scores(args, rows, summary, table, frames, total):
    """metrics.csv (a row per frame and checkpoint), summary.json, stage_table.md, and the line naming them."""
    with open(os.path.join(args.output, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_json(os.path.join(args.output, "summary.json"), dict(data=args.data, split=args.split, model=args.model,
                                                               samples=len(frames), folder_frames=total,
                                                               videos=len({f.video for f in frames}),
                                                               checkpoints=summary))
    with open(os.path.join(args.output, "stage_table.md"), "w") as f:
        f.write(table + "\n")
    print0(f"wrote {args.output}/metrics.csv, summary.json, stage_table.md" + (", overlays/" if args.overlays else "")
           + (", panel.png" if args.panel else ""))


def main(args):
    rank, world_size, device = init_distributed(False)
    seed_everything(args.seed)
    if args.video_mode and args.video_regex is None:
        raise SystemExit("--video_mode carries SAM2's memory from frame to frame of a video; with --still_images every "
                         "image is its own video, so there is nothing to carry: drop one of them")
    labelled = os.path.isdir(os.path.join(args.data, "masks")) or os.path.isfile(os.path.join(args.data, ANNOTATIONS_FILE))
    if args.predict_only or not labelled:
        if args.baselines or args.unet:
            raise SystemExit("--baselines are scored against ground truth: "
                             + ("--predict_only segments without it" if args.predict_only else
                                f"{args.data} has none (no masks/, no {ANNOTATIONS_FILE})"))
        records = predict_frames(args, rank, world_size, device)
        cleanup()
        return records
    checkpoints, thresholds, wanted_baselines = scoring_args(args)
    main_t = thresholds.index(args.threshold)
    frames, total = select_split(args, args.split, with_total=True)
    dataset = VesselDataset(frames, args.resize_masks)
    by_key = {f.key: i for i, f in enumerate(frames)}
    caption = (f"Scored: {args.split} split of {args.data}, {describe_split(frames)} (of {total} frames in the folder"
               + (")" if args.split == "all" else "; --split all scores every frame)"))
    print0(f"{caption}; thresholds {thresholds}")
    os.makedirs(args.output, exist_ok=True)

    cluster_keys = read_cluster_keys(args.hard_clusters, by_key) if args.hard_clusters else None
    rows, summary, panel_masks, panel_keys = [], {}, {}, None

    def add_result(name, ckpt, records, probs, **info):
        """One row of the comparison (a checkpoint, its video mode, or a baseline): clDice, panel, the
        threshold sweep, metrics.csv rows, overlays; `probs` are this rank's probability maps (clDice and
        overlays are computed on the rank that made them)."""
        nonlocal panel_keys
        cldices = cldice_by_key(args, probs, dataset, by_key)
        if args.panel:
            if panel_keys is None:  # the hardest frames for the first checkpoint (the baseline)
                panel_keys = [r["key"] for r in sorted(records, key=lambda r: r["dice"][main_t])[:args.panel]]
            local_masks = {k: (probs[k] > args.threshold).numpy() for k in panel_keys if k in probs}
            panel_masks[name] = {k: v for part in all_gather_objects(local_masks) for k, v in part.items()}
        summary[name] = row_summary(args, ckpt, info, records, cldices, thresholds, cluster_keys)
        for r in records:
            f = frames[r["index"]]
            rows.append(dict(checkpoint=name, checkpoint_path=ckpt or info.get("description") or "base model",
                             sample=r["key"], video=f.video, frame=f.frame,
                             **{k: r[k][main_t] for k in METRICS}, cldice=cldices[r["key"]]))
        if is_main() and args.overlays:
            write_overlays(args, name, records, probs, dataset, by_key, main_t)
        print0(row_line(name, summary[name], len(records), args.no_cldice))

    for base_name, ckpt in checkpoints:
        model, processor, autocast = cli.load_for_inference(args, ckpt, device)
        sam_size = processor.iface.sam_image_size
        if args.video_mode:
            check_video_model(model)
        loader = torch.utils.data.DataLoader(dataset, args.batch_size, sampler=EvalSampler(len(dataset), rank, world_size),
                                             collate_fn=processor, num_workers=args.num_workers)
        for mode in ("frame", "video") if args.video_mode else ("frame",):
            name = base_name if mode == "frame" else f"{base_name}+video"
            if mode == "frame":
                records, probs = score_loader(model, loader, device, thresholds, autocast=autocast,
                                              desc=f"scoring {name}", keep_probs=True)
            else:
                records, probs = score_videos(model, processor, dataset, device, thresholds, autocast=autocast,
                                              desc=f"scoring {name}", keep_probs=True, prompt=args.video_prompt,
                                              clip_frames=args.clip_frames, chunk=args.batch_size)
            add_result(name, ckpt, records, probs)
        del model
    for name in wanted_baselines:
        ckpt, records, probs, info = score_baseline(args, name, dataset, thresholds, rank, world_size, device, sam_size)
        add_result(name, ckpt, records, probs, **info)

    table = stage_table(summary, caption)
    if args.video_mode:
        table += "\n\n" + video_table(summary)
    print0(table)
    if is_main() and args.panel:
        write_panel(os.path.join(args.output, "panel.png"), [dataset[by_key[k]] for k in panel_keys], panel_masks)
    compare_to_first(summary, rows)
    if is_main():
        write_scores(args, rows, summary, table, frames, total)
    cleanup()
    return summary


if __name__ == "__main__":
    cli.run_main(main, parse_args)
