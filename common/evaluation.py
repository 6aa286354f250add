"""Batched scoring through the forward path, shared by the training scripts' validation,
`evaluate.py` and `mine_hard.py`.

Each rank scores its own shard (`data.EvalSampler`: every sample exactly once); per-sample
records are gathered, so the reported Dice is the Dice of the whole split on any number
of processes. The mean Dice is the mean over samples (the methodology's "mean Dice");
the global Dice pools the pixel counts of the split.
"""
import numpy as np
import torch
from tqdm import tqdm

from common.engine import all_gather_objects, is_main
from common.forward import forward_batch, full_size_logits, move_batch
from common.rewards import metrics_from_counts, overlap_counts

METRICS = ("dice", "iou", "precision", "recall")


@torch.no_grad()
def predict_probabilities(model, batch, cache=None, autocast=None):
    """Per-sample (H, W) float32 vessel probabilities at the original image size."""
    with autocast() if autocast else torch.autocast("cpu", enabled=False):
        out = forward_batch(model, batch, cache=cache)
    return [logits.sigmoid() for logits in full_size_logits(model, out["low_res_logits"], batch["image_sizes"])]


@torch.no_grad()
def score_loader(model, loader, device, thresholds=(0.5,), cache=None, autocast=None, desc="scoring",
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
            pred = probs[None] > thresholds[:, None, None]  # (T, H, W)
            gt = masks[i].bool()[None].expand_as(pred)
            counts = overlap_counts(pred, gt)
            metrics = metrics_from_counts(counts["tp"], counts["fp"], counts["fn"])
            record = dict(key=batch["keys"][i], index=int(batch["index"][i]) if "index" in batch else None,
                          **{k: counts[k].tolist() for k in ("tp", "fp", "fn")},
                          **{k: metrics[k].tolist() for k in METRICS})
            records.append(record)
            if keep_probs:
                probs_out[record["key"]] = probs
    model.train(was_training)
    records = [r for part in all_gather_objects(records) for r in part]
    records.sort(key=lambda r: (r["index"] is None, r["index"] if r["index"] is not None else r["key"]))
    return (records, probs_out) if keep_probs else records


def summarize(records, thresholds):
    """{threshold: {mean_dice, ..., global_dice, ...}} over the records."""
    out = {}
    for t_index, t in enumerate(thresholds):
        row = {f"mean_{k}": float(np.mean([r[k][t_index] for r in records])) if records else float("nan")
               for k in METRICS}
        tp, fp, fn = (torch.tensor(sum(r[k][t_index] for r in records)) for k in ("tp", "fp", "fn"))
        row.update({f"global_{k}": float(v) for k, v in metrics_from_counts(tp, fp, fn).items()})
        row["samples"] = len(records)
        out[float(t)] = row
    return out


def validate(model, loader, device, threshold=0.5, cache=None, autocast=None):
    """Mean Dice/IoU/precision/recall of a split at one threshold (all ranks agree)."""
    records = score_loader(model, loader, device, (threshold,), cache=cache, autocast=autocast, desc="validating")
    return summarize(records, (threshold,))[float(threshold)]
