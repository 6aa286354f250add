"""Pretraining of the embedded tiny Sa2VA: the weights `common/tiny_weights/` ships.

A released Sa2VA arrives pretrained: its SAM2 image encoder sees edges and tubes, its decoder
turns a `[SEG]` prompt into a mask, its LLM answers "It is [SEG]." and puts what it saw of the
image into the `[SEG]` state. A randomly initialised stand-in has none of that, so fine-tuning
it measured nothing a user cares about (SFT on real retinal images fell to empty masks). This
script gives the tiny model the same starting point, from synthetic data only (no real image is
ever used):

- images: branching, tapering vessel trees (the geometry of `common.synth`) drawn at widths
  from 2 to ~50 px of SAM2's 1024 px input, dark or bright, grey or tinted per channel, on
  textured backgrounds with blobs that are not vessels, optionally inside a circular field of
  view, blurred and noisy; contrast from faint to strong;
- phase 1 trains every part end to end through the project's own forward path (vision tower,
  mlp1, LLM, text_hidden_fcs, SAM2 image encoder, prompt encoder, mask decoder incl. its IoU
  head) with Dice + BCE on all three SAM2 masks, MSE of the IoU head and the answer's
  cross-entropy;
- phase 2 trains SAM2's memory (memory encoder, memory attention, object pointers, temporal
  encodings) on short synthetic videos: the first frame is prompted by `[SEG]`, later frames are
  tracked from memory only, as `common.video` runs them.

Deterministic for a seed on one machine (same device type and library versions): data come from
per-worker seeded generators, the loop is fixed. Rebuild with

    python -m common.tiny_pretrain --out common/tiny_weights --device cuda     # ~4 min on one H200
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from safetensors.torch import save_file

from common.forward import llm_forward, move_batch, upsample_logits
from common.losses import dice_loss, sigmoid_bce, text_loss
from common.sa2va import Sa2VAProcessor, describe
from common.synth import BASE_SIZE, _background, _contrast_curve, _deform, _motion, _render, _vessel_tree
from common.tiny import WEIGHTS_DIR, TinySa2VAChatModel, TinySa2VAConfig, build_tokenizer

RECIPE_VERSION = 3  # 2: wider, residual encoder with top-down fusion to stride 4; SAM2 width 128; 3: dilated blocks at strides 4 (3), 8 and 16 (2)
SAM_SIZE = 1024  # as the released SAM2: 256 x 256 low-res logits (FACTS: a 64 x 64 grid caps DRIVE at 0.60)


# ----------------------------------------------------------------------------- synthetic vessel images

def _trees(rng):
    """1-4 vessel trees laid out on a BASE_SIZE frame, redrawn until they cover 4-20% of it."""
    for _ in range(20):
        trees = [t for _ in range(int(rng.integers(1, 5))) for t in _vessel_tree(rng, BASE_SIZE)]
        if 0.04 <= _render(trees, BASE_SIZE)[0].mean() <= 0.20:
            break
    return trees


def _appearance(rng):
    """Per-video look: polarity, channel tints, contrast, blur, noise, field of view, blobs, gamma."""
    grey = rng.random() < 0.4
    return dict(
        invert=rng.random() < 0.3,  # bright vessels (inverted display, fluorescein)
        gain=np.full(3, rng.uniform(0.6, 1.2)) if grey else rng.uniform(0.2, 1.3, 3),
        bias=np.full(3, rng.uniform(-0.1, 0.2)) if grey else rng.uniform(-0.15, 0.35, 3),
        strength=rng.uniform(0.15, 1.0),  # vessel contrast
        blur=rng.uniform(0.0, 1.2), noise=rng.uniform(0.005, 0.04), gamma=rng.uniform(0.7, 1.5),
        fov=rng.random() < 0.4, fov_radius=rng.uniform(0.42, 0.6), fov_centre=rng.uniform(0.45, 0.55, 2),
        blobs=[(rng.uniform(0, 1, 2), rng.uniform(0.03, 0.12), rng.uniform(-0.35, 0.35))
               for _ in range(int(rng.integers(0, 4)))],
    )


def vessel_video(rng, num_frames, size):
    """`num_frames` frames (uint8 (size, size, 3)) and bool masks of one synthetic vessel video.

    Geometry is drawn on a BASE_SIZE frame and stretched to `size`; widths are scaled on their own
    (`width`), so the same `size` holds thin and thick vessels. Frames beat and drift as
    `common.synth` videos do, with its contrast curve (wash-in, faint stretches)."""
    k = size / BASE_SIZE
    width = k * rng.uniform(0.2, 0.9)
    trees = _trees(rng)
    motion = _motion(rng, BASE_SIZE)
    look = _appearance(rng)
    background = _background(rng, size)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for centre, radius, amount in look["blobs"]:  # optic disc, lesions, bones: round, not vessels
        background = background + amount * np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * radius ** 2))
    fov = np.hypot(xx - look["fov_centre"][0], yy - look["fov_centre"][1]) < look["fov_radius"] if look["fov"] else None
    contrast = _contrast_curve(rng, num_frames)[0] if num_frames > 1 else np.ones(1)
    frames, masks = [], []
    for t in range(num_frames):
        moved = [(_deform(p, t, motion) * k, np.maximum(r * width, 0.7), level) for p, r, level in trees]
        mask, path = _render(moved, size)
        darkening = 1 - np.exp(-look["strength"] * contrast[t] * ndimage.gaussian_filter(path, 0.6) / max(width, 1.0))
        image = background * (1 - 0.8 * darkening)
        if look["blur"] > 0.05:
            image = ndimage.gaussian_filter(image, look["blur"])
        image = np.clip(image + look["noise"] * rng.standard_normal(image.shape), 0, 1) ** look["gamma"]
        if look["invert"]:
            image = 1 - image
        rgb = np.clip(look["bias"] + look["gain"] * image[..., None], 0, 1)
        if fov is not None:
            rgb[~fov] = rng.uniform(0, 0.04)
            mask = mask & fov
        frames.append(np.rint(rgb * 255).astype(np.uint8))
        masks.append(mask)
    return frames, masks


def _draw(task):
    """One pool entry, from its own seed (so the pool is the same whatever the number of processes)."""
    seed, index, clip, sizes = task
    rng = np.random.default_rng([seed, index])
    size = int(rng.integers(sizes[0] // 32, sizes[1] // 32 + 1)) * 32
    return vessel_video(rng, clip, size)


class SyntheticPool(torch.utils.data.Dataset):
    """`count` synthetic videos of `clip` frames, drawn once (in `processes` processes), then served
    under one of 8 flips / 90-degree rotations: item (index, view) -> a sample dict, or a list of them
    for clips. Drawing is the slow part (~0.3 s a frame), so a pool reused under 8 views stands in for
    an endless stream at a fraction of the cost."""

    def __init__(self, seed, count, clip=1, sizes=(192, 512), processes=1):
        tasks = [(seed, i, clip, sizes) for i in range(count)]
        if processes > 1:
            import multiprocessing
            with multiprocessing.get_context("fork").Pool(processes) as pool:
                self.videos = pool.map(_draw, tasks, chunksize=4)
        else:
            self.videos = [_draw(t) for t in tasks]
        self.clip = clip

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, item):
        index, view = item
        frames, masks = self.videos[index]

        def orient(a):
            a = np.rot90(a, view % 4)
            return np.ascontiguousarray(a[:, ::-1] if view >= 4 else a)
        samples = [dict(image=Image.fromarray(orient(f)), mask=orient(m), key=None) for f, m in zip(frames, masks)]
        return samples if self.clip > 1 else samples[0]


def schedule(seed, count, draws):
    """The (index, view) of every sample the loop will see, fixed by `seed`."""
    rng = np.random.default_rng(seed)
    return list(zip(rng.integers(0, count, draws).tolist(), rng.integers(0, 8, draws).tolist()))


# ----------------------------------------------------------------------------- losses of SAM2's heads

def multimask_loss(low_res_multimasks, ious, masks, sam_size):
    """Dice + BCE on each of SAM2's three masks (at the frames' size) + MSE of the IoU head against
    each mask's IoU, as SAM2 trains its IoU head. low_res_multimasks (B, 3, h, w), ious (B, 3)."""
    total, dice_terms = 0.0, []
    for b, target in enumerate(masks):
        logits = upsample_logits(low_res_multimasks[b, :, None], target.shape, sam_size)  # (3, H, W)
        t = target.float()[None].expand_as(logits)
        dice = dice_loss(logits, t)
        total = total + (dice + sigmoid_bce(logits, t)).mean()
        with torch.no_grad():
            pred = logits > 0
            inter = (pred & t.bool()).flatten(1).sum(1)
            union = (pred | t.bool()).flatten(1).sum(1).clamp(min=1)
        total = total + F.mse_loss(ious[b].float(), inter / union)
        dice_terms.append(1 - dice.detach().min())
    return total / len(masks), torch.stack(dice_terms).mean()


def sam_heads(model, seg_embeds, fpn):
    """SAM2's decoder on FPN maps that carry gradients (the encoder trains here): all outputs."""
    sam = model.grounding_encoder.sam2_model
    decoder = sam.sam_mask_decoder
    high_res = [decoder.conv_s0(fpn[0]), decoder.conv_s1(fpn[1])]
    pix = fpn[-1] + sam.no_mem_embed.reshape(1, -1, 1, 1)
    return sam._forward_sam_heads(pix, high_res_features=high_res, multimask_output=True,
                                  language_embd=seg_embeds[:, None, :])


# ----------------------------------------------------------------------------- the two phases

def lr_at(step, steps, peak, warmup=100):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def image_phase(model, tokenizer, steps, batch_size, lr, device, seed, workers, pool_size, log):
    """Every part end to end on single synthetic images (Dice + BCE, IoU MSE, answer CE)."""
    processor = Sa2VAProcessor(describe(model, tokenizer), tokenizer)
    pool = SyntheticPool(seed, pool_size, processes=workers)
    log(f"image phase: {len(pool)} synthetic images drawn")
    loader = torch.utils.data.DataLoader(pool, batch_size, sampler=schedule(seed, len(pool), steps * batch_size),
                                         collate_fn=processor, num_workers=workers)
    memory = {n for n, _ in model.named_parameters() if memory_parameter(n)}
    params = [p for n, p in model.named_parameters() if n not in memory]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sam = model.grounding_encoder
    model.train()
    t0 = time.time()
    for step, batch in zip(range(steps), loader):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        masks = [m.to(device) for m in batch["masks"]]
        batch = move_batch(batch, device)
        seg_hidden, text = llm_forward(model, batch, with_text_logits=True)
        fpn = sam.sam2_model.image_encoder(sam.preprocess_image(batch["g_pixel_values"].float()))["backbone_fpn"]
        outputs = sam_heads(model, model.text_hidden_fcs(seg_hidden), fpn)
        seg, dice = multimask_loss(outputs[0], outputs[2], masks, sam.sam2_model.image_size)
        answer = text_loss(*text)
        loss = seg + answer
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"image phase {step}/{steps}: loss {loss.item():.4f} dice {dice.item():.4f} "
                f"answer CE {answer.item():.4f} ({time.time() - t0:.0f} s)")


def memory_parameter(name):
    return any(k in name for k in ("memory_attention", "memory_encoder", "maskmem_tpos_enc", "obj_ptr_proj",
                                   "no_obj_ptr"))


def video_phase(model, tokenizer, steps, clip, lr, device, seed, workers, pool_size, log):
    """SAM2's memory on synthetic clips: frame 0 prompted by [SEG] (its mask encoded into memory),
    frames 1.. tracked from memory alone (no prompt), Dice + BCE on the tracked frames. Only the
    memory modules and object pointers train; everything phase 1 made stays as it is."""
    processor = Sa2VAProcessor(describe(model, tokenizer), tokenizer)
    pool = SyntheticPool(seed + 1, pool_size, clip=clip, sizes=(192, 384), processes=workers)
    log(f"video phase: {len(pool)} synthetic clips of {clip} frames drawn")
    loader = torch.utils.data.DataLoader(pool, None, sampler=schedule(seed + 1, len(pool), steps), collate_fn=processor,
                                         num_workers=workers)
    params = [p for n, p in model.named_parameters() if memory_parameter(n)]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sam = model.grounding_encoder.sam2_model
    model.train()
    t0 = time.time()
    for step, batch in zip(range(steps), loader):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        masks = [m.to(device) for m in batch["masks"]]
        batch = move_batch(batch, device)
        with torch.no_grad():
            seg_hidden, _ = llm_forward(model, batch)
            seg = model.text_hidden_fcs(seg_hidden[:1])  # the first frame's prompt, as the video path uses
            backbone = sam.forward_image(model.grounding_encoder.preprocess_image(batch["g_pixel_values"].float()))
            _, feats, pos, sizes = sam._prepare_backbone_features(backbone)
        output = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        loss, dice = 0.0, []
        for t in range(len(masks)):
            current = [f[:, t:t + 1] for f in feats]
            out = sam.track_step(t, t == 0, current, [p[:, t:t + 1] for p in pos], sizes, None, None, output,
                                 len(masks), language_embd=seg[:, None] if t == 0 else None)
            output["cond_frame_outputs" if t == 0 else "non_cond_frame_outputs"][t] = out
            if t > 0:
                logits = F.interpolate(out["pred_masks_high_res"], size=masks[t].shape, mode="bilinear",
                                       align_corners=False)[0, 0]
                d = dice_loss(logits, masks[t].float())
                loss = loss + d + sigmoid_bce(logits, masks[t].float())
                dice.append(1 - d.detach())
        loss = loss / (len(masks) - 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"video phase {step}/{steps}: loss {loss.item():.4f} tracked dice {torch.stack(dice).mean().item():.4f} "
                f"({time.time() - t0:.0f} s)")
    for p in model.parameters():
        p.requires_grad_(True)


def pretrain(args, log=print):
    """A fresh tiny model (random init, seed) -> pretrained (model, tokenizer)."""
    torch.manual_seed(args.seed)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    tokenizer = build_tokenizer()
    model = TinySa2VAChatModel(TinySa2VAConfig(llm_config=dict(vocab_size=len(tokenizer)),
                                               sam_config=dict(image_size=args.sam_size)))
    model.preparing_for_generation(tokenizer)
    model.to(args.device)
    image_phase(model, tokenizer, args.image_steps, args.batch_size, args.lr, args.device, args.seed, args.workers,
                args.image_pool, log)
    if args.video_steps:
        video_phase(model, tokenizer, args.video_steps, args.clip, args.lr, args.device, args.seed, args.workers,
                    args.video_pool, log)
    model.init_prediction_config = False
    return model.cpu().eval(), tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=WEIGHTS_DIR, help="folder to write model.safetensors + pretrain.json into")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the data streams")
    p.add_argument("--image_steps", type=int, default=1500, help="optimizer steps of phase 1 (single images)")
    p.add_argument("--batch_size", type=int, default=16, help="images per phase-1 step")
    p.add_argument("--video_steps", type=int, default=500, help="optimizer steps of phase 2 (one clip each)")
    p.add_argument("--clip", type=int, default=6, help="frames per phase-2 clip")
    p.add_argument("--image_pool", type=int, default=2048, help="synthetic images drawn for phase 1 (each seen in 8 views)")
    p.add_argument("--video_pool", type=int, default=256, help="synthetic clips drawn for phase 2")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warm-up, cosine to 5%%)")
    p.add_argument("--sam_size", type=int, default=SAM_SIZE, help="SAM2 input size of the built model")
    p.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1),
                   help="processes drawing the pools and collating batches")
    p.add_argument("--deterministic", action="store_true", help="torch deterministic algorithms (slower on GPU)")
    return p.parse_args(argv)


def main(args):
    t0 = time.time()
    model, _ = pretrain(args)
    os.makedirs(args.out, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    tmp = os.path.join(args.out, "model.safetensors.tmp")
    save_file(state, tmp, metadata={"recipe_version": str(RECIPE_VERSION)})
    os.replace(tmp, os.path.join(args.out, "model.safetensors"))
    recipe = dict(recipe_version=RECIPE_VERSION, args={k: v for k, v in vars(args).items() if k != "out"},
                  parameters=sum(v.numel() for v in state.values()), wall_time_s=round(time.time() - t0, 1),
                  torch=torch.__version__, device_name=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu")
    with open(os.path.join(args.out, "pretrain.json"), "w") as f:
        json.dump(recipe, f, indent=1)
    print(f"pretrained tiny Sa2VA ({recipe['parameters'] / 1e6:.2f}M parameters) written to {args.out} "
          f"in {recipe['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main(parse_args())
