"""Segmentation metrics and PPO rewards for binary vessel masks.

Three layers, each usable alone:

1. Overlap metrics on torch tensors (Dice, IoU, precision, recall), vectorised over
   the batch; used every evaluation epoch. ``overlap_counts`` + ``metrics_from_counts``
   let a distributed evaluator all-reduce summed counts and compute dataset-level
   ("global") scores, as LISA does for cIoU.
2. Skeleton metrics on numpy (clDice, connectivity, topology, Betti-0 error, skeleton
   length), one image at a time because skeletonisation is per image;
   ``skeleton_metrics`` loops over the batch. ``preference_scores`` ranks candidate
   masks for DPO pairs with them; ``mean_pairwise_disagreement`` scores how much
   sampled masks of one image disagree (hard mining).
3. PPO rewards: callables ``reward(pred, gt) -> dict`` of per-sample numpy arrays,
   picked by ``make_reward(args.reward_type, ...)``.

Zero-denominator convention (every ratio here, so no NaN and no division by zero):
a ratio whose denominator is 0 scores 1 when the prediction is error-free
(fp = fn = 0, i.e. prediction and ground truth are both empty) and 0 otherwise.
So an empty prediction of an empty frame is perfect on every metric, an empty
prediction of a non-empty frame has precision 0 (not "undefined"), and a non-empty
prediction of an empty frame has recall 0. The skeleton metrics follow the same
rule: both empty -> 1, exactly one empty -> 0.

Masks are bool or {0, 1}; any non-zero value counts as foreground (threshold
probabilities before calling). A 2-D input (H, W) is treated as a batch of one.
"""

import math

import numpy as np
import torch
from scipy import ndimage
from skimage.morphology import skeletonize

# 8-connectivity: vessels are thin and often run diagonally, so pixels touching at a
# corner belong to the same vessel.
_EIGHT = np.ones((3, 3), dtype=bool)


# ---------------------------------------------------------------- Overlap metrics (torch, batched)

def _flat_bool(x):
    """(H, W) -> (1, H*W); (B, ...) -> (B, prod(...)); bool, device kept."""
    x = torch.as_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"mask must be (H, W) or (B, H, W), got shape {tuple(x.shape)}")
    if x.ndim == 2:
        x = x.unsqueeze(0)
    return (x != 0).reshape(x.shape[0], -1)


def overlap_counts(pred, gt):
    """Per-sample confusion counts of two masks (tensors or arrays) of one shape, (B, ...) or (H, W):
    dict of int64 tensors (B,)
        tp = |P ∩ G|, fp = |P \\ G|, fn = |G \\ P|, tn = N - tp - fp - fn.
    Exact integers: ``metrics_from_counts`` of their sums over samples and ranks (all-reduce)
    gives dataset-level scores."""
    p, g = _flat_bool(pred), _flat_bool(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: {tuple(p.shape)} vs {tuple(g.shape)}")
    tp = (p & g).sum(1)
    fp = p.sum(1) - tp
    fn = g.sum(1) - tp
    tn = p.shape[1] - tp - fp - fn
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _ratio(num, den, clean):
    """num / den where den > 0, else 1.0 where `clean` (no errors at all) else 0.0."""
    return torch.where(den > 0, num / den.clamp(min=1), clean.to(num.dtype))


def metrics_from_counts(tp, fp, fn):
    """Dice, IoU, precision and recall (dict of float32 tensors) from confusion counts (tensors or
    numbers) of any common shape: per-sample counts (B,) give per-sample scores, counts summed over
    a dataset (and all-reduced over ranks) global scores of shape ().
        dice      = 2 tp / (2 tp + fp + fn)
        iou       = tp / (tp + fp + fn)
        precision = tp / (tp + fp)
        recall    = tp / (tp + fn)
    A zero denominator: the module's convention (for Dice and IoU it implies fp = fn = 0: 1).
    Computed in float64: dataset-level counts exceed float32's 2**24 exact-integer range."""
    tp, fp, fn = (torch.as_tensor(c).to(torch.float64) for c in (tp, fp, fn))
    clean = (fp + fn) == 0
    out = {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, clean),
        "iou": _ratio(tp, tp + fp + fn, clean),
        "precision": _ratio(tp, tp + fp, clean),
        "recall": _ratio(tp, tp + fn, clean),
    }
    return {k: v.float() for k, v in out.items()}


def overlap_metrics(pred, gt):
    """All four overlap metrics: dict of float32 tensors (B,) (shapes: ``overlap_counts``, formulas:
    ``metrics_from_counts``)."""
    c = overlap_counts(pred, gt)
    return metrics_from_counts(c["tp"], c["fp"], c["fn"])


def dice(pred, gt):
    """Dice = 2|P∩G| / (|P| + |G|) per sample, shape (B,); both empty -> 1."""
    return overlap_metrics(pred, gt)["dice"]


# ---------------------------------------------------------------- Skeleton metrics (numpy, one 2-D pair at a time)

def _skeleton(mask):
    """skimage skeleton of a 2-D bool mask, never empty for a non-empty mask."""
    if not mask.any():
        return mask.copy()
    s = skeletonize(mask)
    # Guard: a non-empty mask must have a non-empty skeleton, otherwise the
    # "exactly one empty -> 0" rule would misfire on tiny blobs.
    return s if s.any() else mask.copy()


def _share(num, den, clean):
    """num / den as float, den == 0 -> 1.0 if clean else 0.0 (module convention)."""
    return float(num) / float(den) if den > 0 else float(clean)


def _min_over_max(a, b):
    """min(a, b) / max(a, b) = 1 - |a - b| / max(a, b); both 0 -> 1, one 0 -> 0."""
    return _share(min(a, b), max(a, b), clean=True)


def _n_components(mask):
    return int(ndimage.label(mask, structure=_EIGHT)[1])


def _pair_terms(pred, gt, topology=True, length=True):
    """Skeleton metrics of one 2-D pair, skeletonising each mask only once."""
    sp, sg = _skeleton(pred), _skeleton(gt)
    both_empty = not pred.any() and not gt.any()
    out = {}
    if topology:
        tprec = _share(np.count_nonzero(sp & gt), np.count_nonzero(sp), both_empty)
        tsens = _share(np.count_nonzero(sg & pred), np.count_nonzero(sg), both_empty)
        cl = _share(2 * tprec * tsens, tprec + tsens, both_empty)
        n_pred, n_gt = _n_components(pred), _n_components(gt)
        conn = _min_over_max(n_pred, n_gt) * tsens
        out.update(cldice=cl, connectivity=conn, topology=0.5 * (cl + conn), betti0_error=abs(n_pred - n_gt))
    if length:
        out["length"] = _min_over_max(int(sp.sum()), int(sg.sum()))
    return out


def cldice(pred, gt):
    """Centerline Dice of one pair of 2-D masks (Shit et al., CVPR 2021), a Python float in [0, 1]:
        Tprec  = |S(P) ∩ G| / |S(P)|      (predicted centreline lying inside GT)
        Tsens  = |S(G) ∩ P| / |S(G)|      (GT centreline covered by the prediction)
        clDice = 2 Tprec Tsens / (Tprec + Tsens)
    S = skimage.morphology.skeletonize. Identical -> 1, disjoint -> 0 (empty masks: the module's rule)."""
    scores = skeleton_metrics(pred, gt, length=False)["cldice"]
    if len(scores) != 1:  # a batch would otherwise score its first pair only
        raise ValueError(f"cldice takes one pair of 2-D masks, got a batch of {len(scores)}: use skeleton_metrics")
    return float(scores[0])


def _batch_numpy(x):
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"mask must be (H, W) or (B, H, W), got shape {x.shape}")
    return x != 0


def skeleton_metrics(pred, gt, topology=True, length=True):
    """Skeleton metrics of a batch (numpy or torch, any device): dict of float64 numpy arrays (B,).
    Keys: "cldice", "connectivity", "topology", "betti0_error" if topology, "length"
    if length. Loops over the B samples because skeletonisation is per image; each mask
    is skeletonised once (S = skimage skeleton, C = 8-connected components):
        connectivity = min(Cp, Cg) / max(Cp, Cg) * Tsens, Tsens = |S(G) ∩ P| / |S(G)|:
                       the component ratio alone would reward one blob in the wrong place;
                       the coverage factor ties it to the GT vessels, so a break or a
                       spurious island lowers it;
        topology     = (clDice + connectivity) / 2;
        betti0_error = |Cp - Cg| (pieces, not where they are);
        length       = min(Lp, Lg) / max(Lp, Lg), L = skeleton pixels (plain count: the
                       prediction and GT of the same vessels share their diagonal bias).
    Both empty -> 1 (betti0_error 0), exactly one empty -> 0."""
    p, g = _batch_numpy(pred), _batch_numpy(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: {p.shape} vs {g.shape}")
    rows = [_pair_terms(pi, gi, topology, length) for pi, gi in zip(p, g)]
    keys = (["cldice", "connectivity", "topology", "betti0_error"] if topology else []) + (["length"] if length else [])
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in keys}


# ---------------- Ranking candidate masks (DPO pairs) and disagreement of sampled masks (mining)

RANK_BY = ("iou", "cldice", "dice_cldice", "dice_topology")


def preference_scores(pred, gt, rank_by="iou"):
    """The score that ranks candidate masks (numpy or torch) for DPO pairs, and its parts. rank_by:
        iou            IoU (no skeleton is computed)
        cldice         clDice
        dice_cldice    0.5 Dice + 0.5 clDice
        dice_topology  0.5 Dice + 0.5 topology,  topology = (clDice + connectivity) / 2,
                       connectivity = min(b0P, b0G) / max(b0P, b0G) * Tsens
    so with dice_topology a mask in more pieces than the GT (a broken vessel, spurious
    islands) ranks below one of equal overlap in as many pieces as the GT. Every score
    is in [0, 1] and is 1 for a mask equal to the GT.
    Returns dict of float64 numpy arrays (B,): score, iou, dice, and with a skeleton
    score also cldice, connectivity, betti0_error."""
    if rank_by not in RANK_BY:
        raise ValueError(f"unknown rank_by {rank_by!r}; choose from {RANK_BY}")
    out = {k: v.cpu().numpy().astype(np.float64) for k, v in overlap_metrics(pred, gt).items()
           if k in ("iou", "dice")}
    if rank_by == "iou":
        return dict(score=out["iou"].copy(), **out)
    s = skeleton_metrics(pred, gt, topology=True, length=False)
    out.update(cldice=s["cldice"], connectivity=s["connectivity"], betti0_error=s["betti0_error"])
    score = dict(cldice=s["cldice"], dice_cldice=0.5 * out["dice"] + 0.5 * s["cldice"],
                 dice_topology=0.5 * out["dice"] + 0.5 * s["topology"])[rank_by]
    return dict(score=score, **out)


def mean_pairwise_disagreement(masks):
    """How much N >= 2 masks of one image disagree: the mean over their N (N - 1) / 2 pairs of
    (1 - IoU), in [0, 1]. masks: (N, H, W) bool / {0, 1}. 0 exactly when all masks are equal
    (two empty masks have IoU 1); 1 when no two overlap."""
    m = _flat_bool(masks)
    if m.shape[0] < 2:
        raise ValueError(f"disagreement needs at least 2 masks, got {m.shape[0]}")
    i, j = torch.triu_indices(m.shape[0], m.shape[0], 1)
    return float((1.0 - overlap_metrics(m[i, None], m[j, None])["iou"].double()).mean())  # (pairs, 1, pixels)


# ---------------------------------------------------------------- PPO rewards

class MultiObjectiveReward:
    """Weighted vessel reward for PPO; ``reward(pred, gt) -> dict`` of (B,) arrays.

        reward = w_dice * dice + w_recall * recall_bonus
                 + w_topology * topology + w_length * length
        recall_bonus = min(recall / recall_target, 1)    in [0, 1]
    dice, recall from ``metrics_from_counts``; topology = (clDice + connectivity) / 2;
    length = ``skeleton_metrics``' length. Each term is in [0, 1], so the reward lies in
    [0, sum of weights] (1 with the defaults); weights are used as given, not
    normalised. A perfect prediction scores sum of weights.

    Dynamic recall: with dynamic_recall=True, while the running mean recall is below
    dynamic_recall_below (strictly), the recall weight becomes dynamic_recall_weight
    and the other weights are scaled by (total - dynamic_recall_weight) /
    (total - recall_weight), total = sum of weights, so the sum stays the same
    (defaults: 0.5/0.2/0.2/0.1 -> 0.375/0.4/0.15/0.075). The running recall is an
    exponential moving average fed by ``update_running_recall`` (the trainer calls it
    once per rollout with that rollout's mean recall, all-reduced over ranks so every
    rank uses the same weights); until the first update the base weights are used.

    Skeletonisation is the slow part, so the topology / length terms are only computed
    when their effective weight is non-zero; a skipped term is reported as NaN.
    Output keys: reward, dice, iou, precision, recall, recall_bonus, topology, cldice
    (a part of topology, reported as is), length."""

    def __init__(self, dice_weight=0.5, recall_weight=0.2, topology_weight=0.2,
                 length_weight=0.1, recall_target=0.85, dynamic_recall=False,
                 dynamic_recall_weight=0.4, dynamic_recall_below=0.80,
                 recall_momentum=0.9):
        weights = dict(dice=dice_weight, recall=recall_weight,
                       topology=topology_weight, length=length_weight)
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"reward weights must be >= 0, got {weights}")
        if not 0 < recall_target <= 1:
            raise ValueError(f"recall_target must be in (0, 1], got {recall_target}")
        if dynamic_recall and not 0 <= dynamic_recall_weight <= sum(weights.values()):
            raise ValueError("dynamic_recall_weight must lie in [0, sum of weights]")
        self.base_weights = weights
        self.recall_target = recall_target
        self.dynamic_recall = dynamic_recall
        self.dynamic_recall_weight = dynamic_recall_weight
        self.dynamic_recall_below = dynamic_recall_below
        self.recall_momentum = recall_momentum
        self.running_recall = None  # None until the trainer reports one

    def update_running_recall(self, mean_recall):
        """Fold one rollout's mean recall into the EMA; the first call sets it:
            r <- m * r + (1 - m) * mean_recall,   m = recall_momentum
        Smoothed because a single rollout's recall is noisy and flipping weights
        every step would make the reward non-stationary."""
        mean_recall = float(mean_recall)
        if self.running_recall is None:
            self.running_recall = mean_recall
        else:
            m = self.recall_momentum
            self.running_recall = m * self.running_recall + (1 - m) * mean_recall
        return self.running_recall

    def weights(self, running_recall=None):
        """Effective weights (dict dice/recall/topology/length) for a running recall; `running_recall`
        given: used instead of the stored EMA (and not stored)."""
        w = dict(self.base_weights)
        r = self.running_recall if running_recall is None else float(running_recall)
        if not self.dynamic_recall or r is None or r >= self.dynamic_recall_below:
            return w
        total = sum(w.values())
        others = total - w["recall"]
        # Scale the other terms so the weights still sum to `total` and the reward
        # range does not jump when the switch flips.
        scale = (total - self.dynamic_recall_weight) / others if others > 0 else 0.0
        w = {k: v * scale for k, v in w.items()}
        w["recall"] = self.dynamic_recall_weight
        return w

    def __call__(self, pred, gt, running_recall=None):
        """Per-sample reward and its terms, float64 numpy arrays (B,), of bool masks (B, H, W), numpy or torch."""
        w = self.weights(running_recall)
        m = {k: v.cpu().numpy().astype(np.float64) for k, v in overlap_metrics(pred, gt).items()}
        bonus = np.minimum(m["recall"] / self.recall_target, 1.0)
        reward = w["dice"] * m["dice"] + w["recall"] * bonus
        need_topo, need_len = w["topology"] > 0, w["length"] > 0
        s = skeleton_metrics(pred, gt, need_topo, need_len) if need_topo or need_len else {}
        out = dict(m, recall_bonus=bonus)
        out.update({k: s.get(k, np.full_like(bonus, math.nan)) for k in ("topology", "cldice", "length")})  # NaN: skipped
        for term in ("topology", "length"):
            if w[term] > 0:
                reward = reward + w[term] * out[term]
        out["reward"] = reward
        return out


class SimpleDiceReward(MultiObjectiveReward):
    """reward = dice. No skeleton terms are computed (reported as NaN)."""

    def __init__(self):
        super().__init__(dice_weight=1.0, recall_weight=0.0, topology_weight=0.0,
                         length_weight=0.0)


class RecallFocusedReward(MultiObjectiveReward):
    """reward = recall_weight * recall + (1 - recall_weight) * dice, default 0.7 / 0.3.
    Raw recall (recall_target = 1, so the bonus never saturates): an over-segmenting
    prediction beats an under-segmenting one of equal Dice. Keeping Dice in the sum
    stops "predict everything" from scoring 0.7+. No skeleton terms (NaN)."""

    def __init__(self, recall_weight=0.7):
        if not 0 <= recall_weight <= 1:
            raise ValueError(f"recall_weight must be in [0, 1], got {recall_weight}")
        super().__init__(dice_weight=1.0 - recall_weight, recall_weight=recall_weight,
                         topology_weight=0.0, length_weight=0.0, recall_target=1.0)


REWARDS = {
    "multi_objective": MultiObjectiveReward,
    "simple_dice": SimpleDiceReward,
    "recall_focused": RecallFocusedReward,
}


def make_reward(name, **weights):
    """Build the reward named by --reward_type with the given constructor arguments. Arguments
    whose value is None are dropped, so a trainer can pass every flag with default None ("use the
    reward's default"). An argument the chosen reward does not take raises TypeError rather than
    being silently ignored (e.g. --dice_weight with simple_dice)."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward_type {name!r}; choose from {sorted(REWARDS)}")
    return REWARDS[name](**{k: v for k, v in weights.items() if v is not None})
