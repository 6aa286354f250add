"""RL alternative: PPO on vessel masks with segmentation rewards (Dice, recall, topology, length).

The policy is the model's own per-pixel Bernoulli distribution over the mask, at the SAM2 mask
decoder's low resolution (image_size / 4: 256 x 256 for the released 1024 px SAM2, 64 x 64 for
the tiny model): p_i = sigmoid(logit_i / --temperature). An action is a binary low-res mask
a ~ Bernoulli(p), sampled --group_size times per image; its log-probability is the mean per-pixel
log-likelihood log pi(a|x) = mean_i [a_i log p_i + (1 - a_i) log(1 - p_i)] (float32,
`losses.mask_log_likelihood`; a mean, not a sum over 65k pixels, keeps the ratios of PPO finite).
Its reward (`--reward_type`, common/rewards.py) is scored at the ground truth's size: the 0/1 action
is resized exactly as inference resizes logits (bilinear to the SAM2 size, bilinear to the frame)
and thresholded at 0.5. The temperature only shapes exploration: validation scores the greedy mask
(sigmoid(logits) > --threshold) with common/evaluation, as every other stage.

Each rollout (nanochat chat_rl style): --rollout_batches batches of --batch_size images are sampled
under no_grad with the current policy; then --ppo_epochs passes over them (one minibatch = one
batch, shuffled) recompute the log-probabilities with grad and minimise
    clipped surrogate (--clip) + kl_coef * KL(pi || pi_ref) - entropy_coef * H(pi) [+ vf_coef * (V - R)^2]
The reference pi_ref is the policy at the start of the stage: a frozen copy of the trained weights,
loaded into the model under no_grad for its logits; the KL is the exact per-pixel Bernoulli KL.
Dropout stays off all the time (model.eval()): rollout and update must be the same policy, so the
ratio is exactly 1 at the first update of a rollout. Because the log-probability is a per-pixel
mean, the mask-level ratio exp(mean_i log r_i) (GSPO's length-normalised ratio) moves only a few
percent over --ppo_epochs, so --clip 0.2 seldom binds and the KL penalty is the working trust
region: with --kl_coef 0 the multi_objective reward was gamed on synthetic data (the policy drifted
to "everything is vessel": recall 1.0, Dice 0.14).

Advantages (`--advantage`):
  group  (default) A = (R - mean of the image's group) / group std. No extra parameters; needs
         --group_size >= 2 and G reward evaluations per image (topology/length rewards skeletonise
         every sample on the CPU).
  critic A = R - V(image), normalised over the rollout. V is a small value head (LayerNorm +
         2-layer MLP, 2C -> C -> 1; C = 256 for SAM2: 0.13M parameters) on the detached [SEG]
         embedding and mean-pooled SAM2 image features; loss --vf_coef * MSE, its own --critic_lr.
         Memory: the head, its gradients and Adam state, a few MB, and no extra activations,
         because it reads features the policy computes anyway. (The "~48 GB, PPO needs a critic"
         of the original notes is a critic that is a second copy of the model; this is not.)
         Works with --group_size 1. Needs data enough for the head to predict an image's reward;
         on the small synthetic set it did worse than the group baseline.
GRPO-recipe options (Sa2VA's video-reasoning GRPO: group 4, temperature 1.2), off until measured:
--sft_coef C adds C * (Dice + BCE) of the greedy logits toward each group's best-reward SAMPLED mask
(not the ground truth: the best sample is a target the policy already reaches); --select_by_variance F
trains on the ceil(F * N) images of a rollout whose group rewards vary most, never on one whose
samples all scored the same (zero advantage); dropped images are forwarded but give no gradient, so
ranks step together. Validation reports Dice, recall, precision and clDice of the greedy mask.
By default the LLM (and a LoRA loaded by --init) is frozen and only text_hidden_fcs + the mask
decoder train, so with the FeatureCache a rollout and an update cost only these heads.

    deepspeed train_ppo.py --model /path/to/Sa2VA-4B --init runs/sft_x/best --data /path/to/vessels --bf16
    python train_ppo.py --data synthetic_data --init outputs/sft_x/best --lr 5e-4     # CPU, tiny model

Writes <output>/ppo_<timestamp>/: best/ (by mean validation Dice, --best_by) and final/ (stage checkpoints;
the critic is not part of them), training_info.json, train.log, metrics.jsonl, tensorboard/,
checkpoints/ (for --resume).
"""
import contextlib
import math
import time

import numpy as np
import torch
import torch.nn as nn

from common import cli
from common.data import EvalSampler, ShardedSampler, VesselDataset, describe_split, splits_from_args
from common.engine import (all_gather_objects, all_reduce_sum, build_engine, engine_step, finite_or_zero, finish_run,
                           keep_if_best, load_trainer_state, log_train_window, mean_over_ranks, save_trainer_state,
                           stage_saver, start_run, use_deepspeed)
from common.evaluation import collapse_warning, score_loader, summarize
from common.forward import FeatureCache, forward_batch, full_size_logits, move_batch, upsample_logits
from common.lora import base_fingerprint
from common.losses import (bernoulli_entropy, bernoulli_kl, constant_groups, group_advantages, mask_log_likelihood,
                           normalized_advantages, ppo_clip_loss, segmentation_loss, variance_selection)
from common.rewards import REWARDS, cldice, make_reward

STAGE = "ppo"
CRITIC = "ppo_value_head"  # the critic's attribute on the model (kept out of stage checkpoints)


def parse_args(argv=None):
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_model_args(p)
    cli.add_data_args(p)
    cli.add_train_args(p, lr=1e-5, epochs=3, batch_size=4, grad_accum=1, weight_decay=0.0,
                       trainable="text_hidden_fcs,mask_decoder")
    cli.add_lora_args(p, preset="none")
    g = p.add_argument_group("PPO")
    g.add_argument("--group_size", type=int, default=8, help="masks sampled per image in a rollout")
    g.add_argument("--rollout_batches", type=int, default=2,
                   help="batches of --batch_size images per rollout (= minibatches per PPO epoch)")
    g.add_argument("--ppo_epochs", type=int, default=4, help="passes over each rollout")
    g.add_argument("--clip", type=float, default=0.2, help="PPO clip range eps of the probability ratio")
    g.add_argument("--best_by", choices=("dice", "reward"), default="dice",
                   help="validation measure that picks best/ (the start included): mean Dice, which the stage table "
                        "compares, or mean reward, which PPO maximises (they disagree when recall is bought with "
                        "precision)")
    g.add_argument("--kl_coef", type=float, default=0.02,
                   help="weight of KL(policy || stage-start policy), mean per pixel (0 lets the reward be gamed)")
    g.add_argument("--entropy_coef", type=float, default=0.0, help="weight of the per-pixel entropy bonus")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature: p = sigmoid(logits / T)")
    g.add_argument("--advantage", choices=("group", "critic"), default="group",
                   help="group: reward minus the image's group mean, / group std; critic: reward minus a value head")
    g.add_argument("--vf_coef", type=float, default=0.5, help="weight of the critic's value loss")
    g.add_argument("--critic_lr", type=float, default=1e-3, help="learning rate of the (freshly initialised) critic")
    g.add_argument("--sft_coef", type=float, default=0.0,
                   help="weight of a supervised Dice + BCE term on the greedy logits against the group's best-reward "
                        "SAMPLED mask (not the ground truth); 0 = off")
    g.add_argument("--select_by_variance", type=float, default=0.0,
                   help="train only on this share of each rollout's images, those with the highest group reward "
                        "variance; images whose samples all score the same are dropped whenever it is > 0 (1 = drop "
                        "only those); 0 = off. Needs --group_size >= 2")
    r = p.add_argument_group("reward")
    r.add_argument("--reward_type", choices=tuple(REWARDS), default="multi_objective",
                   help="multi_objective: 0.5 dice + 0.2 recall bonus + 0.2 topology + 0.1 length; simple_dice; "
                        "recall_focused: 0.7 recall + 0.3 dice")
    for name in ("dice", "recall", "topology", "length"):
        r.add_argument(f"--{name}_weight", type=float, default=None,
                       help=f"{name} weight of the reward; None = the reward type's own")
    r.add_argument("--recall_target", type=float, default=None,
                   help="recall at which multi_objective's recall bonus saturates; None = the reward's own, 0.85")
    r.add_argument("--dynamic_recall", action="store_true",
                   help="multi_objective: recall weight 0.4 while the running recall of the rollouts is < 0.80")
    return cli.parse(p, argv)


def build_reward(args):
    weights = dict(dice_weight=args.dice_weight, recall_weight=args.recall_weight, topology_weight=args.topology_weight,
                   length_weight=args.length_weight, recall_target=args.recall_target,
                   dynamic_recall=True if args.dynamic_recall else None)
    try:
        return make_reward(args.reward_type, **weights)
    except TypeError:
        given = ", ".join(f"--{k}" for k, v in weights.items() if v is not None)
        raise SystemExit(f"--reward_type {args.reward_type} does not take all of: {given}") from None


def check_args(args, deepspeed_on):
    if args.advantage == "group" and args.group_size < 2:
        raise SystemExit("--advantage group needs --group_size >= 2 (or use --advantage critic)")
    if args.select_by_variance > 0 and args.group_size < 2:
        raise SystemExit("--select_by_variance needs --group_size >= 2 (a reward variance per image)")
    if deepspeed_on and args.zero_stage == 3:
        raise SystemExit("train_ppo.py swaps the reference weights into whole parameters: use --zero_stage 0-2")


class ValueHead(nn.Module):
    """V(image) from the detached [SEG] embedding (B, C) and SAM2 image features (B, C, h, w), mean-pooled."""

    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, 1))

    def forward(self, seg_embeds, image_features):
        x = torch.cat([seg_embeds.detach(), image_features.detach().mean((-2, -1))], -1)
        return self.net(x.to(self.net[1].weight.dtype))[:, 0].float()


@contextlib.contextmanager
def reference_weights(params, reference):
    """Temporarily put the reference weights into the trained parameters (restored bit for bit after)."""
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for p, r in zip(params, reference):
            p.copy_(r)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


@torch.no_grad()
def collect_rollout(model, batch, cache, reward_fn, args, policy_params, reference, autocast, generator=None):
    """Sample --group_size masks per image from the current policy and score them.

    Returns dict(batch, actions (B, G, h, w) bool, logp_old (B, G), ref_logits (B, 1, h, w) at the
    temperature, rewards (B, G), values (B,) or None, terms: reward terms as (B*G,) numpy arrays,
    best_masks: with --sft_coef, per image the (H, W) bool mask of its best-reward sample, else None)."""
    masks = batch["masks"]
    with autocast():
        out = forward_batch(model, batch, cache)
        with reference_weights(policy_params, reference):
            ref_logits = forward_batch(model, batch, cache)["low_res_logits"]
    logits = out["low_res_logits"] / args.temperature
    b, _, h, w = logits.shape
    probs = logits.sigmoid().expand(b, args.group_size, h, w)
    actions = torch.bernoulli(probs, generator=generator)
    logp_old = mask_log_likelihood(logits.expand_as(actions), actions)
    sam_size = model.grounding_encoder.sam2_model.image_size
    terms, best_masks = [], [] if args.sft_coef > 0 else None
    for i, gt in enumerate(masks):
        # the 0/1 action resized as inference resizes logits, > 0.5: what a user would get from it
        pred = upsample_logits(actions[i][:, None], gt.shape, sam_size) > 0.5
        terms.append(reward_fn(pred.cpu(), gt.cpu().bool().expand(args.group_size, *gt.shape)))
        if best_masks is not None:
            best_masks.append(pred[int(np.argmax(terms[-1]["reward"]))].cpu())  # argmax: the first on ties
    terms = {k: np.concatenate([t[k] for t in terms]) for k in terms[0]}
    values = getattr(model, CRITIC)(out["seg_embeds"], out["image_features"]) if args.advantage == "critic" else None
    rewards = torch.tensor(terms["reward"], dtype=torch.float32, device=logits.device).view(b, args.group_size)
    return dict(batch=batch, actions=actions.bool(), logp_old=logp_old, ref_logits=ref_logits / args.temperature,
                rewards=rewards, values=values, terms=terms, best_masks=best_masks)


def set_advantages(rollout, args):
    """Group baseline per batch, or reward minus the critic's value normalised over the whole rollout."""
    if args.advantage == "group":
        for ro in rollout:
            ro["advantages"] = group_advantages(ro["rewards"])
        return
    raw = torch.cat([(ro["rewards"] - ro["values"][:, None]).flatten() for ro in rollout])
    adv = normalized_advantages(raw).split([ro["rewards"].numel() for ro in rollout])
    for ro, a in zip(rollout, adv):
        ro["advantages"] = a.view_as(ro["rewards"])


def select_images(rollout, args):
    """--select_by_variance: ro["keep"] (B,) bool per batch, chosen over the whole rollout's images."""
    keep = variance_selection(torch.cat([ro["rewards"] for ro in rollout]), args.select_by_variance)
    for ro, k in zip(rollout, keep.split([len(ro["rewards"]) for ro in rollout])):
        ro["keep"] = k


def ppo_loss(model, ro, cache, args, autocast):
    """The PPO loss of one minibatch, recomputing the policy with grad; returns (loss, stats of floats).
    With ro["keep"] (--select_by_variance) only the kept images' samples enter the policy terms; a
    minibatch with none left gives a zero loss that still reaches backward (ranks step in lockstep)."""
    with autocast():
        out = forward_batch(model, ro["batch"], cache)
    logits = out["low_res_logits"] / args.temperature
    actions, logp_old, advantages = ro["actions"].float(), ro["logp_old"], ro["advantages"]
    ref_logits = ro["ref_logits"]
    full, targets = None, ro["best_masks"]
    if args.sft_coef > 0:
        full = full_size_logits(model, out["low_res_logits"], ro["batch"]["image_sizes"])
    keep = ro.get("keep")
    if keep is not None:
        logits, actions, logp_old, advantages, ref_logits = (x[keep] for x in (logits, actions, logp_old, advantages,
                                                                                ref_logits))
        if full is not None:
            full, targets = ([x for x, k in zip(xs, keep.tolist()) if k] for xs in (full, targets))
    if len(logits):
        logp = mask_log_likelihood(logits.expand_as(actions), actions)
        pg = ppo_clip_loss(logp.flatten(), logp_old.flatten(), advantages.flatten(), args.clip)
        kl = bernoulli_kl(logits, ref_logits).mean()
        entropy = bernoulli_entropy(logits).mean()
        loss = pg["loss"] + args.kl_coef * kl - args.entropy_coef * entropy
        stats = dict(pg_loss=pg["loss"].item(), kl=kl.item(), entropy=entropy.item(),
                     clip_fraction=float(pg["clip_fraction"]), ratio=float(pg["ratio"].mean()))
        if full is not None:
            # the greedy logits (not tempered) toward the best sample, as SFT trains toward a mask
            sft = segmentation_loss(full, [t.to(full[0].device).float() for t in targets])
            loss = loss + args.sft_coef * sft["loss"]
            stats.update(sft_loss=sft["loss"].item(), sft_dice_loss=float(sft["dice_loss"]), sft_bce=float(sft["bce"]))
    else:
        loss, stats = out["low_res_logits"].sum() * 0.0, {}
    if args.advantage == "critic":
        values = getattr(model, CRITIC)(out["seg_embeds"], out["image_features"])
        value_loss = ((values[:, None] - ro["rewards"]) ** 2).mean()
        loss = loss + args.vf_coef * value_loss
        stats["value_loss"] = value_loss.item()
    stats["loss"] = loss.item()
    return loss, stats


def rollout_summary(rollout, args):
    """Mean reward terms of a rollout's sampled masks (terms skipped by the reward, NaN, left out); the share of
    images whose samples all scored the same (zero_variance) and, with --select_by_variance, the share kept."""
    keys = ("reward", "dice", "recall", "precision", "cldice", "topology", "length")
    values = {k: np.concatenate([ro["terms"][k] for ro in rollout]) for k in keys}
    out = {k: float(v.mean()) for k, v in values.items() if np.isfinite(v).all()}
    if args.group_size > 1:
        out["zero_variance"] = float(constant_groups(torch.cat([ro["rewards"] for ro in rollout])).float().mean())
    if "keep" in rollout[0]:
        out["kept"] = float(torch.cat([ro["keep"] for ro in rollout]).float().mean())
    return out


def sample_rollout(model, batches, cache, reward_fn, args, policy_params, reference, autocast, rng, device):
    """(rollout: up to --rollout_batches batches of `batches` sampled and scored, with their advantages
    (and --select_by_variance's choice), its summary); ([], None) when `batches` is spent. Updates the
    reward's running recall from every rank's rollout."""
    rollout = [collect_rollout(model, move_batch(b, device), cache, reward_fn, args, policy_params, reference,
                               autocast, rng) for _, b in zip(range(args.rollout_batches), batches)]
    if not rollout:
        return [], None
    set_advantages(rollout, args)
    if args.select_by_variance > 0:
        select_images(rollout, args)
    summary = rollout_summary(rollout, args)
    # every rank must use the same reward weights: the dynamic switch reads the recall of all ranks
    n_masks = sum(ro["rewards"].numel() for ro in rollout)
    recall_sum = all_reduce_sum(torch.tensor([summary["recall"] * n_masks, n_masks], dtype=torch.float64))
    reward_fn.update_running_recall(float(recall_sum[0] / recall_sum[1]))
    return rollout, summary


def val_line(name, val):
    return (f"{name}: reward {val['mean_reward']:.4f} dice {val['mean_dice']:.4f} recall {val['mean_recall']:.4f} "
            f"precision {val['mean_precision']:.4f} cldice {val['mean_cldice']:.4f} {collapse_warning(val)}")


def validate_with_reward(model, loader, val_masks, device, args, cache, autocast, reward_fn):
    """validate()'s metrics of the greedy mask at --threshold, plus its mean reward (base weights) and clDice."""
    records, probs = score_loader(model, loader, device, (args.threshold,), cache, autocast, "validating",
                                  keep_probs=True)
    val = summarize(records, (args.threshold,))[float(args.threshold)]
    # running_recall=1 disables the dynamic recall switch, so val rewards of all epochs compare
    local = [(float(reward_fn(p[None] > args.threshold, val_masks[k][None], running_recall=1.0)["reward"][0]),
              cldice(p > args.threshold, val_masks[k])) for k, p in probs.items()]
    scores = [r for part in all_gather_objects(local) for r in part]
    for i, name in enumerate(("mean_reward", "mean_cldice")):
        val[name] = float(np.mean([r[i] for r in scores])) if scores else float("nan")
    return val


def optimizer_groups(model, args, log):
    """The optimizer's parameter groups: what trains, and with --advantage critic a new value head, put on the
    model as CRITIC, at its own --critic_lr without weight decay."""
    groups = [dict(params=[p for p in model.parameters() if p.requires_grad])]
    if args.advantage == "critic":
        setattr(model, CRITIC, ValueHead(model.grounding_encoder.hidden_dim))
        critic_params = list(getattr(model, CRITIC).parameters())
        groups.append(dict(params=critic_params, lr=args.critic_lr, weight_decay=0.0))
        log(f"critic: value head with {sum(p.numel() for p in critic_params):,} parameters, lr {args.critic_lr}")
    return groups


def data_loaders(args, train_frames, val_frames, processor, rank, world_size, device, log):
    """(train sampler, train loader, val loader, val masks by key of this rank's val frames, optimizer steps of
    the run); logs the data line."""
    train_set = VesselDataset(train_frames, args.resize_masks)
    val_set = VesselDataset(val_frames, args.resize_masks)
    sampler = ShardedSampler(len(train_set), rank, world_size, shuffle=True, seed=args.seed)
    val_sampler = EvalSampler(len(val_set), rank, world_size)
    loader_kw = dict(collate_fn=processor, num_workers=args.num_workers, pin_memory=device.type == "cuda")
    train_loader = torch.utils.data.DataLoader(train_set, args.batch_size, sampler=sampler, **loader_kw)
    val_loader = torch.utils.data.DataLoader(val_set, args.batch_size, sampler=val_sampler, **loader_kw)
    val_masks = {val_set.frames[i].key: torch.from_numpy(val_set[i]["mask"]) for i in val_sampler}
    batches_per_epoch = math.ceil(sampler.per_rank / args.batch_size)
    steps_per_epoch = max(1, batches_per_epoch * args.ppo_epochs // args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    log(f"data: train {describe_split(train_frames)}, val {describe_split(val_frames)}; rollouts of "
        f"{args.rollout_batches} x {args.batch_size} images x {args.group_size} masks x {world_size} procs, {args.ppo_epochs} PPO "
        f"epochs each; {total_steps} optimizer steps")
    return sampler, train_loader, val_loader, val_masks, total_steps


def resume_state(engine, args, reward_fn, rng, log):
    """The loop's state: a fresh one, or --resume's, whose rollout sampler `rng` and dynamic recall weight go on."""
    state = load_trainer_state(engine, args.resume, dict(epoch=0, step=0, micro_in_epoch=0, best_score=-math.inf,
                                                         best_epoch=None, history=[], bad_steps=0, running_recall=None,
                                                         epoch_rollouts=[], rng=None), log)
    if state["rng"] is not None:
        reward_fn.running_recall = state["running_recall"]
        rng.set_state(state["rng"])
    return state


def policy_and_reference(model, args, rank, device):
    """(the policy's parameters, every trained parameter (the critic's too), the reference: a frozen copy of the
    policy's, the generator of actions and minibatch order). Call before a resume point is loaded: the reference is
    the policy at the start of the stage."""
    policy_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(CRITIC)]
    all_params = [p for p in model.parameters() if p.requires_grad]
    reference = [p.detach().clone() for p in policy_params]
    # its own generator, saved with a resume point: other consumers of the global RNG (a DataLoader draws a
    # seed per iterator) cannot shift a resumed run's samples
    return policy_params, all_params, reference, torch.Generator(device).manual_seed(args.seed * 1000 + rank)


def rollout_record(summary, updates):
    """A rollout's record: its summary plus the mean of each update statistic over its minibatches."""
    # a minibatch whose images were all dropped (--select_by_variance) has no policy terms
    return summary | {k: float(np.mean([u[k] for u in updates if k in u])) for k in
                      dict.fromkeys(k for u in updates for k in u)}


def record_epoch(state, logger, epoch, val):
    """The epoch's history entry (its validation, the mean of the run's rollouts over all ranks), record and line."""
    train = mean_over_ranks(state["epoch_rollouts"])  # the run's rollouts, not rank 0's
    state["history"].append(dict(epoch=epoch + 1, step=state["step"], **val, train=train))
    logger.record(state["step"], {f"val/{k.removeprefix('mean_')}": v for k, v in val.items()})
    logger.line(val_line(f"epoch {epoch + 1} val", val) + f" | train reward {train.get('reward', math.nan):.4f}")


def main(args):
    # ---- setup
    check_args(args, use_deepspeed(args))
    reward_fn = build_reward(args)
    deepspeed_on, rank, world_size, device, run_dir, logger = start_run(args, STAGE)
    model, processor, parts = cli.setup_model(args, log=logger.line)
    fingerprint = base_fingerprint(model)
    param_groups = optimizer_groups(model, args, logger.line)
    logger.line(f"reward: {args.reward_type}, weights {reward_fn.base_weights}, recall target "
                f"{reward_fn.recall_target}, dynamic recall {reward_fn.dynamic_recall}")
    train_frames, val_frames = splits_from_args(args)
    sampler, train_loader, val_loader, val_masks, total_steps = data_loaders(
        args, train_frames, val_frames, processor, rank, world_size, device, logger.line)
    engine = build_engine(model, param_groups, args, total_steps, device, deepspeed_on, world_size)
    model = engine.module
    model.eval()  # dropout off for good: the rollout and the update must be the same policy
    cache = FeatureCache(device, args.feature_cache_gb)
    policy_params, all_params, reference, rng = policy_and_reference(model, args, rank, device)
    save = stage_saver(args, STAGE, engine, run_dir, parts, fingerprint)  # best/ and final/

    # ---- resume, or validate the starting model (epoch 0: best/ starts as it)
    state = resume_state(engine, args, reward_fn, rng, logger.line)

    def checkpoint():
        state["running_recall"], state["rng"] = reward_fn.running_recall, rng.get_state()
        save_trainer_state(engine, run_dir, state)

    if state["step"] == 0 and state["micro_in_epoch"] == 0 and not state["history"]:
        start = state["initial_val"] = validate_with_reward(model, val_loader, val_masks, device, args, cache,
                                                            engine.autocast, reward_fn)
        logger.line(val_line("initial val", start))
        keep_if_best(state, start[f"mean_{args.best_by}"], save, start, "best_score", epoch=0)

    # ---- training loop: rollout (no grad) -> PPO epochs over its minibatches (grad)
    t_start = time.time()
    while state["epoch"] < args.epochs:
        epoch = state["epoch"]
        sampler.set_epoch(epoch, start=state["micro_in_epoch"] * args.batch_size)
        batches = iter(train_loader)
        window, t_window, steps_in_window, images_in_window, last_logged = [], time.time(), 0, 0, state["step"]
        while True:
            step_before = state["step"]
            rollout, summary = sample_rollout(model, batches, cache, reward_fn, args, policy_params, reference,
                                              engine.autocast, rng, device)
            if not rollout:
                break
            images_in_window += sum(len(ro["rewards"]) for ro in rollout) * world_size
            updates = []
            for _ in range(args.ppo_epochs):
                for i in torch.randperm(len(rollout), generator=rng, device=device).tolist():
                    loss, stats = ppo_loss(model, rollout[i], cache, args, engine.autocast)
                    engine.backward(finite_or_zero(loss, all_params, state, args.max_bad_steps, logger.line))
                    if engine_step(engine):
                        state["step"] += 1
                        steps_in_window += 1
                    updates.append(stats)
            state["micro_in_epoch"] += len(rollout)
            record = rollout_record(summary, updates)
            window.append(record)
            state["epoch_rollouts"].append(record)
            if state["step"] - last_logged >= args.log_every:
                log_train_window(logger, state["step"], f"epoch {epoch + 1}/{args.epochs} step "
                                 f"{state['step']}/{total_steps}", window, time.time() - t_window, steps_in_window,
                                 images_in_window, engine.get_lr()[0])
                window, t_window, steps_in_window, images_in_window, last_logged = [], time.time(), 0, 0, state["step"]
            if args.save_every and state["step"] // args.save_every > step_before // args.save_every:
                checkpoint()

        # ---- end of epoch: validation, best/, resume point
        val = validate_with_reward(model, val_loader, val_masks, device, args, cache, engine.autocast, reward_fn)
        record_epoch(state, logger, epoch, val)
        keep_if_best(state, val[f"mean_{args.best_by}"], save, val, "best_score", epoch=epoch + 1)
        state["epoch"], state["micro_in_epoch"], state["epoch_rollouts"] = epoch + 1, 0, []
        checkpoint()

    # ---- final save and summary
    save("final", state["history"][-1] if state["history"] else {}, epoch=args.epochs)
    return finish_run(run_dir, logger, t_start, dict(
        stage=STAGE, args=vars(args), reward=dict(type=args.reward_type, weights=reward_fn.base_weights,
                                                  recall_target=reward_fn.recall_target),
        initial_val=state.get("initial_val"), history=state["history"], best_epoch=state["best_epoch"],
        best_by=args.best_by, best_val_score=state["best_score"], bad_steps=state["bad_steps"]),
        f"done: best val {args.best_by} {state['best_score']:.4f} (epoch {state['best_epoch']}); outputs in {run_dir}")


if __name__ == "__main__":
    cli.run_main(main, parse_args)
