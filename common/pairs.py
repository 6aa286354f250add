"""Mask preference pairs for DPO: the `dpo_annotations.json` file, its validator and dataset.

The file (MISSION.md) is a JSON list of
    {"image": ..., "chosen_mask": ..., "rejected_mask": ..., "chosen_iou": float,
     "rejected_iou": float, "iou_gap": float, "prompt": "<image>\\n..."}
with paths relative to the JSON file (absolute paths are accepted too). A file ranked by another
score than IoU (`make_dpo_pairs.py --rank_by`) adds to each entry "rank_by", "chosen_score",
"rejected_score", "score_gap" and per-side parts (chosen_dice, chosen_cldice,
chosen_betti0_error, ...); its chosen mask may have the lower IoU, so the ordering and minimum-gap
checks then apply to score_gap (iou_gap must still equal chosen_iou - rejected_iou). `make_dpo_pairs.py`
writes it, `train_dpo.py` reads it; `load_pairs` checks every entry before a run starts
(keys, files, sizes, IoU bookkeeping), and every problem is a `DataError` naming the entry
index and the file.
"""
import math
import os

import numpy as np
import torch

from common.data import VIDEO_REGEX, DataError, image_size, parse_video, read_image, read_json, read_mask

PAIRS_FILE = "dpo_annotations.json"
PAIR_KEYS = ("image", "chosen_mask", "rejected_mask", "chosen_iou", "rejected_iou", "iou_gap", "prompt")
SCORE_KEYS = ("chosen_score", "rejected_score", "score_gap")  # optional: a file ranked by another score than IoU
GAP_TOLERANCE = 1e-4  # iou values are written rounded to 6 decimals; the gap must match their difference


def _entry_error(path, index, text):
    return DataError(f"{path}: entry {index}: {text}")


def check_entry(entry, index, path, root, min_iou_gap=None):
    """One validated entry with absolute paths added (`*_path`), or a DataError."""
    if not isinstance(entry, dict):
        raise _entry_error(path, index, f"must be an object with keys {', '.join(PAIR_KEYS)}, got {type(entry).__name__}")
    missing = [k for k in PAIR_KEYS if k not in entry]
    if missing:
        raise _entry_error(path, index, f"missing key(s) {', '.join(missing)} (an entry needs {', '.join(PAIR_KEYS)})")
    if not isinstance(entry["prompt"], str) or "<image>" not in entry["prompt"]:
        raise _entry_error(path, index, f"prompt must be a string containing <image>, got {entry['prompt']!r}")
    for k in ("chosen_iou", "rejected_iou", "iou_gap"):
        v = entry[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _entry_error(path, index, f"{k} must be a finite number, got {v!r}")
    for k in ("chosen_iou", "rejected_iou"):
        if not 0.0 <= entry[k] <= 1.0:
            raise _entry_error(path, index, f"{k} = {entry[k]} is not an IoU in [0, 1]")
    gap = entry["chosen_iou"] - entry["rejected_iou"]
    if abs(entry["iou_gap"] - gap) > GAP_TOLERANCE:
        raise _entry_error(path, index, f"iou_gap {entry['iou_gap']} != chosen_iou - rejected_iou = {gap:.6f}")
    ranking = "iou"  # the gap the pair was ranked by: iou_gap, or score_gap in a file ranked by another score
    if "score_gap" in entry:
        ranking = "score"
        for k in SCORE_KEYS:
            v = entry.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _entry_error(path, index, f"{k} must be a finite number when score_gap is given, got {v!r}")
        gap = entry["chosen_score"] - entry["rejected_score"]
        if abs(entry["score_gap"] - gap) > GAP_TOLERANCE:
            raise _entry_error(path, index, f"score_gap {entry['score_gap']} != chosen_score - rejected_score = "
                                            f"{gap:.6f}")
    if entry[f"{ranking}_gap"] < 0:
        raise _entry_error(path, index, f"{ranking}_gap {entry[f'{ranking}_gap']} < 0: the chosen mask must be the "
                                        f"better one")
    if min_iou_gap is not None and entry[f"{ranking}_gap"] < min_iou_gap - 1e-9:
        raise _entry_error(path, index, f"{ranking}_gap {entry[f'{ranking}_gap']} is below the threshold {min_iou_gap}")
    out = dict(entry)
    for k in ("image", "chosen_mask", "rejected_mask"):
        if not isinstance(entry[k], str) or not entry[k]:
            raise _entry_error(path, index, f"{k} must be a path, got {entry[k]!r}")
        full = os.path.normpath(os.path.join(root, entry[k]))
        if not os.path.isfile(full):
            raise _entry_error(path, index, f"{k} file {full} not found (paths are relative to the JSON file)")
        out[k + "_path"] = full
    try:
        height, width = image_size(out["image_path"])
    except DataError as e:
        raise _entry_error(path, index, str(e)) from None
    for k in ("chosen_mask", "rejected_mask"):
        try:
            shape = read_mask(out[k + "_path"]).shape
        except DataError as e:
            raise _entry_error(path, index, str(e)) from None
        if shape != (height, width):
            raise _entry_error(path, index, f"{k} {out[k + '_path']} is {shape[1]}x{shape[0]} but the image "
                                            f"{out['image_path']} is {width}x{height}")
    return out


def load_pairs(path, min_iou_gap=None, video_regex=VIDEO_REGEX):
    """Validated entries of a pairs file (a `dpo_annotations.json`, or the folder holding it).

    Each entry keeps its fields and gains image_path/chosen_mask_path/rejected_mask_path
    (absolute), `key` (image + prompt: the FeatureCache key), `video` and `frame` (from the
    image's file stem, for splits by video). `min_iou_gap`: refuse entries below it (their
    score_gap when they have one)."""
    if os.path.isdir(path):
        path = os.path.join(path, PAIRS_FILE)
    entries = read_json(path, "pairs file")
    if not isinstance(entries, list):
        raise DataError(f"{path}: must be a JSON list of pair objects, got {type(entries).__name__}")
    if not entries:
        raise DataError(f"{path}: no pairs")
    root = os.path.dirname(os.path.abspath(path))
    out = []
    for index, entry in enumerate(entries):
        e = check_entry(entry, index, path, root, min_iou_gap)
        stem = os.path.splitext(os.path.basename(e["image_path"]))[0]
        e["video"], e["frame"] = parse_video(stem, video_regex)
        e["stem"], e["key"] = stem, f"{e['image']}|{e['prompt']}"
        out.append(e)
    return out


class PairDataset(torch.utils.data.Dataset):
    """Samples for Sa2VAProcessor: dict(image=PIL RGB, chosen_mask, rejected_mask (bool (H, W)),
    key, prompt, index). `index` is the position in `entries` (reference log-likelihoods are
    stored by it)."""

    def __init__(self, entries):
        self.entries = list(entries)

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        e = self.entries[index]
        return dict(image=read_image(e["image_path"]), chosen_mask=read_mask(e["chosen_mask_path"]),
                    rejected_mask=read_mask(e["rejected_mask_path"]), key=e["key"], prompt=e["prompt"], index=index)


def disputed_share(entries, limit=64):
    """Median share of pixels where chosen and rejected differ, over the first `limit` pairs.

    Only those pixels separate the two masks' log-likelihoods: in h = (logp_w - ref_w) -
    (logp_l - ref_l) the agreeing pixels cancel, so with the per-pixel MEAN of MISSION.md, h is
    the per-disputed-pixel log-ratio times this share. beta scales h: the loss saturates
    (beta * h ~ 3) once the policy has moved ~3 / (beta * share) nats per disputed pixel."""
    shares = [float((read_mask(e["chosen_mask_path"]) != read_mask(e["rejected_mask_path"])).mean())
              for e in entries[:limit]]
    return float(np.median(shares)) if shares else 0.0

