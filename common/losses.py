"""Losses as pure functions of tensors (formulas in the docstrings).

Masks are compared at each sample's original size: the logits are resized exactly as the
released inference resizes them (`forward.full_size_logits`), so the loss looks at the
pixels the evaluation scores, thin vessels included.
"""
import torch
import torch.nn.functional as F


def dice_loss(logits, target, smooth=1.0):
    """Soft Dice loss of one mask: 1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s), p = sigmoid(logits).

    logits, target: (H, W) (or any equal shapes). Returns a scalar. An empty target with an
    empty prediction gives 0 (the smoothing term `s` = 1, as in LISA)."""
    p = logits.float().sigmoid().flatten()
    t = target.float().flatten()
    return 1.0 - (2.0 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)


def sigmoid_bce(logits, target):
    """Mean per-pixel binary cross-entropy: -mean[t log p + (1 - t) log(1 - p)], p = sigmoid(logits)."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def mask_log_likelihood(logits, target):
    """Mean per-pixel log-likelihood of a binary mask under the model (MISSION.md, DPO):
    log p(y|x) = mean_i [y_i log p_i + (1 - y_i) log(1 - p_i)].  Computed in float32 (bf16
    log-sigmoid of large logits overflows to inf). logits, target: (..., H, W) -> (...)."""
    logits, target = logits.float(), target.float()
    return -F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(-2).mean(-1)


def segmentation_loss(logits_list, masks, dice_weight=1.0, bce_weight=1.0):
    """Weighted Dice + BCE over a batch of masks of possibly different sizes.

    logits_list, masks: lists of (H_i, W_i). Returns dict(loss, dice, bce), each the batch mean."""
    dice = torch.stack([dice_loss(l, m) for l, m in zip(logits_list, masks)]).mean()
    bce = torch.stack([sigmoid_bce(l, m) for l, m in zip(logits_list, masks)]).mean()
    return dict(loss=dice_weight * dice + bce_weight * bce, dice=dice.detach(), bce=bce.detach())


def text_loss(logits, labels):
    """Cross-entropy of the answer tokens (keeps the LLM answering with [SEG])."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels)
