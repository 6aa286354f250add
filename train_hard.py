"""Stage 3: supervised training on the hard samples, with the frozen work computed once.

Dice + 0.5*BCE through the differentiable forward path on the samples the starting model
(--init: the DPO or SFT checkpoint) segments worst: the hard list of mine_hard.py (--hard_list)
or the train frames with Dice < --threshold_hard scored on the fly (--mine). Only
text_hidden_fcs and the SAM2 mask decoder train; the LLM and its LoRA adapter stay frozen, so a
sample's [SEG] hidden state and SAM2 image features are constants, computed once (a no-grad
pass over each epoch's samples not cached yet; common/forward.FeatureCache): the training steps
run only the trained heads, without even decoding the image. Options: replay easy samples
(--easy_ratio), flip/rotate hard samples (--augment; cached per view), re-mine after each round
(--iterations). Validation every epoch on the whole val split and on its hard and easy parts (by
the starting model's Dice); best/ is chosen on the whole split.

    deepspeed train_hard.py --model /path/to/Sa2VA-4B --init runs/dpo_x/best --data /path/to/vessels \
        --hard_list runs/mine/hard_samples.json --bf16
    python train_hard.py --data synthetic_data --init runs/sft_x/best --mine --lr 3e-3   # CPU, tiny model

Writes <output>/hard_<timestamp>/: best/ and final/ (stage checkpoints), training_info.json,
train.log, metrics.jsonl, tensorboard/, checkpoints/ (for --resume).
"""
import contextlib
import json
import math
import random
import time

import numpy as np
import torch
from PIL import Image

from common import cli
from common.data import (VIEWS, DataError, EvalSampler, VesselDataset, area_curriculum, describe_split, dihedral,
                         frame_mask, image_size, splits_from_args, view_key)
from common.engine import (build_engine, engine_step, finite_or_zero, finish_run, keep_if_best, load_trainer_state,
                           log_train_window, save_trainer_state, stage_saver, start_run)
from common.evaluation import METRICS, collapse_warning, score_loader, summarize
from common.forward import FeatureCache, bf16_autocast, forward_batch, full_size_logits, llm_is_frozen, move_batch
from common.lora import base_fingerprint
from common.losses import segmentation_loss
from common.sa2va import family

STAGE = "hard"


def parse_args(argv=None):
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_model_args(p)
    cli.add_data_args(p)
    cli.add_train_args(p, lr=1e-5, epochs=5, batch_size=4, grad_accum=2, weight_decay=0.01,
                       trainable="text_hidden_fcs,mask_decoder")
    cli.add_lora_args(p, preset="none")
    g = p.add_argument_group("hard samples")
    g.add_argument("--hard_list", default=None, help="hard_samples.json of mine_hard.py: its `hard` keys that are "
                                                     "train frames are trained on")
    g.add_argument("--mine", action="store_true", help="instead of --hard_list: score the train split with the "
                                                       "starting model and train on Dice < --threshold_hard")
    g.add_argument("--threshold_hard", type=float, default=0.75,
                   help="hard = Dice below this (mining, and the hard/easy parts of the val split)")
    g.add_argument("--easy_ratio", type=float, default=0.0,
                   help="share of the train split's easy frames replayed each epoch (a new random subset each epoch)")
    g.add_argument("--augment", action="store_true",
                   help="each epoch a random flip / 90-degree rotation of every hard frame, image and mask together")
    g.add_argument("--iterations", type=int, default=1,
                   help="rounds of --epochs epochs; each round after the first re-mines the train split with the "
                        "current model")
    cli.add_mask_loss_args(p, dice_weight=1.0, bce_weight=0.5, pos_weight_default="1")
    cli.add_curriculum_args(p)
    return cli.parse(p, argv)


# ---------------------------------------------------------------- hard items and their cached features

class HardItems(torch.utils.data.Dataset):
    """(frame index, view) items. An item whose frozen features are all cached (`cached`, the
    keys known when the epoch's DataLoader is made) skips the image: only its mask is read,
    once: `masks` (a dict kept across epochs) holds it when the loader runs in this process."""

    def __init__(self, frames, items, resize_masks=False, cached=frozenset(), masks=None):
        self.frames, self.items, self.cached = VesselDataset(frames, resize_masks), items, cached
        self.masks = {} if masks is None else masks

    def __len__(self):
        return len(self.items)

    def full(self, item):
        index, view = item
        s = self.frames[index]
        return dict(s, image=Image.fromarray(dihedral(np.asarray(s["image"]), view)), mask=dihedral(s["mask"], view),
                    key=view_key(s["key"], view))

    def __getitem__(self, i):
        index, view = self.items[i]
        f = self.frames.frames[index]
        key = view_key(f.key, view)
        if key not in self.cached:
            return self.full(self.items[i])
        if key not in self.masks:
            mask, size = frame_mask(f), image_size(f.image_path)  # the header only
            if mask.shape != tuple(size):  # only with --resize_masks: as VesselDataset does
                mask = np.asarray(Image.fromarray(mask).resize(size[::-1], Image.NEAREST))
            self.masks[key] = dihedral(mask, view)
        return dict(image=None, mask=self.masks[key], key=key, item=self.items[i])


class HardCollate:
    """A batch of cached items becomes a features-only batch (keys, sizes, masks) that
    forward_batch serves from the cache; any other batch goes through the processor."""

    def __init__(self, processor, dataset):
        self.processor, self.dataset = processor, dataset

    def __call__(self, samples):
        if all(s["image"] is None for s in samples):
            masks = [torch.from_numpy(s["mask"]) for s in samples]
            # forward_batch reads only the device of input_ids when both features come from the cache
            return dict(input_ids=torch.zeros((len(samples), 0), dtype=torch.long), keys=[s["key"] for s in samples],
                        image_sizes=[tuple(m.shape) for m in masks], masks=masks)
        return self.processor([self.dataset.full(s["item"]) if s["image"] is None else s for s in samples])


def cached_keys(cache, model):
    """Keys whose every frozen input is cached (none when the LLM trains: its state changes)."""
    return frozenset(cache.fpn.keys() & cache.seg_hidden.keys()) if llm_is_frozen(model) else frozenset()


def epoch_items(hard, easy, args, round_, epoch, rank, world_size, curriculum=None):
    """This rank's (frame index, view) items of one epoch. A hard frame stays on one rank for the
    whole round (its cached features live there); views, easy replay and order are drawn from a
    generator seeded by (seed, round, epoch), so a resumed run redraws the same epoch. With a
    `curriculum` (common.data.AreaCurriculum over the round's hard frames) only the epoch's groups,
    largest vessels first, replayed easy frames after them."""
    g = random.Random(f"{args.seed}-{round_}-{epoch}")
    items = [(i, g.randrange(VIEWS) if args.augment else 0) for i in hard]
    items += [(i, 0) for i in sorted(g.sample(easy, round(args.easy_ratio * len(easy))))]
    per_rank = math.ceil(len(items) / world_size)
    mine = items[rank::world_size] or items  # fewer items than ranks: borrow
    if curriculum is not None:
        # each rank keeps its own frames of the epoch's groups; the ranks pad to the largest share
        frame = lambda item: item[0]  # noqa: E731
        per_rank = max(len(curriculum.select(items[r::world_size] or items, epoch, frame)) for r in range(world_size))
        mine = curriculum.select(mine, epoch, frame) or curriculum.select(items, epoch, frame)
        mine = [mine[i % len(mine)] for i in range(per_rank)]
        return curriculum.arrange(mine, epoch, g, frame)
    mine = [mine[i % len(mine)] for i in range(per_rank)]  # every rank the same count, padded with its own items
    g.shuffle(mine)
    return mine


def train_mode(model):
    """Train mode for the trained heads only: frozen modules stay in eval mode, so no dropout
    (LoRA's, say) changes features that are cached as constants."""
    model.train()
    if llm_is_frozen(model):
        for m in family(model).pre_seg_modules(model):
            m.eval()
    model.grounding_encoder.sam2_model.image_encoder.eval()


@torch.no_grad()
def epoch_dataset(model, frames, items, cache, fill, processor, loader_kw, args, device, autocast, masks):
    """(HardItems of the epoch, samples precomputed, samples left uncached). With `fill`, a no-grad
    pass first caches the frozen features of the items not cached yet: every training batch is then
    served whole from the cache (a batch with one missing sample recomputes all of its samples)."""
    known = cached_keys(cache, model)
    new = sorted({it for it in items if view_key(frames[it[0]].key, it[1]) not in known}) if fill else []
    if new:
        warm = HardItems(frames, new, args.resize_masks)
        for batch in torch.utils.data.DataLoader(warm, args.batch_size, collate_fn=HardCollate(processor, warm),
                                                 **loader_kw):
            with autocast():
                forward_batch(model, move_batch(batch, device), cache)
    dataset = HardItems(frames, items, args.resize_masks, cached_keys(cache, model), masks)
    return dataset, len(new), sum(view_key(frames[i].key, v) not in dataset.cached for i, v in set(items))


def hard_loss(model, batch, device, cache, dice_weight, bce_weight, pos_weight=None,
              autocast=contextlib.nullcontext):
    """dict(loss, dice_loss, bce) of one batch through the forward path (frozen features from `cache`)."""
    masks = [m.to(device).float() for m in batch["masks"]]
    batch = move_batch(batch, device)
    with autocast():
        out = forward_batch(model, batch, cache)
    logits = full_size_logits(model, out["low_res_logits"], batch["image_sizes"])
    return segmentation_loss(logits, masks, dice_weight, bce_weight, pos_weight)


def read_hard_list(path, train_frames, val_frames, log):
    """Train-frame indices of the `hard` keys of a hard_samples.json (others are left out, said so)."""
    try:
        with open(path) as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise DataError(f"--hard_list {path}: file not found (write it with mine_hard.py, or pass --mine)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"--hard_list {path}: not valid JSON ({e})") from None
    hard = spec.get("hard") if isinstance(spec, dict) else None
    if not isinstance(hard, list) or not all(isinstance(k, str) for k in hard):
        raise DataError(f"--hard_list {path}: needs a list of file stems under 'hard' (mine_hard.py writes it)")
    train, val = {f.key: i for i, f in enumerate(train_frames)}, {f.key for f in val_frames}
    in_val = [k for k in hard if k in val]
    unknown = [k for k in hard if k not in train and k not in in_val]
    if in_val:
        log(f"hard list: {len(in_val)} key(s) are validation frames, left out (validation stays held out)")
    if unknown:
        log(f"hard list: {len(unknown)} key(s) are not train frames of this data, left out, e.g. {unknown[0]!r}")
    if not any(k in train for k in hard):
        raise DataError(f"--hard_list {path}: none of its {len(hard)} hard keys is a train frame of the data")
    return sorted(train[k] for k in hard if k in train), spec


def subset_metrics(records, val_hard, threshold):
    """{val, val_hard, val_easy: summary at `threshold`, or None for an empty part}."""
    parts = dict(val=records, val_hard=[r for r in records if r["key"] in val_hard],
                 val_easy=[r for r in records if r["key"] not in val_hard])
    return {name: summarize(rs, (threshold,))[float(threshold)] if rs else None for name, rs in parts.items()}


def describe_val(v):
    part = lambda s, name: f"{name} {s['mean_dice']:.4f} (n={s['samples']})" if s else f"{name} -"  # noqa: E731
    return (f"dice {v['val']['mean_dice']:.4f} recall {v['val']['mean_recall']:.4f} precision "
            f"{v['val']['mean_precision']:.4f} | {part(v['val_hard'], 'hard')} {part(v['val_easy'], 'easy')}")


def mine_train(model, train_eval_loader, train_frames, args, device, autocast, desc):
    """Train-frame indices the model segments with Dice < --threshold_hard."""
    # no cache here: its memory goes to the frames that train (and to validation)
    records = score_loader(model, train_eval_loader, device, (args.threshold,), autocast=autocast, desc=desc)
    dice = {r["key"]: r["dice"][0] for r in records}
    return [i for i, f in enumerate(train_frames) if dice[f.key] < args.threshold_hard]


def first_hard_set(args, model, train_eval_loader, train_frames, val_frames, device, deepspeed_on, log):
    """(train-frame indices of the first round, the hard list's JSON or {}): --hard_list, or --mine with the
    starting model before the engine (the schedule is planned on the real hard count), in the dtype training
    will use (DeepSpeed bf16 casts the module itself; plain torch autocasts)."""
    if args.hard_list:
        hard, spec = read_hard_list(args.hard_list, train_frames, val_frames, log)
        if spec.get("init") != args.init:
            log(f"note: {args.hard_list} was mined with init {spec.get('init')!r}, training starts from {args.init!r}")
        return hard, spec
    model.to(device=device, dtype=torch.bfloat16 if deepspeed_on and args.bf16 else None)
    return mine_train(model, train_eval_loader, train_frames, args, device,
                      bf16_autocast(args.bf16 and not deepspeed_on, device), "mining train"), {}


def planned_steps(args, hard, train_frames, val_frames, model, world_size, log):
    """Optimizer steps of the run, planned on the first round's hard set (later rounds' may differ); logs the
    data line."""
    easy = sorted(set(range(len(train_frames))) - set(hard))
    curriculum = area_curriculum(train_frames, args, hard)  # None unless --curriculum area: shorter epochs
    steps = args.iterations * sum(max(1, math.ceil(len(epoch_items(hard, easy, args, 0, e, 0, world_size, curriculum))
                                                   / args.batch_size) // args.grad_accum) for e in range(args.epochs))
    log(f"data: train {describe_split(train_frames)}, val {describe_split(val_frames)}; {len(hard)} hard + "
        f"{round(args.easy_ratio * len(easy))} easy replayed per epoch; effective batch {args.batch_size} x "
        f"{args.grad_accum} accum x {world_size} procs; ~{steps} optimizer steps; frozen LLM: {llm_is_frozen(model)} "
        f"(its [SEG] states {'are' if llm_is_frozen(model) else 'are not'} cached)")
    return steps


def start_round(state, args, train_frames, log):
    """Record and log the round's hard set (once per round); False when there is none to train on."""
    if state["epoch"] == 0 and len(state["rounds"]) == state["round"]:
        state["rounds"].append(dict(round=state["round"] + 1, hard=[train_frames[i].key for i in state["hard"]]))
        log(f"round {state['round'] + 1}/{args.iterations}: {len(state['hard'])} hard train frames "
            f"(Dice < {args.threshold_hard:g})")
    if not state["hard"]:
        log(f"no train frame has Dice < {args.threshold_hard:g}: nothing (more) to train")
    return bool(state["hard"])


def epoch_loader(model, train_frames, items, cache, fill_cache, processor, loader_kw, args, device, autocast, masks,
                 log):
    """(the epoch's DataLoader, samples precomputed, whether to keep filling the cache); see epoch_dataset."""
    dataset, precomputed, missing = epoch_dataset(model, train_frames, items, cache, fill_cache, processor, loader_kw,
                                                  args, device, autocast, masks)
    if missing and fill_cache:  # later epochs skip the pre-pass: its results would not be kept
        fill_cache = False
        log(f"cache full ({cache.bytes / 2 ** 30:.2f} GiB): {missing} samples are recomputed at every step; raise "
            f"--feature_cache_gb")
    # a fully cached epoch reads no image: its masks come from memory after the first such
    # epoch, and worker processes (started anew every epoch) would cost more than they save
    loader = torch.utils.data.DataLoader(dataset, args.batch_size, collate_fn=HardCollate(processor, dataset),
                                         **(dict(num_workers=0) if not missing else loader_kw))
    return loader, precomputed, fill_cache


def record_epoch(state, logger, cache, epoch, val, train):
    """The epoch's history entry (its training numbers `train`, the cache, the validation), record and line."""
    state["history"].append(dict(epoch=epoch + 1, round=state["round"] + 1, step=state["step"], **train,
                                 cache=dict(entries=len(cache), mb=cache.bytes / 2 ** 20, hits=dict(cache.hits),
                                            misses=dict(cache.misses)), **val))
    logger.record(state["step"], {f"{name}/{m}": s[f"mean_{m}"] for name, s in val.items() if s for m in METRICS}
                  | {"cache/entries": len(cache), "cache/seg_hidden_hits": cache.hits["seg_hidden"],
                     "train/epoch_seconds": train["train_seconds"]})
    logger.line(f"epoch {epoch + 1} val: {describe_val(val)} {collapse_warning(val['val'])}")


def main(args):
    if bool(args.hard_list) == bool(args.mine):
        raise SystemExit("pass exactly one of --hard_list FILE and --mine")
    # ---- setup
    deepspeed_on, rank, world_size, device, run_dir, logger = start_run(args, STAGE)
    model, processor, parts = cli.setup_model(args, log=logger.line)
    fingerprint = base_fingerprint(model)
    train_frames, val_frames = splits_from_args(args)
    if not val_frames:
        raise DataError(f"{args.data}: no validation frames (the hard/easy validation needs them); see --val_fraction")
    loader_kw = dict(num_workers=args.num_workers, pin_memory=device.type == "cuda")
    train_eval_loader, val_loader = (torch.utils.data.DataLoader(
        VesselDataset(frames, args.resize_masks), args.batch_size, sampler=EvalSampler(len(frames), rank, world_size),
        collate_fn=processor, **loader_kw) for frames in (train_frames, val_frames))
    hard, hard_spec = first_hard_set(args, model, train_eval_loader, train_frames, val_frames, device, deepspeed_on,
                                     logger.line)
    total_steps = planned_steps(args, hard, train_frames, val_frames, model, world_size, logger.line)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = build_engine(model, params, args, total_steps, device, deepspeed_on, world_size)
    model = engine.module
    cache = FeatureCache(device, args.feature_cache_gb)
    cached_masks = {}  # view key -> mask of the cached items (host memory: one byte per pixel)
    save = stage_saver(args, STAGE, engine, run_dir, parts, fingerprint, extra=lambda: dict(
        hard_list=args.hard_list, hard_samples=[len(r["hard"]) for r in state["rounds"]]))

    # ---- resume, or score the val split once with the starting model (hard/easy parts; epoch 0: best/ starts as it)
    state = load_trainer_state(engine, args.resume, dict(round=0, epoch=0, step=0, micro_in_epoch=0, best_dice=-1.0,
                                                         best_epoch=None, history=[], bad_steps=0, hard=hard, rounds=[]),
                               logger.line)
    if "val_hard" not in state:
        records = score_loader(model, val_loader, device, (args.threshold,), autocast=engine.autocast, desc="val")
        state["val_hard"] = sorted(r["key"] for r in records if r["dice"][0] < args.threshold_hard)
        start = state["initial_val"] = subset_metrics(records, set(state["val_hard"]), args.threshold)
        logger.line(f"initial val: {describe_val(start)} {collapse_warning(start['val'])}")
        keep_if_best(state, start["val"]["mean_dice"], save, start, epoch=0)
    val_hard = set(state["val_hard"])

    # ---- training: rounds of (hard set, epochs)
    t_start, fill_cache = time.time(), llm_is_frozen(model) and args.feature_cache_gb > 0
    while state["round"] < args.iterations:
        if state["hard"] is None:  # a later round: re-mine with the current model
            state["hard"] = mine_train(model, train_eval_loader, train_frames, args, device, engine.autocast,
                                       f"re-mining train (round {state['round'] + 1})")
        if not start_round(state, args, train_frames, logger.line):
            break
        hard_set = set(state["hard"])
        easy = [i for i in range(len(train_frames)) if i not in hard_set]
        curriculum = area_curriculum(train_frames, args, state["hard"])  # None unless --curriculum area
        if curriculum and state["epoch"] == 0:
            logger.line(f"curriculum over the round's hard frames: {curriculum.describe()}")
        while state["epoch"] < args.epochs:
            epoch = state["round"] * args.epochs + state["epoch"]  # counted over all rounds
            items = epoch_items(state["hard"], easy, args, state["round"], state["epoch"], rank, world_size, curriculum)
            train_mode(model)
            t_epoch = time.time()
            loader, precomputed, fill_cache = epoch_loader(
                model, train_frames, items[state["micro_in_epoch"] * args.batch_size:], cache, fill_cache, processor,
                loader_kw, args, device, engine.autocast, cached_masks, logger.line)
            window, t_window, seen, hits_before = [], time.time(), 0, cache.hits["fpn"]
            for batch in loader:
                losses = hard_loss(model, batch, device, cache, args.dice_weight, args.bce_weight, args.bce_pos_weight,
                                   engine.autocast)
                engine.backward(finite_or_zero(losses["loss"], params, state, args.max_bad_steps, logger.line))
                stepped = engine_step(engine)
                state["micro_in_epoch"] += 1
                seen += len(batch["keys"])
                window.append({k: float(v.detach()) for k, v in losses.items()})
                if not stepped:
                    continue
                state["step"] += 1
                if state["step"] % args.log_every == 0:
                    log_train_window(logger, state["step"], f"epoch {epoch + 1}/{args.epochs * args.iterations} step "
                                     f"{state['step']}/{total_steps}", window, time.time() - t_window,
                                     len(window) // args.grad_accum, len(window) * args.batch_size * world_size,
                                     engine.get_lr()[0])
                    window, t_window = [], time.time()
                if args.save_every and state["step"] % args.save_every == 0:
                    save_trainer_state(engine, run_dir, state)
            train = dict(train_seconds=time.time() - t_epoch, train_samples=seen, precomputed=precomputed,
                         train_cache_hits=cache.hits["fpn"] - hits_before)

            # ---- end of epoch: cache report, validation on all / hard / easy, best/, resume point
            logger.line(f"epoch {epoch + 1} train: {seen} samples in {train['train_seconds']:.1f} s "
                        f"({seen / max(train['train_seconds'], 1e-9):.1f} samples/s), {precomputed} precomputed, "
                        f"{train['train_cache_hits']} served from the cache; cache: {cache.summary()}")
            records = score_loader(model, val_loader, device, (args.threshold,), cache=cache, autocast=engine.autocast,
                                   desc="validating")
            val = subset_metrics(records, val_hard, args.threshold)
            record_epoch(state, logger, cache, epoch, val, train)
            keep_if_best(state, val["val"]["mean_dice"], save, val, epoch=epoch + 1)
            state["epoch"], state["micro_in_epoch"] = state["epoch"] + 1, 0
            save_trainer_state(engine, run_dir, state)
        state["round"], state["epoch"], state["hard"] = state["round"] + 1, 0, None

    # ---- final save and summary
    save("final", state["history"][-1] if state["history"] else {}, epoch=len(state["history"]))
    return finish_run(run_dir, logger, t_start, dict(
        stage=STAGE, args=vars(args), hard_list=dict(path=args.hard_list, init=hard_spec.get("init"),
                                                     threshold_hard=hard_spec.get("threshold_hard")),
        rounds=state["rounds"], val_hard_keys=state["val_hard"], initial_val=state["initial_val"],
        history=state["history"], best_epoch=state["best_epoch"], best_val_dice=state["best_dice"],
        bad_steps=state["bad_steps"]),
        f"done: best val dice {state['best_dice']:.4f} (epoch {state['best_epoch']}); outputs in {run_dir}")


if __name__ == "__main__":
    cli.run_main(main, parse_args)
