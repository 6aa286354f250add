"""Stage 2: DPO on mask preference pairs, against an exact reference policy.

For each pair (image, chosen mask w, rejected mask l) of make_dpo_pairs.py, the policy's mask
log-likelihood log p(y|x) = mean_i [y_i log p_i + (1 - y_i) log(1 - p_i)] (float32, full-size
logits of the differentiable forward path) gives
    loss = -log sigmoid(beta * ((logp_w - ref_w) - (logp_l - ref_l)))     (common/losses.dpo_loss)
By default only text_hidden_fcs and the SAM2 mask decoder train; the LLM and its LoRA (from
--init) stay frozen, so each pair's [SEG] state and SAM2 features are computed once and cached
(FeatureCache) and a step runs only the heads.

The reference is the policy at the start of the stage. Its log-likelihoods are computed once
per pair before the first step (no grad, dropout off, the engine's own precision) and stored
in reference_logps.json: exact (the policy at step 0 is the reference: loss = log 2, margin 0),
whatever --trainable is (a frozen copy of the heads would be wrong once LoRA trains), and
cheaper than a frozen copy: one head pass per pair in all instead of one per pair per epoch,
no second set of weights in memory, and --resume reuses the stored values instead of taking
the resumed weights as reference. --reference_free drops the reference terms.

Is beta in range? The log-likelihood is a per-pixel MEAN, so h is small (README, DPO: choosing
beta). Every log line and training_info.json ("beta_check") give the share of pairs whose
sigmoid(beta * h) is saturated (> 0.99 or < 0.01) and the mean |beta * h|; the last line of the
run says which way beta is off, if it is.

Held-out pairs (--val_pairs, or the pairs of --val_pair_fraction of the pairs' videos; pairs
of the data's validation videos are never trained on) give preference accuracy and margin;
the data's validation split gives Dice/recall/precision, the early-stopping metric.

    deepspeed train_dpo.py --model /path/to/Sa2VA-4B --init runs/sft_x/best --data /path/to/vessels \
        --pairs pairs/dpo_annotations.json --bf16
    python train_dpo.py --data synthetic_data --init runs/sft_x/best --pairs pairs --lr 1e-3   # CPU, tiny model

Writes <output>/dpo_<timestamp>/: best/ and final/ (stage checkpoints; best/ may be the start
when DPO never beat it), reference_logps.json, training_info.json, train.log, metrics.jsonl,
tensorboard/, checkpoints/ (for --resume).
"""
import json
import math
import os
import random
import time

import torch

from common import cli
from common.data import EvalSampler, ShardedSampler, VesselDataset, describe_split, splits_from_args
from common.engine import (all_gather_objects, build_engine, engine_step, finite_or_zero, finish_run, is_main,
                           keep_if_best, load_trainer_state, log_train_window, save_trainer_state, stage_saver,
                           start_run)
from common.evaluation import collapse_warning, validate
from common.files import write_json
from common.forward import FeatureCache, forward_batch, full_size_logits, move_batch
from common.lora import base_fingerprint
from common.losses import dpo_loss, dpo_metrics, mask_log_likelihood
from common.pairs import PairDataset, disputed_share, load_pairs

STAGE = "dpo"
REFERENCE_FILE = "reference_logps.json"
# The end-of-run beta check, from the last log window: mean |beta * h| below BETA_SMALL means the
# loss never left its linear region (beta too small to let the reference bind); a saturated share
# above BETA_LARGE means most pairs stopped giving a useful gradient (beta too large)
BETA_SMALL, BETA_LARGE = 0.1, 0.5


def parse_args(argv=None):
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_model_args(p)
    cli.add_data_args(p)
    cli.add_train_args(p, lr=5e-6, epochs=1, batch_size=4, grad_accum=4, weight_decay=0.0,
                       trainable="text_hidden_fcs,mask_decoder")
    g = p.add_argument_group("DPO")
    g.add_argument("--pairs", required=True, help="dpo_annotations.json of make_dpo_pairs.py (or its folder)")
    g.add_argument("--val_pairs", default=None, help="held-out pairs file; default: the pairs of --val_pair_fraction "
                                                     "of the --pairs videos")
    g.add_argument("--val_pair_fraction", type=float, default=0.2, help="share of the pairs' VIDEOS held out")
    g.add_argument("--min_iou_gap", type=float, default=None, help="refuse pair files with a smaller gap (their "
                                                                   "score_gap when ranked by --rank_by other than "
                                                                   "iou; default: accept what the file holds)")
    g.add_argument("--beta", type=float, default=0.1, help="DPO temperature (0.05 if unstable, 0.2 if slow)")
    g.add_argument("--label_smoothing", type=float, default=0.0, help="assumed share of flipped preferences (cDPO)")
    g.add_argument("--reference_free", action="store_true", help="no reference terms: -log sigmoid(beta (logp_w - logp_l))")
    g.add_argument("--eval_every", type=int, default=0, help="optimizer steps between validations (0 = each epoch)")
    g.add_argument("--patience", type=int, default=2, help="stop after this many validations without a better val "
                                                           "Dice (0 = never stop early)")
    return cli.parse(p, argv)


def disable_dropout(model):
    """Dropout p = 0 everywhere (as TRL's DPO does): the policy and the reference are then one
    deterministic function, and cached [SEG] states are not one random draw of LoRA dropout."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def pair_logps(model, batch, cache, autocast):
    """(chosen, rejected) mask log-likelihoods (B,) of a batch of pairs under the model."""
    with autocast():
        out = forward_batch(model, batch, cache)
    logits = full_size_logits(model, out["low_res_logits"], batch["image_sizes"])
    chosen = torch.stack([mask_log_likelihood(l, m) for l, m in zip(logits, batch["chosen_mask"])])
    rejected = torch.stack([mask_log_likelihood(l, m) for l, m in zip(logits, batch["rejected_mask"])])
    return chosen, rejected


@torch.no_grad()
def score_pairs(model, loader, device, cache, autocast):
    """(N, 2) [chosen, rejected] log-likelihoods of every pair of the loader's dataset, all ranks."""
    out = {}
    for batch in loader:
        batch = move_batch(batch, device)
        chosen, rejected = pair_logps(model, batch, cache, autocast)
        out.update(zip(batch["index"].tolist(), zip(chosen.tolist(), rejected.tolist())))
    out = {k: v for part in all_gather_objects(out) for k, v in part.items()}
    return torch.tensor([out[i] for i in range(len(loader.dataset))], dtype=torch.float32).reshape(-1, 2)


def pair_metrics(logps, ref, args):
    """DPO loss and metrics of a table of pairs; logp_accuracy needs no reference (policy prefers w)."""
    losses, chosen_r, rejected_r = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], args.beta,
                                            args.label_smoothing, args.reference_free)
    return dict(dpo_loss=float(losses.mean()), **dpo_metrics(chosen_r, rejected_r),
                logp_accuracy=float((logps[:, 0] > logps[:, 1]).float().mean()))


def beta_check_line(check, beta):
    """One log line on whether beta is in range, from the last log window's saturation numbers."""
    if not check:
        return "beta check: no log window"
    last = check[-1]
    verdict = ("too small? beta * h stayed near 0: the loss is linear in h and the reference never binds; raise beta "
               "(README, DPO)" if last["abs_margin"] < BETA_SMALL else
               "too large? most pairs are saturated; lower beta" if last["saturated"] > BETA_LARGE else "in range")
    return (f"beta check (step {last['step']}): mean |beta * margin| {last['abs_margin']:.4f}, saturated pairs "
            f"{last['saturated']:.3f}: beta {beta:g} {verdict}")


def split_pairs(args, entries, val_frames):
    """(train pairs, held-out pairs). Pairs of the data's validation videos are held out always."""
    val_videos = {f.video for f in val_frames}
    if args.val_pairs:
        held = load_pairs(args.val_pairs, args.min_iou_gap, args.video_regex)
        return [e for e in entries if e["video"] not in val_videos], held + [e for e in entries if e["video"] in val_videos]
    videos = sorted({e["video"] for e in entries} - val_videos)
    random.Random(args.seed).shuffle(videos)
    n_held = max(1, round(args.val_pair_fraction * len(videos))) if len(videos) > 1 and args.val_pair_fraction > 0 else 0
    held_videos = set(videos[:n_held]) | val_videos
    return [e for e in entries if e["video"] not in held_videos], [e for e in entries if e["video"] in held_videos]


def pair_loaders(args, val_frames, processor, rank, world_size, device, log):
    """(train sampler, train loader, eval loaders {train, held, val}, optimizer steps of the run); logs the
    pairs' line and how far the policy may move before the loss saturates."""
    train_pairs, held_pairs = split_pairs(args, load_pairs(args.pairs, args.min_iou_gap, args.video_regex), val_frames)
    train_pairs = train_pairs[:args.max_train_samples or None]
    held_pairs = held_pairs[:args.max_val_samples or None]  # --max_val_samples caps both validation sets
    if not train_pairs:
        raise SystemExit(f"{args.pairs}: no training pair left after holding out validation videos")
    train_set, held_set, val_set = PairDataset(train_pairs), PairDataset(held_pairs), VesselDataset(val_frames,
                                                                                                    args.resize_masks)
    sampler = ShardedSampler(len(train_set), rank, world_size, shuffle=True, seed=args.seed)
    loader_kw = dict(collate_fn=processor, num_workers=args.num_workers, pin_memory=device.type == "cuda")

    def eval_loader(dataset):
        return torch.utils.data.DataLoader(dataset, args.batch_size, sampler=EvalSampler(len(dataset), rank, world_size),
                                           **loader_kw)
    train_loader = torch.utils.data.DataLoader(train_set, args.batch_size, sampler=sampler, **loader_kw)
    loaders = dict(train=eval_loader(train_set), held=eval_loader(held_set), val=eval_loader(val_set))
    # the engine counts micro-steps across epochs: leftovers of one epoch complete a step in the next
    total_steps = max(1, math.ceil(sampler.per_rank / args.batch_size) * args.epochs // args.grad_accum)
    log(f"pairs: {len(train_set)} train / {len(held_set)} held-out ({len({e['video'] for e in train_pairs})} / "
        f"{len({e['video'] for e in held_pairs})} videos); val split {describe_split(val_frames)}; "
        f"effective batch "
        f"{args.batch_size} x {args.grad_accum} accum x {world_size} procs; {total_steps} optimizer steps")
    share = disputed_share(train_pairs)
    log(f"chosen and rejected differ on {100 * share:.2f}% of the pixels (median): with beta {args.beta:g} the "
        f"loss saturates once the policy has moved ~{3 / max(args.beta * share, 1e-12):.3g} nats per disputed "
        f"pixel from the reference (README, DPO: choose beta for ~1)")
    return sampler, train_loader, loaders, total_steps


def reference_logps(args, run_dir, model, loaders, device, cache, autocast, log):
    """{train, held: (N, 2) reference log-likelihoods}: once, with the starting weights, in the engine's
    precision, stored in the run folder (a resumed run reads them back); zeros with --reference_free."""
    ref_path = os.path.join(run_dir, REFERENCE_FILE)
    if args.reference_free:
        return {name: torch.zeros(len(loaders[name].dataset), 2) for name in ("train", "held")}
    if args.resume and os.path.exists(ref_path):
        with open(ref_path) as f:
            return {k: torch.tensor(v, dtype=torch.float32).reshape(-1, 2) for k, v in json.load(f).items()}
    t0 = time.time()
    ref = {name: score_pairs(model, loaders[name], device, cache, autocast) for name in ("train", "held")}
    if is_main():
        write_json(ref_path, {k: v.tolist() for k, v in ref.items()})
    log(f"reference log-likelihoods of {sum(len(v) for v in ref.values())} pairs in {time.time() - t0:.1f} s")
    return ref


def done_line(state, run_dir):
    start, final = state["initial"], state["history"][-1]
    return (f"done: val dice {start['mean_dice']:.4f} -> {final['mean_dice']:.4f} (best {state['best_dice']:.4f} at "
            f"step {state['best_step']}); held-out pair accuracy {start.get('held_accuracy', float('nan')):.3f} -> "
            f"{final.get('held_accuracy', float('nan')):.3f}; outputs in {run_dir}")


def evaluate_all(model, loaders, ref, args, device, cache, autocast):
    """The held-out pairs' DPO metrics (held_*) and the val split's Dice/recall/precision."""
    held = pair_metrics(score_pairs(model, loaders["held"], device, cache, autocast), ref["held"], args) \
        if len(loaders["held"].dataset) else {}
    return {f"held_{k}": v for k, v in held.items()} | validate(model, loaders["val"], device, args.threshold, cache,
                                                                autocast)


def val_line(tag, metrics):
    return (f"{tag} val: dice {metrics['mean_dice']:.4f} recall {metrics['mean_recall']:.4f} precision "
            f"{metrics['mean_precision']:.4f} | held-out pairs: " +
            " ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items() if k.startswith("held_")) +
            f" {collapse_warning(metrics)}")


def main(args):
    # ---- setup
    deepspeed_on, rank, world_size, device, run_dir, logger = start_run(args, STAGE)
    model, processor, parts = cli.setup_model(args, log=logger.line)
    disable_dropout(model)
    fingerprint = base_fingerprint(model)
    _, val_frames = splits_from_args(args)
    sampler, train_loader, loaders, total_steps = pair_loaders(args, val_frames, processor, rank, world_size, device,
                                                               logger.line)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = build_engine(model, params, args, total_steps, device, deepspeed_on, world_size)
    model = engine.module
    cache = FeatureCache(device, args.feature_cache_gb)
    save = stage_saver(args, STAGE, engine, run_dir, parts, fingerprint)  # best/ and final/
    ref = reference_logps(args, run_dir, model, loaders, device, cache, engine.autocast, logger.line)

    # ---- resume
    state = load_trainer_state(engine, args.resume, dict(
        epoch=0, step=0, micro_in_epoch=0, best_dice=-1.0, best_step=None, history=[], bad_steps=0, since_best=0,
        stopped_early=False, beta_check=[]), logger.line)
    state.setdefault("beta_check", [])  # a resume point written before the beta check existed

    def validation(tag):
        """Validate, log, keep best/ by val Dice, count patience."""
        metrics = evaluate_all(model, loaders, ref, args, device, cache, engine.autocast)
        state["history"].append(dict(step=state["step"], epoch=state["epoch"], **metrics))
        logger.record(state["step"], {f"val/{k}": v for k, v in metrics.items()})
        logger.line(val_line(tag, metrics))
        improved = keep_if_best(state, metrics["mean_dice"], save, metrics, step=state["step"])
        state["since_best"] = 0 if improved else state["since_best"] + 1
        state["stopped_early"] = bool(args.patience) and state["since_best"] >= args.patience
        return metrics

    if not state["history"]:
        state["initial"] = validation("initial (the reference)")

    # ---- training loop
    t_start = time.time()
    while state["epoch"] < args.epochs and not state["stopped_early"]:
        epoch = state["epoch"]
        sampler.set_epoch(epoch, start=state["micro_in_epoch"] * args.batch_size)
        model.train()
        window, t_window = [], time.time()
        for batch in train_loader:
            batch = move_batch(batch, device)
            chosen, rejected = pair_logps(model, batch, cache, engine.autocast)
            ref_c, ref_r = ref["train"][batch["index"].cpu()].to(device).unbind(1)
            losses, chosen_r, rejected_r = dpo_loss(chosen, rejected, ref_c, ref_r, args.beta, args.label_smoothing,
                                                    args.reference_free)
            loss = losses.mean()
            engine.backward(finite_or_zero(loss, params, state, args.max_bad_steps, logger.line))
            stepped = engine_step(engine)
            state["micro_in_epoch"] += 1
            window.append(dict(dpo_loss=float(loss.detach()), **dpo_metrics(chosen_r, rejected_r),
                               logp_chosen=float(chosen.detach().mean()), logp_rejected=float(rejected.detach().mean())))
            if not stepped:
                continue
            state["step"] += 1
            if state["step"] % args.log_every == 0 or state["step"] == total_steps:
                avg = log_train_window(logger, state["step"], f"epoch {epoch + 1}/{args.epochs} step {state['step']}/"
                                       f"{total_steps}", window, time.time() - t_window,
                                       len(window) // args.grad_accum, len(window) * args.batch_size * world_size,
                                       engine.get_lr()[0])
                state["beta_check"].append(dict(step=state["step"], saturated=avg["saturated"],
                                                abs_margin=avg["abs_margin"]))
                window, t_window = [], time.time()
            if args.save_every and state["step"] % args.save_every == 0:
                save_trainer_state(engine, run_dir, state)
            if args.eval_every and state["step"] % args.eval_every == 0:
                validation(f"step {state['step']}")
                model.train()
                if state["stopped_early"]:
                    break
        if state["stopped_early"]:
            logger.line(f"early stop: no better val dice in {args.patience} validations (best at step "
                        f"{state['best_step']})")
            break
        state["epoch"], state["micro_in_epoch"] = epoch + 1, 0
        if not args.eval_every or state["step"] % args.eval_every:
            validation(f"epoch {epoch + 1}")
        save_trainer_state(engine, run_dir, state)

    # ---- final save and summary
    final = state["history"][-1]
    save("final", final, step=state["step"])
    return finish_run(run_dir, logger, t_start, dict(
        stage=STAGE, args=vars(args), initial_val=state["initial"], history=state["history"], final=final,
        best_step=state["best_step"], best_val_dice=state["best_dice"], stopped_early=state["stopped_early"],
        bad_steps=state["bad_steps"], pairs=dict(train=len(loaders["train"].dataset), held_out=len(loaders["held"].dataset)),
        beta_check=state["beta_check"]), done_line(state, run_dir), beta_check_line(state["beta_check"], args.beta))


if __name__ == "__main__":
    cli.run_main(main, parse_args)
