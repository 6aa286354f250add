"""Losses as pure functions of tensors (formulas in the docstrings).

Masks are compared at each sample's original size: the logits are resized exactly as the
released inference resizes them (`forward.full_size_logits`), so the loss looks at the
pixels the evaluation scores, thin vessels included.
"""
import math

import torch
import torch.nn.functional as F


def dice_loss(logits, target, smooth=1.0):
    """Soft Dice loss per mask: 1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s), p = sigmoid(logits).

    logits, target: (..., H, W). Returns (...): a scalar for one mask. An empty target with an
    empty prediction gives 0 (the smoothing term `s` = 1, as in LISA)."""
    p = logits.float().sigmoid().flatten(-2)
    t = target.float().flatten(-2)
    return 1.0 - (2.0 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)


def sigmoid_bce(logits, target, pos_weight=None):
    """Mean per-pixel binary cross-entropy per mask: -mean[w t log p + (1 - t) log(1 - p)],
    p = sigmoid(logits), w = pos_weight (a number; 1 when None). logits, target: (..., H, W) -> (...).

    pos_weight="balanced": w = background / vessel pixels of each mask (clamped to [1, 100]), so
    vessel and background weigh the same in total and the 0.5 threshold sits where the two kinds
    of error balance. Plain BCE (w = 1) calibrates p to the vessel prior (~10%): a model that
    ranks vessel pixels above background but cannot yet separate them predicts p < 0.5
    everywhere, an empty mask (measured: README, "Why SFT collapsed")."""
    logits, target = logits.float(), target.float()
    if pos_weight == "balanced":
        positives = target.flatten(-2).sum(-1)
        negatives = target.shape[-1] * target.shape[-2] - positives
        pos_weight = (negatives / positives.clamp(min=1)).clamp(1, 100)[..., None, None]
    elif pos_weight is not None:
        pos_weight = torch.tensor(float(pos_weight), device=logits.device)
    losses = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
    return losses.flatten(-2).mean(-1)


def mask_log_likelihood(logits, target):
    """Mean per-pixel log-likelihood of a binary mask under the model (MISSION.md, DPO):
    log p(y|x) = mean_i [y_i log p_i + (1 - y_i) log(1 - p_i)].  Computed in float32 (bf16
    log-sigmoid of large logits overflows to inf). logits, target: (..., H, W) -> (...)."""
    return -sigmoid_bce(logits, target)


def segmentation_loss(logits_list, masks, dice_weight=1.0, bce_weight=1.0, pos_weight=None):
    """Weighted Dice + BCE over a batch of masks of possibly different sizes (`pos_weight`:
    sigmoid_bce's). logits_list, masks: lists of (H_i, W_i). Returns dict(loss, dice_loss, bce),
    each the batch mean. The key is dice_loss, not dice: it is 1 - soft Dice (lower is better) and
    is logged as train/dice_loss next to val/mean_dice, the score."""
    if len({tuple(m.shape) for m in masks}) == 1:  # equal sizes: one batched call, the same terms
        logits, target = torch.stack(list(logits_list)), torch.stack(list(masks))
        dice, bce = dice_loss(logits, target).mean(), sigmoid_bce(logits, target, pos_weight).mean()
    else:
        dice = torch.stack([dice_loss(l, m) for l, m in zip(logits_list, masks)]).mean()
        bce = torch.stack([sigmoid_bce(l, m, pos_weight) for l, m in zip(logits_list, masks)]).mean()
    return dict(loss=dice_weight * dice + bce_weight * bce, dice_loss=dice.detach(), bce=bce.detach())


def text_loss(logits, labels):
    """Cross-entropy of the answer tokens (keeps the LLM answering with [SEG])."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, beta=0.1,
             label_smoothing=0.0, reference_free=False):
    """Direct Preference Optimization loss (Rafailov et al. 2023, arXiv 2305.18290), as TRL's
    `dpo_loss` ("sigmoid" loss, conservative label smoothing of Mitchell 2023).

    Inputs: (B,) log-likelihoods of the chosen (w) and rejected (l) masks under the policy and
    the reference (here `mask_log_likelihood`, a per-pixel mean). With
        h = (logp_w - ref_w) - (logp_l - ref_l)        (reference_free: h = logp_w - logp_l)
    the per-pair loss is
        -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h),   eps = label_smoothing
    (eps = 0: -log sigmoid(beta * h); eps is the assumed share of flipped preference labels).
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); the rewards are the
    detached implicit rewards beta * (logp - ref) (beta * logp when reference_free). At the
    start of a stage the policy is the reference, so h = 0 and every loss is log 2."""
    if not reference_free and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError("dpo_loss needs the reference log-likelihoods (or reference_free=True)")
    policy_chosen_logps, policy_rejected_logps = policy_chosen_logps.float(), policy_rejected_logps.float()
    if reference_free:
        ref_chosen_logps = ref_rejected_logps = torch.zeros_like(policy_chosen_logps)
    ref_chosen_logps, ref_rejected_logps = ref_chosen_logps.float(), ref_rejected_logps.float()
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


SATURATED = 0.99  # sigmoid(beta h) above this (or below 1 - this): the pair's DPO loss is saturated


def dpo_metrics(chosen_rewards, rejected_rewards):
    """The numbers to log beside the DPO loss, as batch means (floats):
    accuracy = share of pairs with chosen_reward > rejected_reward (a tie, as at step 0 with a
    reference, does not count; healthy 0.7-0.9), margin = mean(chosen - rejected reward),
    chosen_rewards, rejected_rewards = their means; and whether beta is in range, from
    z = chosen_reward - rejected_reward = beta * h (dpo_loss):
    saturated = share of pairs with sigmoid(z) > SATURATED or < 1 - SATURATED (|z| > 4.6: the pair
    gives almost no gradient, or a constant one), abs_margin = mean |z|. Both near 0 all the way
    through a run: beta * h stays ~0, the loss is linear in h and the reference never binds (beta
    too small for the per-pixel MEAN log-likelihood); most pairs saturated early: beta too large."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    z = chosen_rewards - rejected_rewards
    p = z.sigmoid()
    return dict(accuracy=float((chosen_rewards > rejected_rewards).float().mean()),
                margin=float(z.mean()),
                chosen_rewards=float(chosen_rewards.mean()), rejected_rewards=float(rejected_rewards.mean()),
                saturated=float(((p > SATURATED) | (p < 1 - SATURATED)).float().mean()),
                abs_margin=float(z.abs().mean()))


# ---------------------------------------------------------------- PPO on a per-pixel Bernoulli mask policy

def bernoulli_kl(logits_p, logits_q):
    """Exact KL(P || Q) of two per-pixel Bernoulli mask policies, mean over pixels (float32):
        KL = mean_i [ p_i (log p_i - log q_i) + (1 - p_i) (log(1 - p_i) - log(1 - q_i)) ],
    p = sigmoid(logits_p), q = sigmoid(logits_q), the logs taken as logsigmoid(+-logits) so saturated
    pixels stay finite. logits: (..., H, W), broadcastable -> (...). Identical logits give exactly 0."""
    lp, lq = logits_p.float(), logits_q.float()
    p = lp.sigmoid()
    kl = p * (F.logsigmoid(lp) - F.logsigmoid(lq)) + (1 - p) * (F.logsigmoid(-lp) - F.logsigmoid(-lq))
    return kl.flatten(-2).mean(-1)


def bernoulli_entropy(logits):
    """Mean per-pixel entropy of a Bernoulli mask policy (float32, nats):
        H = -mean_i [ p_i log p_i + (1 - p_i) log(1 - p_i) ],  p = sigmoid(logits).
    (..., H, W) -> (...); 0 for a saturated mask, log 2 where every p_i = 0.5."""
    x = logits.float()
    p = x.sigmoid()
    return -(p * F.logsigmoid(x) + (1 - p) * F.logsigmoid(-x)).flatten(-2).mean(-1)


def ppo_clip_loss(logp, logp_old, advantages, clip=0.2):
    """Clipped surrogate of PPO (Schulman et al. 2017, arXiv 1707.06347, eq. 7), as a loss to minimise:
        r = exp(logp - logp_old)
        loss = -mean[ min(r A, clip(r, 1 - eps, 1 + eps) A) ],   eps = clip
    logp: (N,) log-probs of the sampled actions under the policy being trained (with grad);
    logp_old: (N,) the same under the policy that sampled them (no grad); advantages: (N,).
    Returns dict(loss, plain_loss = -mean(r A), ratio (N,), clip_fraction = share of |r - 1| > eps),
    all but `loss` detached. At the first update of a rollout logp == logp_old, so r = 1 exactly and
    loss == plain_loss == -mean(A)."""
    logp, logp_old, advantages = logp.float(), logp_old.float().detach(), advantages.float().detach()
    ratio = torch.exp(logp - logp_old)
    plain = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    loss = -torch.minimum(plain, clipped).mean()
    return dict(loss=loss, plain_loss=-plain.mean().detach(), ratio=ratio.detach(),
                clip_fraction=((ratio.detach() - 1.0).abs() > clip).float().mean())


def group_advantages(rewards, eps=1e-6):
    """Group-baseline advantages (GRPO, Shao et al. 2024, arXiv 2402.03300) over the samples of each image:
        A_bg = (R_bg - mean_g R_bg) / (std_g R_bg + eps)      (population std over the G samples)
    rewards: (B, G), G >= 2 masks sampled for each of B images -> (B, G). A group whose samples all
    score the same gets A = 0 (nothing to learn from it)."""
    rewards = rewards.float()
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"group advantages need rewards of shape (images, samples >= 2), got {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(1, keepdim=True)
    return centred / (rewards.std(1, unbiased=False, keepdim=True) + eps)


def constant_groups(rewards):
    """(B,) bool: the images whose G sampled masks all got exactly the same reward (rewards (B, G)). Their
    group advantages are all 0. Tested by equality: a float variance of equal values need not be 0."""
    return (rewards == rewards[:, :1]).all(1)


def variance_selection(rewards, fraction):
    """Which images of a rollout to train on, by the spread of their group's rewards (the filter of
    DAPO's dynamic sampling, Yu et al. 2025, made a ranking): rewards (N, G) -> keep (N,) bool.
    Keeps the ceil(fraction * N) images of highest reward variance over their G samples, but never
    an image whose samples all score exactly the same: its group advantages are all 0, so it would
    only add KL / entropy terms and dilute the batch. Ties in variance: the earlier image first."""
    rewards = rewards.float()
    constant = constant_groups(rewards)
    variance = rewards.var(1, unbiased=False).masked_fill(constant, -1.0)
    order = sorted(range(len(variance)), key=lambda i: (-float(variance[i]), i))
    keep = torch.zeros(len(variance), dtype=torch.bool, device=rewards.device)
    keep[order[:math.ceil(fraction * len(variance))]] = True
    return keep & ~constant


def normalized_advantages(advantages, eps=1e-6):
    """Whole-rollout advantage normalisation (PPO's usual): (A - mean A) / (std A + eps), any shape."""
    advantages = advantages.float()
    return (advantages - advantages.mean()) / (advantages.std(unbiased=False) + eps)
