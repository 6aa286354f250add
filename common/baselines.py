"""Baselines for the stage table: no learning (Frangi vesselness), a specialist trained on the
same split (a plain U-Net), and the ceiling of SAM2's mask grid. They answer the first questions a
reviewer asks of a fine-tuned vision-language segmenter: does it beat a plain U-Net trained on the
same frames, and how much does its mask resolution leave it?

Frangi (`fit_frangi`, `frangi_probabilities`): scikit-image's Frangi vesselness on the green
channel (the grey value of a grey frame; the best-contrast channel of a colour fundus photo).
Nothing is learned; a small search on the TRAINING frames only picks
    polarity          dark vessels (X-ray contrast, fundus) or bright ones,
    sigmas            one of FRANGI_SIGMA_SETS (px; thin, medium, thick vessels),
    dark background   off, or: pixels darker than 10% of the frame's 99th-percentile brightness are
                      background, and vesselness within 2 x the largest sigma of them is zeroed
                      (the edge of a fundus field of view or a collimator answers like a vessel),
    threshold         on the vesselness, from a log grid (FRANGI_THRESHOLDS),
by the mean Dice over at most `max_frames` evenly spaced training frames. The fitted threshold
maps to the evaluation threshold, so thresholding the returned "probabilities" at it gives the
fitted mask.

U-Net (`UNet`, `train_unet`): the standard architecture (Ronneberger et al. 2015): 4 levels down
(max-pool) and 4 up (transposed convolution, skip concatenation), two 3x3 conv + BatchNorm + ReLU
per level, base width 32 (7.8M parameters) in the strong preset. Trained from scratch with
Dice + BCE (common.losses), AdamW and the stages' warm-up + cosine schedule (common.engine) on
random crops of exactly the frames the stages train on (common.data.build_splits with the same
flags), with flips and 90-degree rotations. Deterministic for a seed (the batch of step n is
drawn from a generator seeded by (seed, n)), resumable like the stages (common.engine's trainer
state: weights, optimizer, schedule, RNGs, BatchNorm statistics), validated on the val split.
Frames of any size: inference pads to a multiple of 16 and crops back.

    python -m common.baselines --data /data/vessels --output outputs/unet --preset strong

writes `<output>/unet_<timestamp>/`: best/ and final/ (unet.safetensors + unet.json),
training_info.json, train.log, metrics.jsonl, checkpoints/ (for --resume).

Grid (`mask_grid_probabilities`): Sa2VA's masks are SAM2's low-res logits, a (S/4) x (S/4) grid
of the S x S SAM2 input (S = 1024 released: 256 x 256), upsampled to the frame. The ground truth
itself, area-averaged onto that grid, upsampled the same way and cut where it best matches each
frame, shows what the grid leaves of thin vessels: about the best any Sa2VA can score on the
frames (an estimate, not a strict bound: a model's logits need not be an area average).

`evaluate.py --baselines frangi,unet,grid [--unet RUN]` scores them beside the stages (README,
"Baselines").
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from common import cli
from common.data import frame_mask, read_image, splits_from_args
from common.engine import (RunLogger, build_engine, load_trainer_state, log_train_window, make_run_dir,
                           save_trainer_state, seed_everything)
from common.files import atomic_folder, write_json
from common.forward import upsample_logits
from common.losses import segmentation_loss
from common.rewards import dice, overlap_metrics
from common.sa2va import CheckpointError

# ----------------------------------------------------------------------------- Frangi (no learning)

FRANGI_SIGMA_SETS = ((1, 2, 3), (2, 3, 4, 5), (3, 5, 7, 9))  # px: thin (fundus), medium, thick (X-ray) vessels
FRANGI_THRESHOLDS = np.geomspace(1e-5, 1.0, 121)  # vesselness is in [0, 1]; the grid is log-spaced
DARK_BACKGROUND = 0.1  # of the frame's 99th-percentile brightness: darker pixels are background
FRANGI_FIT_FRAMES = 16  # training frames the search looks at (evenly spaced): Frangi costs ~0.2 s/sigma/MP


def dark_background(image, sigmas):
    """Bool (H, W): background darker than DARK_BACKGROUND x the 99th percentile, grown by 2 x max sigma."""
    from scipy import ndimage
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    dark = grey < DARK_BACKGROUND * np.percentile(grey, 99)
    return ndimage.binary_dilation(dark, iterations=int(2 * max(sigmas))) if dark.any() else dark


def vesselness(image, sigmas, dark_vessels=True):
    """scikit-image's Frangi vesselness (H, W) of the green channel (the grey value of a grey frame)."""
    from skimage.filters import frangi
    green = np.asarray(image.convert("RGB"), dtype=np.float32)[..., 1] / 255.0
    return frangi(green, sigmas=sigmas, black_ridges=dark_vessels).astype(np.float32)


def frangi_probabilities(image, params, threshold=0.5):
    """Float32 (H, W) in [0, 1] from fitted `params` (fit_frangi): > `threshold` exactly where the
    vesselness exceeds the fitted threshold (probability = threshold x vesselness / fitted threshold)."""
    v = vesselness(image, params["sigmas"], params["dark_vessels"])
    if params["dark_background"]:
        v[dark_background(image, params["sigmas"])] = 0.0
    return np.clip(threshold * v / params["threshold"], 0.0, 1.0).astype(np.float32)


def _dice_per_threshold(v, mask):
    """Dice of (v > t) vs mask for every t in FRANGI_THRESHOLDS, from two cumulative histograms."""
    edges = np.concatenate([FRANGI_THRESHOLDS, [np.inf]])
    above = lambda x: np.cumsum(np.histogram(x, bins=edges)[0][::-1])[::-1]  # count of x > t (right-open bins)
    tp, predicted = above(v[mask]), above(v)
    denominator = predicted + mask.sum()
    return np.where(denominator > 0, 2.0 * tp / np.maximum(denominator, 1), 1.0)


def fit_frangi(frames, max_frames=FRANGI_FIT_FRAMES, log=print):
    """Search polarity x sigmas x dark background x threshold by mean Dice over training `frames`
    (common.data.Frame; at most `max_frames`, evenly spaced). Returns the params dict."""
    if not frames:
        raise ValueError("Frangi needs training frames to choose its polarity and threshold; the train split is empty")
    picked = [frames[i] for i in np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int))]
    scores = {}
    for frame in tqdm(picked, desc="fitting Frangi", leave=False):
        image, mask = read_image(frame.image_path), frame_mask(frame)
        for sigmas in FRANGI_SIGMA_SETS:
            background = dark_background(image, sigmas)
            for dark_vessels in (True, False):
                v = vesselness(image, sigmas, dark_vessels)
                for masked in (False, True):
                    if masked:
                        v[background] = 0.0
                    scores.setdefault((sigmas, dark_vessels, masked), []).append(_dice_per_threshold(v, mask))
    (sigmas, dark_vessels, masked), best = max(((k, np.mean(s, axis=0)) for k, s in scores.items()),
                                              key=lambda kv: kv[1].max())
    params = dict(sigmas=list(sigmas), dark_vessels=dark_vessels, dark_background=masked,
                  threshold=float(FRANGI_THRESHOLDS[int(best.argmax())]), train_mean_dice=float(best.max()),
                  fit_frames=[f.key for f in picked])
    log(f"Frangi fitted on {len(picked)} training frames: sigmas {params['sigmas']}, "
        f"{'dark' if dark_vessels else 'bright'} vessels, dark background {'masked' if masked else 'kept'}, "
        f"threshold {params['threshold']:.3g} -> train Dice {params['train_mean_dice']:.4f}")
    return params


# ----------------------------------------------------------------------------- U-Net (same split)

# Presets: `strong` is the standard U-Net of the README's DRIVE numbers (a GPU run); `small` is a
# quarter-cost version for CPU smoke runs (run.sh quick). Every field can be overridden by its flag.
UNET_PRESETS = {
    "strong": dict(width=32, crop=256, batch_size=8, steps=3000, lr=1e-3),
    "small": dict(width=8, crop=64, batch_size=8, steps=200, lr=3e-3),
}
DEPTH = 4  # levels down and up: inputs are padded to a multiple of 2**DEPTH
UNET_FILE, UNET_META = "unet.safetensors", "unet.json"
STAGE = "unet"


def conv_block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """(B, 3, H, W) normalised image -> (B, 1, H, W) vessel logits; H, W multiples of 2**DEPTH."""

    def __init__(self, width=32, in_channels=3, depth=DEPTH):
        super().__init__()
        widths = [width * 2 ** i for i in range(depth + 1)]  # 32 64 128 256 512
        self.down = nn.ModuleList([conv_block(in_channels, widths[0])] +
                                  [conv_block(widths[i], widths[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))])
        self.merge = nn.ModuleList([conv_block(2 * widths[i], widths[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


def normalise(image):
    """Float32 (3, H, W) tensor: each channel of a uint8 (H, W, 3) array standardised over the frame."""
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)
    return (x - x.mean(dim=(1, 2), keepdim=True)) / (x.std(dim=(1, 2), keepdim=True) + 1.0)


def load_frames(frames, device):
    """[(image, mask)] of common.data.Frame `frames`, held on `device`: image the (3, H, W) float32
    `normalise`d frame (computed once, on the CPU), mask its (H, W) bool target. Memory: 13 bytes a
    pixel (20 DRIVE frames of 584 x 565: 86 MB; 1000 frames of 1024 x 1024: 13.6 GB)."""
    pairs = []
    for f in tqdm(frames, desc="loading frames", leave=False):
        image, mask = np.asarray(read_image(f.image_path)), frame_mask(f)
        if image.shape[:2] != mask.shape:
            raise ValueError(f"{f.mask_path or f.image_path}: mask {mask.shape} differs from image {image.shape[:2]}")
        pairs.append((normalise(image).to(device), torch.from_numpy(mask).to(device)))
    return pairs


@torch.no_grad()
def segment(model, x):
    """Float32 (H, W) vessel probabilities, on x's device, of one normalised (3, H, W) frame: padded
    (reflect) to a multiple of 2**DEPTH, segmented whole, cropped back."""
    h, w = x.shape[-2:]
    m = 2 ** DEPTH
    pad_h, pad_w = -h % m, -w % m
    x = F.pad(x[None], (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > max(pad_h, pad_w) else "constant")
    was_training = model.training
    model.eval()
    probs = model(x)[0, 0, :h, :w].float().sigmoid()
    model.train(was_training)
    return probs


GRID_CUTS = torch.linspace(0.02, 0.98, 49)  # cuts of a cell's vessel coverage tried for the grid's ceiling


def mask_grid_probabilities(mask, sam_size, threshold=0.5):
    """Float32 (H, W) map in [0, 1] of an (H, W) ground-truth mask passed through SAM2's mask grid:
    resized to the S x S input as the frame is, area-averaged onto the (S/4) x (S/4) grid of its
    low-res logits, upsampled back as those are (`common.forward.upsample_logits`). A model picks
    its logits: a cell a 1 px vessel crosses need not read 0.25 < 0.5. So the map is cut where it
    best matches this mask (GRID_CUTS, by Dice) and rescaled so that it exceeds `threshold` exactly
    there (piecewise linear, monotone)."""
    mask = torch.as_tensor(mask).bool()
    resized = F.interpolate(mask.float()[None, None], size=(sam_size, sam_size), mode="bilinear", align_corners=False)
    coverage = upsample_logits(F.avg_pool2d(resized, 4), mask.shape[-2:], sam_size)[0]
    cut = float(GRID_CUTS[int(torch.cat([dice(coverage > c, mask) for c in GRID_CUTS]).argmax())])
    below = torch.minimum(coverage * (threshold / cut), torch.tensor(threshold))  # <= threshold, never above it
    above = threshold + (coverage - cut) * ((1 - threshold) / (1 - cut))
    return torch.where(coverage > cut, above, below)


def unet_probabilities(model, image, device=None):
    """Float32 (H, W) CPU vessel probabilities of a PIL image (`segment` on the model's device)."""
    device = device or next(model.parameters()).device
    return segment(model, normalise(np.asarray(image.convert("RGB"))).to(device)).cpu()


class CropSampler:
    """Training batches of random crops with flips and 90-degree rotations. Batch n depends only on
    (seed, n), so a resumed run sees the same batches. The frames are normalised once and held on
    `device` (`load_frames`); only the crop offsets, flips and rotations are drawn per batch, from a
    CPU generator, and the crops are cut, flipped and rotated where the frames are: a batch is the
    same bits on every device (tests/test_baselines.py checks it against the per-sample
    normalise-crop-flip-rotate of the first version), with no pixel work on the host and no copy to a GPU."""

    def __init__(self, frames, crop, batch_size, seed, flips=True, rot90=True, device="cpu"):
        self.frames = load_frames(frames, device)
        self.crop, self.batch_size, self.seed, self.flips, self.rot90 = crop, batch_size, seed, flips, rot90

    def batch(self, step):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        rand = lambda n: int(torch.randint(n, (1,), generator=g))
        c, images, masks = self.crop, [], []
        for _ in range(self.batch_size):
            x, y = self.frames[rand(len(self.frames))]
            y = y[None]
            if c:  # a crop larger than the frame gets the frame, zero-padded (0 = the frame's mean)
                h, w = x.shape[-2:]
                top, left = rand(max(1, h - c + 1)), rand(max(1, w - c + 1))
                x, y = x[:, top:top + c, left:left + c], y[:, top:top + c, left:left + c]
                if x.shape[-2:] != (c, c):
                    x, y = (F.pad(t, (0, c - t.shape[2], 0, c - t.shape[1])) for t in (x, y))
            if self.flips and rand(2):
                x, y = x.flip(-1), y.flip(-1)
            if self.rot90 and (k := rand(4)):
                x, y = torch.rot90(x, k, (1, 2)), torch.rot90(y, k, (1, 2))
            images.append(x)
            masks.append(y)
        if not c:  # whole frames: pad the batch to its largest frame, a multiple of 2**DEPTH
            m = 2 ** DEPTH
            h = -(-max(t.shape[1] for t in images) // m) * m
            w = -(-max(t.shape[2] for t in images) // m) * m
            images, masks = ([F.pad(t, (0, w - t.shape[2], 0, h - t.shape[1])) for t in ts] for ts in (images, masks))
        return torch.stack(images), torch.stack(masks).float()


def save_unet(model, out_dir, meta):
    """best/ or final/: unet.safetensors + unet.json, written whole and swapped in, so a killed run
    never leaves a half checkpoint (as common.lora.save_stage)."""
    with atomic_folder(out_dir, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  os.path.join(tmp, UNET_FILE))
        write_json(os.path.join(tmp, UNET_META), meta)


def unet_checkpoint(path):
    """The U-Net checkpoint folder (holding unet.json) of a run folder or of its best/ or final/;
    CheckpointError naming `path` when it is none (a Sa2VA stage checkpoint included)."""
    for candidate in (path, os.path.join(path, "best")):
        if os.path.isfile(os.path.join(candidate, UNET_META)):
            return candidate
    if any(os.path.isfile(os.path.join(path, *sub, "stage.json")) for sub in ((), ("best",))):
        raise CheckpointError(f"{path}: a Sa2VA stage checkpoint (stage.json), not a U-Net baseline; pass it to "
                              f"evaluate.py --checkpoints, and a `python -m common.baselines` run folder to --unet")
    raise CheckpointError(f"{path}: not a U-Net run folder (no {UNET_META} in it or in its best/); train one with "
                          f"`python -m common.baselines --data ... --output ...`")


def load_unet(path, device="cpu"):
    """(model in eval mode, meta) of a U-Net run folder or checkpoint folder."""
    folder = unet_checkpoint(path)
    with open(os.path.join(folder, UNET_META)) as f:
        meta = json.load(f)
    model = UNet(width=meta["width"])
    model.load_state_dict(load_file(os.path.join(folder, UNET_FILE)))
    return model.to(device).eval(), dict(meta, checkpoint=folder)


def validate_unet(model, pairs, threshold):
    """Mean Dice/IoU/precision/recall at `threshold` (the stages' validation numbers) over `pairs`,
    `load_frames`' (image, mask) frames on the model's device (loaded once per run, not per validation)."""
    scores = [overlap_metrics(segment(model, x) > threshold, y) for x, y in pairs]
    return {f"mean_{k}": float(torch.cat([s[k] for s in scores]).mean()) for k in scores[0]} | dict(samples=len(pairs))


def versions():
    """What the run depended on (common.engine.versions would import transformers and peft: ~10 s)."""
    import platform
    import skimage
    return dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
                scikit_image=skimage.__version__)


def parse_args(argv=None):
    p = cli.Parser(prog="python -m common.baselines", description=__doc__.split("\n")[0],
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_data_args(p)  # the stages' own data flags and defaults, so the split is theirs
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the batches")
    g = p.add_argument_group("U-Net (preset values unless given)")
    g.add_argument("--preset", choices=("auto",) + tuple(UNET_PRESETS), default="auto",
                   help="strong: width 32, 256 px crops, batch 8, 3000 steps, lr 1e-3; small: width 8, 96 px crops, "
                        "300 steps, lr 3e-3 (CPU smoke runs); auto = strong on a GPU, small on a CPU")
    g.add_argument("--width", type=int, default=None, help="channels of the first level (doubled per level)")
    g.add_argument("--crop", type=int, default=None, help="random crop size in px (0 = whole frames)")
    g.add_argument("--batch_size", type=int, default=None, help="crops per step")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps")
    g.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate")
    g.add_argument("--flips", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flips")
    g.add_argument("--rot90", action=argparse.BooleanOptionalAction, default=True, help="random 90-degree rotations")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--warmup_ratio", type=float, default=0.03, help="share of steps with linear warm-up")
    g.add_argument("--grad_clip", type=float, default=1.0, help="gradient norm clip (0 = off)")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast on a GPU")
    g = p.add_argument_group("run")
    g.add_argument("--output", required=True, help="the run is written to <output>/unet_<timestamp>/")
    g.add_argument("--eval_every", type=int, default=0, help="steps between validations and best/ (0 = 10 per run)")
    g.add_argument("--log_every", type=int, default=50, help="steps between log lines")
    g.add_argument("--resume", default=None, help="run folder of a killed run to continue from its last checkpoint")
    return cli.parse(p, argv)


def resolve_preset(args, device):
    """Fill the U-Net flags left unset from the preset (auto: strong on a GPU, small on a CPU)."""
    args.preset = args.preset if args.preset != "auto" else ("strong" if device.type == "cuda" else "small")
    for k, v in UNET_PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.grad_accum = 1  # what common.engine.build_engine reads
    return args


def train_unet(args):
    """Train a U-Net on the stages' train split; returns the run folder (see the module docstring)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = resolve_preset(args, device)
    seed_everything(args.seed)
    if device.type == "cuda":  # same seed -> same weights on a GPU too: cuDNN's fastest backward algorithms of
        # Conv2d and ConvTranspose2d accumulate with atomics (PyTorch, "Reproducibility"); benchmark mode could
        # pick another deterministic algorithm, with other rounding, in the next run
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    run_dir = make_run_dir(args.output, STAGE, args.resume)
    logger = RunLogger(run_dir)
    train_frames, val_frames = splits_from_args(args)
    if not train_frames:
        raise SystemExit(f"{args.data}: the train split is empty; nothing to train the U-Net on")
    sampler = CropSampler(train_frames, args.crop, args.batch_size, args.seed, args.flips, args.rot90, device)
    val_pairs = load_frames(val_frames, device)
    model = UNet(args.width)
    n_params = sum(p.numel() for p in model.parameters())
    engine = build_engine(model, list(model.parameters()), args, args.steps, device, False, 1)
    eval_every = args.eval_every or max(1, args.steps // 10)
    logger.line(f"run folder: {run_dir}\nU-Net ({args.preset}): width {args.width}, {n_params:,} parameters; "
                f"{len(train_frames)} train / {len(val_frames)} val frames; {args.steps} steps of {args.batch_size} "
                f"x {args.crop or 'whole'} px crops, flips {args.flips}, rot90 {args.rot90}, lr {args.lr:g}; {device}")

    state = dict(step=0, best_dice=-1.0, best_step=None, history=[])
    if args.resume:
        state = load_trainer_state(engine, run_dir, state, logger.line)
        for name, buffer in model.named_buffers():  # BatchNorm statistics: the engine saves parameters only
            buffer.copy_(state["buffers"][name])

    def meta(step, metrics):
        return dict(baseline="unet", width=args.width, depth=DEPTH, parameters=n_params, step=step, metrics=metrics,
                    data=args.data, train_frames=[f.key for f in train_frames], args=vars(args))

    t_start, window, t_window = time.time(), [], time.time()
    model.train()
    while state["step"] < args.steps:
        images, masks = sampler.batch(state["step"])
        with engine.autocast():
            logits = model(images.to(device))
        losses = segmentation_loss(list(logits[:, 0].float()), list(masks[:, 0].to(device)))
        engine.backward(losses["loss"])
        engine.step()
        state["step"] += 1
        window.append({k: v.detach() for k, v in losses.items()})  # read at the log line: no GPU sync per step
        if state["step"] % args.log_every == 0 or state["step"] == args.steps:
            window = [{k: float(v) for k, v in terms.items()} for terms in window]
            log_train_window(logger, state["step"], f"step {state['step']}/{args.steps}", window,
                             time.time() - t_window, len(window), len(window) * args.batch_size, engine.get_lr()[0])
            window, t_window = [], time.time()
        if state["step"] % eval_every == 0 or state["step"] == args.steps:
            val = validate_unet(model, val_pairs, args.threshold) if val_pairs else None
            state["history"].append(dict(step=state["step"], **(val or {})))
            if val:
                logger.record(state["step"], {f"val/{k}": v for k, v in val.items()})
                logger.line(f"step {state['step']} val: dice {val['mean_dice']:.4f} recall {val['mean_recall']:.4f} "
                            f"precision {val['mean_precision']:.4f}")
            # without val frames, best/ is the latest model
            if val is None or val["mean_dice"] > state["best_dice"]:
                state["best_dice"], state["best_step"] = (val["mean_dice"] if val else -1.0), state["step"]
                save_unet(model, os.path.join(run_dir, "best"), meta(state["step"], val))
            state["buffers"] = {n: b.detach().cpu().clone() for n, b in model.named_buffers()}  # restored by --resume
            save_trainer_state(engine, run_dir, state)

    final = state["history"][-1] if state["history"] else {}
    save_unet(model, os.path.join(run_dir, "final"), meta(state["step"], final))
    write_json(os.path.join(run_dir, "training_info.json"), dict(
        stage=STAGE, args=vars(args), parameters=n_params, history=state["history"], best_step=state["best_step"],
        best_val_dice=state["best_dice"], wall_time_s=time.time() - t_start, device=str(device), versions=versions(),
        train_frames=[f.key for f in train_frames], val_frames=[f.key for f in val_frames],
        checkpoints=dict(best=os.path.join(run_dir, "best"), final=os.path.join(run_dir, "final"))))
    logger.line(f"done: best val dice {state['best_dice']:.4f} (step {state['best_step']}) in "
                f"{time.time() - t_start:.0f} s; outputs in {run_dir}")
    logger.close()
    return run_dir


if __name__ == "__main__":
    train_unet(parse_args())
