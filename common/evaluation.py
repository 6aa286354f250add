"""Batched scoring through the forward path, shared by the training scripts' validation,
`evaluate.py` and `mine_hard.py`.

Each rank scores its own shard (`data.EvalSampler`: every sample exactly once); per-sample
records are gathered, so the reported Dice is the Dice of the whole split on any number
of processes. The mean Dice is the mean over samples (the methodology's "mean Dice");
the global Dice pools the pixel counts of the split.
"""
import contextlib

import numpy as np
import torch
from tqdm import tqdm

from common.engine import all_gather_objects, is_main
from common.forward import forward_batch, full_size_logits, move_batch
from common.rewards import metrics_from_counts, overlap_counts

METRICS = ("dice", "iou", "precision", "recall")
# A collapsed segmenter answers every frame with an empty mask, or with (nearly) the whole frame
NEAR_FULL = 0.9  # share of the frame predicted vessel that counts as a near-full mask
COLLAPSED = 0.5  # share of the frames with vessel whose masks are degenerate that marks a collapse


@torch.no_grad()
def predict_probabilities(model, batch, cache=None, autocast=contextlib.nullcontext):
    """Per-sample (H, W) float32 vessel probabilities at the original image size."""
    with autocast():
        out = forward_batch(model, batch, cache=cache)
    return [logits.sigmoid() for logits in full_size_logits(model, out["low_res_logits"], batch["image_sizes"])]


@torch.no_grad()
def score_loader(model, loader, device, thresholds=(0.5,), cache=None, autocast=contextlib.nullcontext, desc="scoring",
                 keep_probs=False):
    """Records for every sample of the loader's dataset over all ranks, in dataset order:
    dict(key, index, tp/fp/fn per threshold, dice/iou/precision/recall per threshold).
    With `keep_probs`, rank-local probability maps are returned as a second value."""
    was_training = model.training
    model.eval()
    thresholds = torch.tensor(thresholds, dtype=torch.float32)
    records, probs_out = [], {}
    for batch in tqdm(loader, desc=desc, leave=False, disable=not is_main()):
        masks = batch["masks"]
        batch = move_batch(batch, device)
        for i, probs in enumerate(predict_probabilities(model, batch, cache, autocast)):
            probs = probs.cpu()
            records.append(frame_record(batch["keys"][i], int(batch["index"][i]) if "index" in batch else None,
                                        probs, masks[i], thresholds))
            if keep_probs:
                probs_out[batch["keys"][i]] = probs
    model.train(was_training)
    records = gather_records(records)
    return (records, probs_out) if keep_probs else records


def frame_record(key, index, probs, mask, thresholds):
    """dict(key, index, tp/fp/fn and dice/iou/precision/recall per threshold) of one frame's
    probabilities (H, W) against its mask."""
    pred = probs[None] > thresholds[:, None, None]  # (T, H, W)
    counts = overlap_counts(pred, torch.as_tensor(mask).bool()[None].expand_as(pred))
    metrics = metrics_from_counts(counts["tp"], counts["fp"], counts["fn"])
    return dict(key=key, index=index, pixels=int(pred[0].numel()), **{k: counts[k].tolist() for k in ("tp", "fp", "fn")},
                **{k: metrics[k].tolist() for k in METRICS})


def degenerate_masks(records, t_index=0):
    """dict(frames_with_vessel, empty_masks, full_masks, collapsed) at threshold number `t_index`:
    among frames whose ground truth has vessel, those predicted empty and those predicted (nearly)
    full while the vessel is not; `collapsed` when they are at least COLLAPSED of those frames."""
    with_vessel = empty = full = 0
    for r in records:
        gt, pred = r["tp"][t_index] + r["fn"][t_index], r["tp"][t_index] + r["fp"][t_index]
        if gt == 0:
            continue
        with_vessel += 1
        empty += pred == 0
        full += pred >= NEAR_FULL * r["pixels"] > gt
    return dict(frames_with_vessel=with_vessel, empty_masks=int(empty), full_masks=int(full),
                collapsed=bool(with_vessel) and empty + full >= COLLAPSED * with_vessel)


def collapse_warning(metrics):
    """A loud line for a log when `metrics` (summarize's row) say the masks collapsed, else ''."""
    if not metrics.get("collapsed"):
        return ""
    return (f"WARNING: collapsed masks: of {metrics['frames_with_vessel']} frames with vessel, "
            f"{metrics['empty_masks']} got an empty mask and {metrics['full_masks']} a near-full one")


def gather_records(records):
    """Every rank's records, in dataset order."""
    return sorted((r for part in all_gather_objects(records) for r in part),
                  key=lambda r: (r["index"] is None, r["index"] if r["index"] is not None else r["key"]))


def summarize(records, thresholds):
    """{threshold: {mean_dice, ..., global_dice, ...}} over the records."""
    out = {}
    for t_index, t in enumerate(thresholds):
        row = {f"mean_{k}": float(np.mean([r[k][t_index] for r in records])) if records else float("nan")
               for k in METRICS}
        tp, fp, fn = (torch.tensor(sum(r[k][t_index] for r in records)) for k in ("tp", "fp", "fn"))
        row.update({f"global_{k}": float(v) for k, v in metrics_from_counts(tp, fp, fn).items()})
        row["samples"] = len(records)
        row.update(degenerate_masks(records, t_index))
        out[float(t)] = row
    return out


def validate(model, loader, device, threshold=0.5, cache=None, autocast=contextlib.nullcontext):
    """Mean Dice/IoU/precision/recall of a split at one threshold (all ranks agree)."""
    records = score_loader(model, loader, device, (threshold,), cache=cache, autocast=autocast, desc="validating")
    return summarize(records, (threshold,))[float(threshold)]
