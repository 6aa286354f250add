"""Build mask preference pairs for DPO (stage 2): `dpo_annotations.json` + `masks/`.

Three modes (`--mode`):
- generate: for every image of `--split`, the model's own prediction (`greedy`: sigmoid >
  --threshold) plus `--num_samples` stochastic predictions; ranked by IoU to the ground
  truth; pairs = best vs worst (or, with `--pairing all`, every pair) with
  iou_gap >= --min_iou_gap; `--include_gt` adds ground truth vs the best prediction.
- from_predictions: the candidates are existing binary mask PNGs, one folder per model or
  method (`--predictions sft=DIR dpo=DIR ...`, files named by image stem), ranked the same way.
- gt: chosen = ground truth, rejected = the model's prediction where its Dice < --max_dice
  (the methodology's stage 2).

Stochastic decoding (generate): each sample thresholds the model's low-res mask logits plus
spatially correlated logistic noise at the mask decoder's own grid (common.forward.sample_masks,
whose docstring says why): at T = 1 (--temperature) every low-res pixel is a Bernoulli draw from
the model's own p = sigmoid(logit), the distribution whose log-likelihood DPO trains, so the
pairs are on-policy; --noise_sigma makes whole vessel segments appear or vanish together.
Thresholds or test-time flips were not used: they move every pixel the same way (a threshold
pair only teaches calibration) or need extra forward passes.

Ranking (--rank_by, common.rewards.preference_scores): by IoU to the ground truth (default), or
by a topology-aware score: clDice, 0.5 Dice + 0.5 clDice, or 0.5 Dice + 0.5 topology, where
topology adds connected-component (Betti-0) agreement, so a mask broken into more pieces than
the ground truth ranks below one of equal overlap (ARIADNE, arXiv 2603.19169: DPO on Sa2VA with
topology preference pairs). --min_iou_gap is the gap of that score. With a score other than IoU
the chosen mask can have the lower IoU (iou_gap < 0): each entry then also holds rank_by,
chosen_score, rejected_score, score_gap and each side's dice, cldice and betti0_error.

    python make_dpo_pairs.py --mode generate --data DATA --init runs/sft_x/best --output pairs
    python make_dpo_pairs.py --mode from_predictions --data DATA --predictions a=preds_a b=preds_b --output pairs
    python make_dpo_pairs.py --mode gt --data DATA --init runs/sft_x/best --max_dice 0.75 --output pairs

Writes --output (atomically: a temporary folder renamed when complete): dpo_annotations.json
(paths relative to it; images and ground-truth masks are referenced where they are, never
copied), masks/<image stem>__<tag>.png (the generated masks used by pairs; tag = greedy, s1..sN,
pred, gt), summary.json (counts, gap quantiles and histogram of the ranking score, IoU-gap
quantiles, the arguments).
"""
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common import cli
from common.data import (DataError, EvalSampler, MaskRule, VesselDataset, cap_frames, check_masks, frame_mask,
                         list_images, load_splits, read_mask, scan_folder)
from common.engine import all_gather_objects, cleanup, init_distributed, is_main, print0, seed_everything
from common.evaluation import predict_probabilities
from common.files import atomic_folder, write_json
from common.forward import (SAMPLE_NOISE_SIGMA, forward_batch, full_size_logits, move_batch, sample_generator,
                            sample_masks)
from common.pairs import PAIRS_FILE, load_pairs
from common.rewards import RANK_BY, preference_scores

GAP_BINS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)  # histogram edges of the printed gap distribution
SCORE_PARTS = ("dice", "cldice", "betti0_error")  # recorded per side when --rank_by is not iou


def parse_args(argv=None):
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_model_args(p)
    cli.add_data_args(p)
    g = p.add_argument_group("pairs")
    g.add_argument("--mode", required=True, choices=("generate", "from_predictions", "gt"), help="see the docstring")
    g.add_argument("--output", required=True, help="folder for dpo_annotations.json, masks/, summary.json")
    g.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    g.add_argument("--split", default="train", help="images to pair: train, val, test (splits.json) or all; DPO trains "
                                                    "on these, so keep validation images out")
    g.add_argument("--rank_by", choices=RANK_BY, default="iou",
                   help="score that ranks the candidates against the ground truth: iou; cldice; dice_cldice = 0.5 Dice "
                        "+ 0.5 clDice; dice_topology = 0.5 Dice + 0.5 (clDice + connected-component agreement) / 2, "
                        "which ranks a mask in more pieces than the ground truth below one of equal overlap")
    g.add_argument("--min_iou_gap", "--min_gap", dest="min_iou_gap", type=float, default=0.05,
                   help="keep pairs whose chosen score - rejected score (--rank_by; IoU by default) is >= this "
                        "(> 0.1 recommended)")
    g.add_argument("--pairing", choices=("best_worst", "all"), default="best_worst",
                   help="per image: best vs worst candidate, or every candidate pair above the gap")
    g.add_argument("--max_pairs_per_image", type=int, default=0, help="with --pairing all: keep the N largest gaps (0 = all)")
    g.add_argument("--include_gt", action="store_true", help="generate/from_predictions: add ground truth vs the best "
                                                             "candidate")
    g.add_argument("--batch_size", type=int, default=8, help="images per forward pass (generate, gt)")
    s = p.add_argument_group("generate")
    s.add_argument("--num_samples", type=int, default=5, help="stochastic predictions per image (plus the greedy one)")
    s.add_argument("--temperature", type=float, default=1.0, help="T in sigmoid(logits / T); 1 = the model's own "
                                                                  "distribution, higher = more diverse")
    s.add_argument("--noise_sigma", type=float, default=SAMPLE_NOISE_SIGMA,
                   help="spatial correlation of the sampling noise, in low-res pixels (0 = independent pixels)")
    f = p.add_argument_group("from_predictions / gt")
    f.add_argument("--predictions", nargs="+", default=[], help="NAME=DIR folders of binary mask PNGs named by image stem")
    f.add_argument("--max_dice", type=float, default=0.75, help="gt mode: pair only images the model scores below this")
    return cli.parse(p, argv)


# ---------------------------------------------------------------- candidates

def model_candidates(args, frames, rank, world_size, device):
    """{frame index: [(tag, bool mask)]} of this rank's shard: the greedy prediction, and in
    generate mode --num_samples samples. One batched forward pass per batch of images."""
    model, processor, autocast = cli.load_for_inference(args, args.init, device)
    dataset = VesselDataset(frames, args.resize_masks)
    loader = torch.utils.data.DataLoader(dataset, args.batch_size, sampler=EvalSampler(len(dataset), rank, world_size),
                                         collate_fn=processor, num_workers=args.num_workers)
    out = {}
    with torch.no_grad():  # not a decorator: building the tiny model above trains it briefly
        for batch in tqdm(loader, desc=f"{args.mode}: predicting", disable=not is_main()):
            batch = move_batch(batch, device)
            if args.mode == "gt":
                probs = predict_probabilities(model, batch, autocast=autocast)
                for i, index in enumerate(batch["index"].tolist()):
                    out[index] = [("pred", probs[i].cpu() > args.threshold)]
                continue
            with autocast():
                low_res = forward_batch(model, batch)["low_res_logits"].float().cpu()
            for i, index in enumerate(batch["index"].tolist()):
                size = batch["image_sizes"][i]
                greedy = full_size_logits(model, low_res[i:i + 1], [size])[0].sigmoid() > args.threshold
                samples = sample_masks(model, low_res[i:i + 1], size, args.num_samples, args.temperature,
                                       args.noise_sigma, sample_generator(args.seed, index))
                out[index] = [("greedy", greedy)] + [(f"s{k + 1}", m) for k, m in enumerate(samples)]
    return out


def prediction_candidates(args, frames, rank, world_size):
    """Same as model_candidates from --predictions folders (files by image stem; paths kept)."""
    folders = []
    for spec in args.predictions:
        name, _, folder = spec.partition("=")
        if not folder:
            name, folder = os.path.basename(spec.rstrip("/")), spec
        folders.append((name, list_images(folder)))
    out = {}
    for index in range(rank, len(frames), world_size):
        f, cands = frames[index], []
        height, width = frame_mask(f).shape
        for name, files in folders:
            if f.key in files:
                mask = read_mask(files[f.key])
                if mask.shape != (height, width):
                    raise DataError(f"{files[f.key]}: prediction is {mask.shape[1]}x{mask.shape[0]} but the ground "
                                    f"truth of {f.key} is {width}x{height}")
                cands.append((name, torch.from_numpy(mask), files[f.key]))
        out[index] = cands
    return out


# ---------------------------------------------------------------- pairs

def gap_name(rank_by):
    """The gap pairs are kept by: IoU's, or that of the --rank_by score."""
    return "iou" if rank_by == "iou" else "score"


def select_pairs(args, frame, cands):
    """Pairs of one image: list of (chosen, rejected), each dict(tag, mask, path, score, iou, dice[, cldice,
    betti0_error]); candidates ranked by --rank_by, pairs kept when the score gap is >= --min_iou_gap."""
    gt = torch.from_numpy(np.ascontiguousarray(frame_mask(frame)))
    if not cands:
        return [], "no candidate"
    scores = preference_scores(torch.stack([c[1] for c in cands]), gt.expand(len(cands), *gt.shape), args.rank_by)
    # score and IoU rounded as written, so the file's gaps are exactly the differences of its values
    ranked = sorted(({"tag": c[0], "mask": c[1], "path": c[2] if len(c) > 2 else None,
                      **{k: round(float(v[j]), 6) if k in ("score", "iou") else float(v[j]) for k, v in scores.items()}}
                     for j, c in enumerate(cands)), key=lambda c: -c["score"])
    truth = dict(tag="gt", mask=gt, path=frame.mask_path, **{k: 0 if k == "betti0_error" else 1.0 for k in scores})
    if args.mode == "gt":
        if ranked[0]["dice"] >= args.max_dice:
            return [], "dice above --max_dice"
        pairs = [(truth, ranked[0])]
    elif args.pairing == "best_worst":
        pairs = [(ranked[0], ranked[-1])] if len(ranked) > 1 else []
    else:
        pairs = [(a, b) for j, a in enumerate(ranked) for b in ranked[j + 1:]]
        pairs.sort(key=lambda p: p[1]["score"] - p[0]["score"])
        pairs = pairs[:args.max_pairs_per_image or None]
    if args.include_gt and args.mode != "gt":
        pairs.append((truth, ranked[0]))
    pairs = [(a, b) for a, b in pairs if a["score"] - b["score"] >= args.min_iou_gap - 1e-9]
    return pairs, None if pairs else f"{gap_name(args.rank_by)} gap below --min_iou_gap"


def packed(side):
    """A candidate ready to be sent to rank 0: its scores, and its file if it has one, else its bit-packed mask."""
    out = {k: v for k, v in side.items() if k not in ("mask", "path")}
    if side["path"]:
        return dict(out, path=side["path"])
    mask = side["mask"].numpy().astype(bool)
    return dict(out, shape=mask.shape, bits=np.packbits(mask))


def write_output(args, records, summary):
    """Write the pairs folder whole (pairs another run published meanwhile are never removed); without
    a pairs file when no pair passed."""
    final = os.path.abspath(args.output)
    with atomic_folder(final, args.overwrite) as tmp:
        os.makedirs(os.path.join(tmp, "masks"))
        entries = []
        for r in records:
            entry = dict(image=os.path.relpath(r["image_path"], final))
            for side in ("chosen", "rejected"):
                s = r[side]
                if "path" in s:  # an existing file (ground truth, a prediction folder): referenced, not copied
                    entry[f"{side}_mask"] = os.path.relpath(s["path"], final)
                else:
                    name = os.path.join("masks", f"{r['stem']}__{s['tag']}.png")
                    if not os.path.exists(os.path.join(tmp, name)):
                        mask = np.unpackbits(s["bits"], count=int(np.prod(s["shape"]))).reshape(s["shape"])
                        Image.fromarray(mask * np.uint8(255)).save(os.path.join(tmp, name))
                    entry[f"{side}_mask"] = name
            entry.update(chosen_iou=r["chosen"]["iou"], rejected_iou=r["rejected"]["iou"],
                         iou_gap=round(r["chosen"]["iou"] - r["rejected"]["iou"], 6), prompt=args.prompt)
            if args.rank_by != "iou":  # the MISSION.md fields stay as they are; the ranking is recorded beside them
                entry.update(rank_by=args.rank_by, chosen_score=r["chosen"]["score"],
                             rejected_score=r["rejected"]["score"],
                             score_gap=round(r["chosen"]["score"] - r["rejected"]["score"], 6),
                             **{f"{side}_{k}": int(r[side][k]) if k == "betti0_error" else round(r[side][k], 6)
                                for side in ("chosen", "rejected") for k in SCORE_PARTS})
            entries.append(entry)
        if entries:  # none passed: summary.json alone, its `skipped` says why
            write_json(os.path.join(tmp, PAIRS_FILE), entries)
            load_pairs(os.path.join(tmp, PAIRS_FILE), args.min_iou_gap)  # the file must load back before it is published
        write_json(os.path.join(tmp, "summary.json"), summary)


def gap_summary(gaps, low):
    """Quantiles and a histogram (edges from `low` up GAP_BINS) of a list of gaps."""
    quantiles = {q: float(np.quantile(gaps, float(q))) for q in ("0", "0.1", "0.25", "0.5", "0.75", "0.9", "1")}
    edges = (low,) + tuple(b for b in GAP_BINS if b > low)
    counts, _ = np.histogram(gaps, bins=edges)
    return quantiles, {f"{lo:g}-{hi:g}": int(c) for lo, hi, c in zip(edges, edges[1:], counts)}


def summarize(args, records, reasons, num_images):
    gap = gap_name(args.rank_by)
    summary = dict(mode=args.mode, rank_by=args.rank_by, images=num_images, pairs=len(records),
                   images_with_pairs=len({r["stem"] for r in records}), skipped=reasons,
                   chosen_tags={}, rejected_tags={}, args=vars(args))
    for r in records:
        for side in ("chosen", "rejected"):
            tag = r[side]["tag"]
            summary[f"{side}_tags"][tag] = summary[f"{side}_tags"].get(tag, 0) + 1
    if records:
        gaps = np.array([r["chosen"]["score"] - r["rejected"]["score"] for r in records])
        summary[f"{gap}_gap_quantiles"], summary[f"{gap}_gap_histogram"] = gap_summary(gaps, args.min_iou_gap)
        for side in ("chosen", "rejected"):
            for k in ("iou", "score") + (SCORE_PARTS if gap == "score" else ()):
                summary[f"mean_{side}_{k}"] = float(np.mean([r[side][k] for r in records]))
        if gap == "score":  # how often the ranking disagrees with IoU (the chosen mask has the lower IoU)
            iou_gaps = np.array([r["chosen"]["iou"] - r["rejected"]["iou"] for r in records])
            summary["iou_gap_quantiles"] = gap_summary(iou_gaps, args.min_iou_gap)[0]
            summary["pairs_chosen_lower_iou"] = int((iou_gaps < 0).sum())
    return summary


def main(args):
    rank, world_size, device = init_distributed(False)
    seed_everything(args.seed)
    if os.path.exists(args.output) and not args.overwrite:
        raise SystemExit(f"--output {args.output} exists; pass --overwrite to replace it")
    if args.mode == "from_predictions" and not args.predictions:
        raise SystemExit("--mode from_predictions needs --predictions NAME=DIR [NAME=DIR ...]")
    frames = scan_folder(args.data, args.video_regex, resize_masks=args.resize_masks, data_format=args.data_format,
                         allow_empty_annotations=args.allow_empty_annotations, mask_rule=MaskRule.from_args(args))
    if args.split != "all":
        splits = load_splits(args.data, frames, args.val_fraction, args.seed)
        if args.split not in splits:
            raise SystemExit(f"--split {args.split}: the data has splits {sorted(splits)}")
        frames = cap_frames(splits[args.split], args.max_train_samples if args.split == "train" else args.max_val_samples)
    check_masks(frames, args.split, args.data)  # pairs ranked by IoU to all-empty masks would be noise
    print0(f"{args.mode}: {len(frames)} images of {args.data} ({args.split})")

    if args.mode == "from_predictions":
        candidates = prediction_candidates(args, frames, rank, world_size)
    else:
        candidates = model_candidates(args, frames, rank, world_size, device)
    records, reasons = [], {}
    for index, cands in candidates.items():
        pairs, reason = select_pairs(args, frames[index], cands)
        if reason:
            reasons[reason] = reasons.get(reason, 0) + 1
        for chosen, rejected in pairs:
            records.append(dict(index=index, stem=frames[index].key, image_path=frames[index].image_path,
                                chosen=packed(chosen), rejected=packed(rejected)))
    # every rank paired its own shard; rank 0 writes everything
    records = sorted((r for part in all_gather_objects(records) for r in part), key=lambda r: r["index"])
    for part in all_gather_objects(reasons)[1:]:
        for k, v in part.items():
            reasons[k] = reasons.get(k, 0) + v
    summary = summarize(args, records, reasons, len(frames))
    if not records:
        if is_main():  # an empty pairs folder whose summary.json says why (run.sh then skips DPO)
            write_output(args, records, summary)
        raise SystemExit(f"no pair passed (skipped: {reasons}; {os.path.join(args.output, 'summary.json')}); lower "
                         f"--min_iou_gap, raise --num_samples or --temperature, or check the model")
    if is_main():
        write_output(args, records, summary)
        print0(f"wrote {len(records)} pairs of {summary['images_with_pairs']}/{len(frames)} images to "
               f"{os.path.join(args.output, PAIRS_FILE)}; skipped images: {reasons or 'none'}")
        print0(f"mean IoU chosen {summary['mean_chosen_iou']:.4f} rejected {summary['mean_rejected_iou']:.4f}; "
               f"chosen {summary['chosen_tags']} rejected {summary['rejected_tags']}")
        gap = gap_name(args.rank_by)
        if gap == "score":
            print0(f"ranked by {args.rank_by}: mean score chosen {summary['mean_chosen_score']:.4f} rejected "
                   f"{summary['mean_rejected_score']:.4f}; Betti-0 error chosen "
                   f"{summary['mean_chosen_betti0_error']:.2f} rejected {summary['mean_rejected_betti0_error']:.2f}; "
                   f"{summary['pairs_chosen_lower_iou']} pair(s) chose the mask of lower IoU")
        print0(f"{gap}_gap quantiles: " + " ".join(f"q{k} {v:.3f}" for k, v in summary[f"{gap}_gap_quantiles"].items()))
        print0(f"{gap}_gap histogram: " + " ".join(f"[{k}) {v}" for k, v in summary[f"{gap}_gap_histogram"].items()))
    cleanup()
    return summary


if __name__ == "__main__":
    cli.run_main(main, parse_args)
