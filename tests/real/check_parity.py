"""Check this project against the RELEASED Sa2VA inference on a real (or released-class tiny)
checkpoint: forward-path vs `predict_forward` parity, one SFT step, merged vs base+adapter.

(a) runs the released `predict_forward` on an image; (b) runs this project's forward path
with the answer text it generated (or "It is [SEG]."); (c) reports max |difference| of the
[SEG] hidden state, its projection and the full-size mask logits, and mask equality;
(d) one SFT step (LoRA medium + text_hidden_fcs + mask decoder, bf16 weights, gradient
checkpointing): time, peak memory, and that LoRA got a gradient; (e) with --merged and
--lora_weights: masks of the merged folder vs base + stage checkpoint, on both paths.

    python tests/real/check_parity.py --model /path/to/Sa2VA-1B                   # GPU, bf16
    python tests/real/check_parity.py --model DIR --device cpu --dtype fp32 --skip_step
    python tests/real/check_parity.py --model DIR --lora_weights RUN/best --merged MERGED

Needs the released code's imports (torchvision, timm, einops). On a CPU the released code's
hard-coded `.cuda()` calls are redirected to the CPU for the duration of the call. Prints a
JSON report and writes it to --out when given.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common.forward import decode_masks, forward_batch, full_size_logits, llm_forward, move_batch, \
    sam_image_features  # noqa: E402
from common.internvl import unwrap  # noqa: E402
from common.lora import load_stage  # noqa: E402
from common.losses import segmentation_loss  # noqa: E402
from common.sa2va import DEFAULT_ANSWER, DEFAULT_PROMPT, SEG, Sa2VAProcessor, describe, load_model  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="Sa2VA HF folder (released class) to check")
    p.add_argument("--image", default=None, help="RGB image; default: a synthetic 512 px angiography frame")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="user prompt, with <image>")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="weights of the parity run")
    p.add_argument("--skip_parity", action="store_true",
                   help="skip (a)-(c) (e.g. random release-sized weights, which never answer [SEG])")
    p.add_argument("--skip_step", action="store_true", help="skip (d), the SFT step")
    p.add_argument("--step_batch", type=int, default=4, help="images per SFT step in (d)")
    p.add_argument("--step_size", type=int, default=512, help="image size of the SFT step's synthetic frames")
    p.add_argument("--lora_weights", default=None, help="stage checkpoint for (e)")
    p.add_argument("--merged", default=None, help="merge_lora.py output of --model + --lora_weights, for (e)")
    p.add_argument("--out", default=None, help="write the JSON report here too")
    p.add_argument("--dump", default=None, help="save our and the released full-size logits (.npz), e.g. to compare "
                                                "the same weights across transformers versions")
    return p.parse_args(argv)


def synthetic_frames(n, size, seed=0):
    from common.synth import make_video
    images, masks, _ = make_video(np.random.default_rng(seed), n, size)
    return [Image.fromarray(i) for i in images], masks


@contextlib.contextmanager
def released_on(model, device):
    """The released predict_forward hard-codes `.cuda()` and a cuda SAM2 video state; on a CPU
    point both at the CPU while the call runs (on a GPU: nothing to do)."""
    if device.type == "cuda":
        yield
        return
    sam = model.grounding_encoder.sam2_model
    cuda, init_state = torch.Tensor.cuda, sam.init_state

    def cpu_state(images):
        state = init_state(images)
        state["device"] = state["storage_device"] = torch.device("cpu")
        return state
    torch.Tensor.cuda = lambda self, *a, **k: self
    sam.init_state = cpu_state
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda
        del sam.init_state


def released_predict(model, tokenizer, image, prompt, device, dtype):
    """predict_forward's text and masks, plus what it fed to SAM2: the [SEG] hidden state, its
    projection, the SAM2 pixels and the 1024 px logits resized to the image as it does."""
    seen = {}
    hook = model.text_hidden_fcs.register_forward_hook(
        lambda m, inp, out: seen.update(seg_hidden=inp[0].detach().float().cpu(), seg_embed=out.detach().float().cpu()))
    enc = model.grounding_encoder
    embed_fn, infer_fn = enc.get_sam2_embeddings, enc.language_embd_inference
    enc.get_sam2_embeddings = lambda images: seen.update(g_pixels=images.detach().clone()) or embed_fn(images)

    def infer(state, embd):
        out = infer_fn(state, embd)
        seen.setdefault("sam_logits", []).append(out.detach().float())
        return out
    enc.language_embd_inference = infer
    try:
        model.preparing_for_generation(tokenizer, torch_dtype=dtype)
        with released_on(model, device), torch.no_grad():
            result = model.predict_forward(image=image, text=prompt, tokenizer=tokenizer)
    finally:
        hook.remove()
        del enc.get_sam2_embeddings, enc.language_embd_inference
    w, h = image.size
    seen["logits"] = [F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)[0, 0].cpu()
                      for x in seen.get("sam_logits", [])]
    seen.update(prediction=result["prediction"], masks=[m[0] for m in result["prediction_masks"]])
    return seen


def answer_text(prediction, template, tokenizer):
    """The generated answer without the end-of-turn marker the processor appends itself."""
    text = prediction.strip()
    if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token):]
    for end in (template.get("SUFFIX", ""), tokenizer.eos_token or ""):
        if end and text.endswith(end):
            text = text[: -len(end)].rstrip()
    return text


@torch.no_grad()
def ours(model, tokenizer, image, prompt, answer, device, g_pixels=None):
    """This project's forward path on one image: [SEG] state, projection, full-size logits."""
    processor = Sa2VAProcessor(describe(model, tokenizer), tokenizer, prompt, answer)
    batch = move_batch(processor([dict(image=image, key="x")]), device)
    seg_hidden, _ = llm_forward(model, batch)
    seg_embed = model.text_hidden_fcs(seg_hidden.to(next(model.text_hidden_fcs.parameters()).dtype))
    fpn = sam_image_features(model, batch["g_pixel_values"] if g_pixels is None else g_pixels.to(device))
    logits = full_size_logits(model, decode_masks(model, seg_embed, fpn), batch["image_sizes"])[0]
    return dict(seg_hidden=seg_hidden.float().cpu(), seg_embed=seg_embed.float().cpu(), logits=logits.cpu())


def to_mask(logits):
    """The released threshold convention: sigmoid > 0.5 (not logits > 0: they differ where
    |logit| < ~3e-8, which sigmoid rounds to exactly 0.5 in float32)."""
    return (logits.float().sigmoid() > 0.5).numpy()


def max_diff(a, b):
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def causal_lm_last_hidden(model, tokenizer, image, prompt, answer, device):
    """max |our [SEG] state - the CausalLM's output_hidden_states[-1] at [SEG]|: the forward path
    runs the decoder without lm_head and reads `last_hidden_state`; this checks the two agree
    (post-norm) for the model's LLM class on this transformers version."""
    processor = Sa2VAProcessor(describe(model, tokenizer), tokenizer, prompt, answer)
    batch = move_batch(processor([dict(image=image, key="x")]), device)
    seg_hidden, _ = llm_forward(model, batch)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    vit = model.extract_feature(batch["pixel_values"].to(next(model.vision_model.parameters()).dtype))
    embeds = embeds.masked_scatter((batch["input_ids"] == model.img_context_token_id)[..., None], vit.to(embeds.dtype))
    out = unwrap(model.language_model)(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                           output_hidden_states=True, use_cache=False)
    return max_diff(seg_hidden[0], out.hidden_states[-1][0, batch["seg_index"][0]])


def parity(model, tokenizer, image, prompt, device, dtype):
    """(a)-(c): released predict_forward vs the forward path with the same answer text."""
    iface = describe(model, tokenizer)
    try:
        rel = released_predict(model, tokenizer, image, prompt, device, dtype)
    except Exception as e:  # e.g. InternLM2's remote code cannot generate on transformers >= 4.50
        rel = dict(prediction=None, masks=[], error=f"{type(e).__name__}: {e}"[:500])
    answer = answer_text(rel["prediction"] or DEFAULT_ANSWER, iface.template, tokenizer)
    report = dict(prediction=rel["prediction"], answer_used=answer, released_masks=len(rel["masks"]),
                  released_error=rel.get("error"),
                  causal_lm_hidden_max_diff=causal_lm_last_hidden(model, tokenizer, image, prompt,
                                                                  answer if SEG in answer else DEFAULT_ANSWER, device))
    if SEG not in answer:
        report["note"] = f"the model answered without {SEG}: no released mask; forward path run with {DEFAULT_ANSWER!r}"
        answer = DEFAULT_ANSWER
    mine = ours(model, tokenizer, image, prompt, answer, device)
    report["our_mask_pixels"] = int(to_mask(mine["logits"]).sum())
    if rel["masks"]:
        same_pixels = ours(model, tokenizer, image, prompt, answer, device, g_pixels=rel["g_pixels"])
        ours_mask = to_mask(mine["logits"])
        report.update(
            seg_hidden_max_diff=max_diff(mine["seg_hidden"][0], rel["seg_hidden"][0]),
            seg_embed_max_diff=max_diff(mine["seg_embed"][0], rel["seg_embed"][0]),
            logits_max_diff=max_diff(mine["logits"], rel["logits"][0]),
            logits_max_diff_same_sam_pixels=max_diff(same_pixels["logits"], rel["logits"][0]),
            released_mask_pixels=int(rel["masks"][0].sum()),
            masks_equal=bool((ours_mask == rel["masks"][0]).all()),
            mask_pixels_differing=int((ours_mask != rel["masks"][0]).sum()),
            mask_pixels_differing_same_sam_pixels=int((to_mask(same_pixels["logits"]) != rel["masks"][0]).sum()),
            # the released code resizes and thresholds in bf16 on a GPU: a pixel it labels otherwise
            # should lie within bf16 rounding of the threshold (|logit| small), not anywhere
            differing_pixels_max_abs_logit=float(mine["logits"][torch.from_numpy(ours_mask != rel["masks"][0])]
                                                 .abs().max()) if (ours_mask != rel["masks"][0]).any() else 0.0,
            logits_abs_median=float(mine["logits"].abs().median()))
    return report, rel, mine


def sft_step(args, device, steps=3):
    """(d) LoRA SFT steps through the forward path with bf16 weights and gradient checkpointing,
    set up exactly as train_sft.py does it (cli.setup_model)."""
    import train_sft
    from common import cli
    targs = train_sft.parse_args(["--model", args.model, "--data", "unused", "--grad_ckpt", "--lora_preset", "medium"])
    model, sft_processor, _ = cli.setup_model(targs, log=lambda *a: None)
    model.to(device=device, dtype=torch.bfloat16).train()
    params = [p for p in model.parameters() if p.requires_grad]
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    opt = torch.optim.AdamW(params, lr=1e-4)
    images, masks = synthetic_frames(args.step_batch, args.step_size, seed=1)
    processor = Sa2VAProcessor(sft_processor.iface, sft_processor.tokenizer, args.prompt, DEFAULT_ANSWER)
    batch = move_batch(processor([dict(image=i, key=str(k)) for k, i in enumerate(images)]), device)
    targets = [torch.from_numpy(m).float().to(device) for m in masks]
    times, lora_grad = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        t0 = time.time()
        out = forward_batch(model, batch)
        loss = segmentation_loss(full_size_logits(model, out["low_res_logits"], batch["image_sizes"]), targets)["loss"]
        loss.backward()
        if step == 0:  # lora_B starts at zero: its gradient is the proof that LoRA is reached
            lora_grad = float(sum(p.grad.float().norm() ** 2 for p in lora if p.grad is not None) ** 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t0)
    step_s = float(np.mean(times[1:])) if len(times) > 1 else times[0]
    return dict(batch=args.step_batch, image_size=args.step_size, step_s=step_s, samples_per_s=args.step_batch / step_s,
                peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None,
                lora_grad_norm_step0=lora_grad, loss_last=float(loss))


def merged_vs_adapter(args, image, device, dtype):
    """(e) the merged folder vs base + stage checkpoint: forward-path logits and released masks."""
    out = {}
    for name in ("adapter", "merged"):
        model, tokenizer = load_model(args.merged if name == "merged" else args.model, dtype=dtype)
        if name == "adapter":
            load_stage(model, args.lora_weights)
        model.to(device).eval()
        mine = ours(model, tokenizer, image, args.prompt, DEFAULT_ANSWER, device)
        rel = released_predict(model, tokenizer, image, args.prompt, device, dtype)
        out[name] = dict(logits=mine["logits"], masks=rel["masks"], prediction=rel["prediction"])
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    a, m = out["adapter"], out["merged"]
    report = dict(forward_logits_max_diff=max_diff(a["logits"], m["logits"]),
                  forward_masks_equal=bool((to_mask(a["logits"]) == to_mask(m["logits"])).all()),
                  forward_mask_pixels_differing=int((to_mask(a["logits"]) != to_mask(m["logits"])).sum()),
                  predictions=[a["prediction"], m["prediction"]])
    if a["masks"] and m["masks"]:
        report.update(released_masks_equal=bool((a["masks"][0] == m["masks"][0]).all()),
                      released_mask_pixels_differing=int((a["masks"][0] != m["masks"][0]).sum()))
    return report


def main(args):
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    image = Image.open(args.image).convert("RGB") if args.image else synthetic_frames(1, 512)[0][0]
    import transformers
    report = dict(model=args.model, transformers=transformers.__version__, torch=torch.__version__,
                  device=str(device), dtype=args.dtype, image_size=list(image.size))
    if not args.skip_parity:
        model, tokenizer = load_model(args.model, dtype=dtype)
        model.to(device).eval()
        iface = describe(model, tokenizer)
        report.update(cls=type(model).__name__, interface={k: v for k, v in vars(iface).items() if k != "template"})
        report["parity"], rel, mine = parity(model, tokenizer, image, args.prompt, device, dtype)
        if args.dump:
            np.savez(args.dump, ours=mine["logits"].numpy(), seg_hidden=mine["seg_hidden"].numpy(),
                     **({"released": rel["logits"][0].numpy()} if rel.get("logits") else {}))
        del model
    if not args.skip_step:
        report["sft_step"] = sft_step(args, device)
    if args.merged and args.lora_weights:
        report["merge"] = merged_vs_adapter(args, image, device, dtype)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return report


if __name__ == "__main__":
    main(parse_args())
