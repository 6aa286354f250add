"""Stage 1: LoRA SFT of Sa2VA for vessel segmentation, through the differentiable forward path.

LoRA on the LLM, trainable `text_hidden_fcs` and SAM2 mask decoder, vision encoders frozen;
loss = Dice + BCE on the mask (+ the answer's token cross-entropy, which keeps the model
answering with [SEG]). Gradients flow: loss -> mask decoder -> text_hidden_fcs -> [SEG]
hidden state -> LoRA (the released `predict_forward` runs `generate()` under no_grad, and a
run trained through it never changes; see README).

    deepspeed train_sft.py --model /path/to/Sa2VA-4B --data /path/to/vessels --bf16
    python train_sft.py --data synthetic_data            # CPU, tiny model

Writes <output>/sft_<timestamp>/: best/ and final/ (stage checkpoints), training_info.json,
train.log, metrics.jsonl, tensorboard/, checkpoints/ (for --resume).
"""
import math
import time

import torch

from common import cli
from common.data import (AugmentedViews, EvalSampler, ShardedSampler, VesselDataset, area_curriculum, describe_split,
                         splits_from_args)
from common.engine import (build_engine, engine_step, finite_or_zero, finish_run, keep_if_best, load_trainer_state,
                           log_train_window, save_trainer_state, stage_saver, start_run)
from common.evaluation import collapse_warning, validate
from common.forward import FeatureCache, forward_batch, full_size_logits, move_batch
from common.lora import base_fingerprint
from common.losses import segmentation_loss, text_loss

STAGE = "sft"
SFT_POS_WEIGHT = "1"  # plain BCE as the mission's Dice + BCE; README "Why SFT collapsed" measures `balanced`


def parse_args(argv=None):
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_model_args(p)
    cli.add_data_args(p)
    cli.add_train_args(p, lr=1e-4, epochs=3, batch_size=4, grad_accum=1, weight_decay=0.0,
                       trainable="lora,text_hidden_fcs,mask_decoder")
    cli.add_lora_args(p, preset="medium")
    g = cli.add_mask_loss_args(p, dice_weight=1.0, bce_weight=1.0, pos_weight_default=SFT_POS_WEIGHT)
    p.add_argument_group("augmentation").add_argument(
        "--augment", action="store_true",
        help="show every training frame under a random flip / 90-degree rotation each epoch (small folders)")
    g.add_argument("--text_weight", type=float, default=1.0,
                   help="weight of the answer-token cross-entropy (0 = off; only matters when the LLM trains)")
    cli.add_curriculum_args(p)
    return cli.parse(p, argv)


def data_loaders(args, train_frames, val_frames, processor, rank, world_size, device, log):
    """(train set, its sampler, train loader, val loader, optimizer steps of the run); logs the data line."""
    train_set = VesselDataset(train_frames, args.resize_masks)
    if args.augment:
        train_set = AugmentedViews(train_set, args.seed)
    val_set = VesselDataset(val_frames, args.resize_masks)
    curriculum = area_curriculum(train_frames, args)  # None unless --curriculum area
    sampler = ShardedSampler(len(train_set), rank, world_size, shuffle=True, seed=args.seed, curriculum=curriculum)
    loader_kw = dict(collate_fn=processor, num_workers=args.num_workers, pin_memory=device.type == "cuda",
                     persistent_workers=False)
    train_loader = torch.utils.data.DataLoader(train_set, args.batch_size, sampler=sampler, drop_last=False, **loader_kw)
    val_loader = torch.utils.data.DataLoader(val_set, args.batch_size, sampler=EvalSampler(len(val_set), rank, world_size),
                                             **loader_kw)
    # optimizer steps per epoch: a curriculum's early epochs train on fewer frames
    total_steps = sum(max(1, math.ceil(sampler.per_rank_at(epoch) / args.batch_size) // args.grad_accum)
                      for epoch in range(args.epochs))
    log(f"data: train {describe_split(train_frames)}, val {describe_split(val_frames)}; "
        f"effective batch {args.batch_size} x {args.grad_accum} accum x {world_size} procs = "
        f"{args.batch_size * args.grad_accum * world_size}; {total_steps} optimizer steps"
        + (f"; curriculum: {curriculum.describe()}" if curriculum else ""))
    return train_set, sampler, train_loader, val_loader, total_steps


def main(args):
    # ---- setup: the data first, so a folder that is refused costs no model load and leaves no run folder
    train_frames, val_frames = splits_from_args(args)
    deepspeed_on, rank, world_size, device, run_dir, logger = start_run(args, STAGE)
    model, processor, parts = cli.setup_model(args, log=logger.line)
    fingerprint = base_fingerprint(model)
    train_set, sampler, train_loader, val_loader, total_steps = data_loaders(
        args, train_frames, val_frames, processor, rank, world_size, device, logger.line)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = build_engine(model, params, args, total_steps, device, deepspeed_on, world_size)
    model = engine.module
    cache = FeatureCache(device, args.feature_cache_gb)  # frozen work, once per sample
    save = stage_saver(args, STAGE, engine, run_dir, parts, fingerprint)  # best/ and final/

    # ---- resume, or validate the starting model (epoch 0: best/ starts as it)
    state = load_trainer_state(engine, args.resume, dict(epoch=0, step=0, micro_in_epoch=0, best_dice=-1.0,
                                                         best_epoch=None, history=[], bad_steps=0), logger.line)
    if state["step"] == 0 and state["micro_in_epoch"] == 0 and not state["history"]:
        start = state["initial_val"] = validate(model, val_loader, device, args.threshold, cache, engine.autocast)
        logger.line(f"initial val: dice {start['mean_dice']:.4f} recall {start['mean_recall']:.4f} "
                    f"precision {start['mean_precision']:.4f} {collapse_warning(start)}")
        keep_if_best(state, start["mean_dice"], save, start, epoch=0)

    # ---- training loop
    t_start = time.time()
    while state["epoch"] < args.epochs:
        epoch = state["epoch"]
        sampler.set_epoch(epoch, start=state["micro_in_epoch"] * args.batch_size)
        if args.augment:
            train_set.set_epoch(epoch)
        model.train()
        window, t_window = [], time.time()
        for batch in train_loader:
            masks = [m.to(device).float() for m in batch["masks"]]
            batch = move_batch(batch, device)
            with engine.autocast():
                out = forward_batch(model, batch, cache, with_text_logits=args.text_weight > 0)
            logits = full_size_logits(model, out["low_res_logits"], batch["image_sizes"])
            losses = segmentation_loss(logits, masks, args.dice_weight, args.bce_weight, args.bce_pos_weight)
            loss = losses["loss"]
            if out["text"] is not None:
                losses["text"] = text_loss(*out["text"])
                loss = loss + args.text_weight * losses["text"]
                losses["text"] = losses["text"].detach()
            engine.backward(finite_or_zero(loss, params, state, args.max_bad_steps, logger.line))
            stepped = engine_step(engine)
            state["micro_in_epoch"] += 1
            window.append({k: float(v.detach()) for k, v in losses.items()})
            if not stepped:
                continue
            state["step"] += 1
            if state["step"] % args.log_every == 0 or state["step"] == total_steps:
                log_train_window(logger, state["step"], f"epoch {epoch + 1}/{args.epochs} step {state['step']}/{total_steps}",
                                 window, time.time() - t_window, len(window) // args.grad_accum,
                                 len(window) * args.batch_size * world_size, engine.get_lr()[0])
                window, t_window = [], time.time()
            if args.save_every and state["step"] % args.save_every == 0:
                save_trainer_state(engine, run_dir, state)

        # ---- end of epoch: validation, best/, resume point
        val = validate(model, val_loader, device, args.threshold, cache, engine.autocast)
        state["history"].append(dict(epoch=epoch + 1, step=state["step"], **val))
        logger.record(state["step"], {f"val/{k}": v for k, v in val.items()})
        logger.line(f"epoch {epoch + 1} val: dice {val['mean_dice']:.4f} iou {val['mean_iou']:.4f} "
                    f"recall {val['mean_recall']:.4f} precision {val['mean_precision']:.4f} {collapse_warning(val)}")
        keep_if_best(state, val["mean_dice"], save, val, epoch=epoch + 1)
        state["epoch"], state["micro_in_epoch"] = epoch + 1, 0
        save_trainer_state(engine, run_dir, state)

    # ---- final save and summary
    save("final", state["history"][-1] if state["history"] else {}, epoch=args.epochs)
    return finish_run(run_dir, logger, t_start, dict(
        stage=STAGE, args=vars(args), initial_val=state.get("initial_val"), history=state["history"],
        best_epoch=state["best_epoch"], best_val_dice=state["best_dice"], bad_steps=state["bad_steps"],
        collapsed_epochs=[h["epoch"] for h in state["history"] if h.get("collapsed")]),
        f"done: best val dice {state['best_dice']:.4f} (epoch {state['best_epoch']}"
        f"{': the starting model, no epoch beat it' if state['best_epoch'] == 0 else ''}); outputs in {run_dir}")


if __name__ == "__main__":
    cli.run_main(main, parse_args)
