"""Inference benchmark: batched forward-path scoring (evaluate.py / mine_hard.py) vs the
released per-image `predict_forward` (generate), on the same GPU and the same frames.

    python tests/perf/bench_infer.py --model /tmp/m4b --bf16 --frames 64 --batch_size 16
    python tests/perf/bench_infer.py --model tiny --frames 8 --batch_size 4       # CPU smoke run

Both paths start from PIL images and end with binary masks at the original size, so
preprocessing is inside both timings. The batched path is the one evaluate.py runs: a
DataLoader with workers feeding the processor, forward_batch under bf16 autocast, masks at
sigmoid > 0.5. The released path is predict_forward one image at a time (its generate()
decodes the answer token by token). Masks are compared frame by frame (pixels that differ,
Dice between the two), so the speed-up is at equal masks. Prints a table and appends a
JSON line to --output.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "real"))
from check_parity import released_on, synthetic_frames  # noqa: E402
from common.evaluation import predict_probabilities  # noqa: E402
from common.forward import move_batch  # noqa: E402
from common.rewards import dice  # noqa: E402
from common.tiny import TinySa2VAChatModel  # noqa: E402
from common.sa2va import DEFAULT_ANSWER, DEFAULT_PROMPT, Sa2VAProcessor, describe, load_model  # noqa: E402
from common.video import segment_video  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny or a Sa2VA folder")
    p.add_argument("--frames", type=int, default=64, help="frames scored by each path")
    p.add_argument("--image_size", type=int, default=512, help="synthetic frame size")
    p.add_argument("--batch_size", type=int, default=16, help="batch of the forward path")
    p.add_argument("--num_workers", type=int, default=4, help="DataLoader workers of the forward path")
    p.add_argument("--bf16", action="store_true", help="bf16 weights (as the released inference runs)")
    p.add_argument("--max_new_tokens", type=int, default=0,
                   help="cap of predict_forward's generate() (0: the fixed answer's token count)")
    p.add_argument("--video_mode", action="store_true",
                   help="also time SAM2's video memory (common.video.segment_video) on the frames as one video, and "
                        "the released predict_forward(video=frames) with its masks compared frame by frame")
    p.add_argument("--output", default="bench_infer.jsonl", help="append one JSON line here")
    return p.parse_args(argv)


class Frames(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return dict(image=self.images[i], key=str(i), index=i)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare_masks(ours, released, our_probs=None):
    """Frames compared, identical, max pixels differing, min Dice; with our probabilities, the max
    |logit| of ours at a differing pixel (bf16 rounding at the threshold stays near 0)."""
    pairs = [(o, r) for o, r in zip(ours, released) if r is not None]
    out = dict(frames_compared=len(pairs), masks_identical=sum(bool((o == r).all()) for o, r in pairs),
               max_pixels_differing=max((int((o != r).sum()) for o, r in pairs), default=None),
               min_dice_between_paths=min((float(dice(torch.from_numpy(o), torch.from_numpy(r))) for o, r in pairs),
                                          default=None))
    if our_probs is not None and pairs:
        logits = [torch.logit(p.float().cpu(), eps=1e-7).abs()[torch.from_numpy(o != r)] for p, (o, r) in
                  zip(our_probs, pairs)]
        out["differing_pixels_max_abs_logit"] = max((float(x.max()) for x in logits if x.numel()), default=0.0)
    return out


def video_benchmark(model, tokenizer, processor, images, device, released_class, batch_size):
    """Video mode (the frames as one video) vs the released predict_forward(video=frames)."""
    def ours():
        with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext():
            return segment_video(model, processor, images, device, chunk=batch_size)

    def released():
        with released_on(model, device), torch.no_grad():
            return model.predict_forward(video=images, text=DEFAULT_PROMPT, tokenizer=tokenizer)
    # keep the released SAM2 logits (N, 1, S, S) of its timed run, to compare logits, not only masks
    enc, seen, results, out = model.grounding_encoder, [], {}, {}
    if released_class:
        infer = enc.language_embd_inference
        enc.language_embd_inference = lambda state, embd: seen.append(infer(state, embd)) or seen[-1]
    try:
        for name, run in (("video_mode", ours),) + ((("released_video", released),) if released_class else ()):
            run()  # warm-up: the same video, so every kernel and shape of the timed run has been seen
            sync(device)
            t0 = time.time()
            results[name] = run()
            sync(device)
            out[name + "_frames_per_s"] = len(images) / (time.time() - t0)
    finally:
        if released_class:
            del enc.language_embd_inference
    probs = results["video_mode"]
    if released_class:
        result = results["released_video"]
        masks = list(result["prediction_masks"][0]) if result["prediction_masks"] else [None] * len(images)
        out.update(released_video_answer=result["prediction"],
                   video_vs_released=compare_masks([(p > 0.5).cpu().numpy() for p in probs], masks, probs))
        if seen:  # logits from probabilities: exact for the small logits of random weights (clamped past |13.8|)
            h, w = images[0].size[::-1]
            theirs = torch.nn.functional.interpolate(seen[-1].float(), size=(h, w), mode="bilinear", align_corners=False)
            mine = torch.logit(torch.stack(probs).float().clamp(1e-6, 1 - 1e-6))
            out["video_vs_released"].update(logits_max_abs_diff=float((mine - theirs[:, 0]).abs().max()),
                                            logits_abs_median=float(theirs.abs().median()))
    return out


def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, tokenizer = load_model(args.model, dtype=dtype)
    model.to(device).eval()
    images, _ = synthetic_frames(args.frames, args.image_size, seed=3)
    processor = Sa2VAProcessor(describe(model, tokenizer), tokenizer, DEFAULT_PROMPT, DEFAULT_ANSWER)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None

    # forward path, as evaluate.py scores (first a warm-up batch)
    loader = torch.utils.data.DataLoader(Frames(images), args.batch_size, collate_fn=processor,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda")
    predict_probabilities(model, move_batch(processor([Frames(images)[0]]), device), autocast=autocast)
    sync(device)
    t0 = time.time()
    ours = []
    for batch in loader:
        ours += [(p > 0.5).cpu().numpy() for p in predict_probabilities(model, move_batch(batch, device),
                                                                         autocast=autocast)]
    sync(device)
    ours_s = time.time() - t0

    # released predict_forward, one image at a time (after its own one-time preparation)
    tiny = isinstance(model, TinySa2VAChatModel)  # CPU-capable stand-in: no released-code shims needed
    if not tiny:
        model.preparing_for_generation(tokenizer, torch_dtype=dtype)
        # A model with random weights never ends its answer: let generate() make as many tokens as
        # the fixed answer has (with its end-of-turn), which is what a trained model decodes
        answer_ids = processor.token_ids(1)[1]
        model.gen_config.max_new_tokens = args.max_new_tokens or len(answer_ids)
    with contextlib.nullcontext() if tiny else released_on(model, device), torch.no_grad():
        model.predict_forward(image=images[0], text=DEFAULT_PROMPT, tokenizer=tokenizer)
        sync(device)
        t0 = time.time()
        released, answers = [], []
        for image in images:
            result = model.predict_forward(image=image, text=DEFAULT_PROMPT, tokenizer=tokenizer)
            answers.append(result["prediction"])
            released.append(result["prediction_masks"][0][0] if result["prediction_masks"] else None)
        sync(device)
    released_s = time.time() - t0

    compared = compare_masks(ours, released)
    row = dict(model=args.model, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               frames=args.frames, image_size=args.image_size, batch_size=args.batch_size, bf16=args.bf16,
               forward_path_images_per_s=args.frames / ours_s, predict_forward_images_per_s=args.frames / released_s,
               speedup=released_s / ours_s, frames_with_released_mask=compared.pop("frames_compared"), **compared,
               answers=sorted(set(answers))[:3], torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    print(f"{'path':<34} {'images/s':>9}\n{'forward path, batch ' + str(args.batch_size):<34} "
          f"{row['forward_path_images_per_s']:9.1f}\n{'released predict_forward':<34} "
          f"{row['predict_forward_images_per_s']:9.1f}\nspeed-up {row['speedup']:.1f}x; masks identical on "
          f"{row['masks_identical']}/{row['frames_with_released_mask']} frames (max {row['max_pixels_differing']} "
          f"pixels differ, min Dice between paths {row['min_dice_between_paths']})", flush=True)
    if args.video_mode:
        row.update(video_benchmark(model, tokenizer, processor, images, device, not tiny, args.batch_size))
        print(f"{'video mode (SAM2 memory), one video':<34} {row['video_mode_frames_per_s']:9.1f}"
              + (f"\n{'released predict_forward(video=)':<34} {row['released_video_frames_per_s']:9.1f}; answer "
                 f"{row['released_video_answer']!r}; {row['video_vs_released']}" if not tiny else ""), flush=True)
    with open(args.output, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main(parse_args())
