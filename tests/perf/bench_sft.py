"""SFT step benchmark: samples/s, tokens/s, peak GPU memory and model FLOPs utilisation.

One configuration per run (model, batch, checkpointing, ZeRO stage), launched the way
train_sft.py is, so the numbers are those of the real step: the same model setup
(cli.setup_model: LoRA preset, trainable parts, gradient checkpointing), the same engine
(DeepSpeed under the launcher, plain torch otherwise) and the same forward path and loss.
Synthetic 512 px frames, one tile each; no feature cache (every step runs the frozen
vision encoder and the SAM2 image encoder too).

    python tests/real/build_released_tiny.py --sa2va_code .sa2va_code --shape 4b --device cuda --out /tmp/m4b
    deepspeed --num_gpus 1 tests/perf/bench_sft.py --model /tmp/m4b --bf16 --batch_size 16 --grad_ckpt
    deepspeed --num_gpus 2 tests/perf/bench_sft.py --model /tmp/m4b --bf16 --batch_size 16 --zero_stage 3

FLOPs are counted, not estimated: torch.utils.flop_counter counts every matmul, convolution
and attention kernel of one training micro-step (forward + backward) on one sample, with
gradient checkpointing off, so recomputation is not counted (MFU, not hardware FLOPs
utilisation). With a frozen base and LoRA, the backward needs the activation gradients
(about 2 x 2N per token for an N-parameter LLM) but almost no weight gradients, so a step
is about 4N per token, not the 6N of full fine-tuning; the analytic 4N figure is reported
beside the count as a check. MFU = counted FLOPs per sample x samples/s / peak, against the
dense bf16 peak of the data sheet (989 TFLOP/s for the H100 SXM and H200) and against a
measured large bf16 matmul. Appends one JSON line per run to --output (rank 0).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import train_sft  # noqa: E402
from common import cli  # noqa: E402
from common.engine import all_gather_objects, build_engine, engine_step, init_distributed, is_main, \
    use_deepspeed  # noqa: E402
from common.forward import FeatureCache, forward_batch, full_size_logits, move_batch, sam_image_features  # noqa: E402
from common.internvl import image_embeddings, unwrap  # noqa: E402
from common.losses import segmentation_loss  # noqa: E402
from common.sa2va import llm_module  # noqa: E402
from common.synth import make_video  # noqa: E402

DATASHEET_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny or a Sa2VA folder (e.g. built by build_released_tiny.py)")
    p.add_argument("--batch_size", type=int, default=8, help="samples per GPU per step")
    p.add_argument("--image_size", type=int, default=512, help="synthetic frame size (one 448 px tile)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, kernels, DeepSpeed buckets)")
    p.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing in the LLM")
    p.add_argument("--bf16", action="store_true", help="bf16 (as train_sft.py --bf16)")
    p.add_argument("--zero_stage", type=int, default=2, help="ZeRO stage under the deepspeed launcher")
    p.add_argument("--feature_cache_gb", type=float, default=0.0,
                   help="> 0: time steps as from the second epoch on, the frozen encoders' outputs served by the "
                        "FeatureCache (as train_sft.py does); their FLOPs are then neither run nor counted")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile 2 steps and print the top CUDA time by operator and by module scope")
    p.add_argument("--lora_preset", default="medium", help="LoRA preset (train_sft.py's default)")
    p.add_argument("--lora_dropout", type=float, default=0.05, help="train_sft.py --lora_dropout (0: no dropout op)")
    p.add_argument("--compile", action="store_true", help="train_sft.py --compile (torch.compile the decoder layers)")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="bf16 dense peak per GPU (0: from the GPU name)")
    p.add_argument("--output", default="bench_sft.jsonl", help="append one JSON line per run here")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def synthetic_batch(processor, n, size, seed):
    rng = np.random.default_rng(seed)
    frames, masks, _ = make_video(rng, n, size)
    return processor([dict(image=Image.fromarray(f).convert("RGB"), mask=m, key=f"{seed}-{i}")
                      for i, (f, m) in enumerate(zip(frames, masks))])


def micro_step(model, batch, device, cache=None):
    out = forward_batch(model, batch, cache)
    logits = full_size_logits(model, out["low_res_logits"], batch["image_sizes"])
    return segmentation_loss(logits, [m.to(device).float() for m in batch["masks"]])["loss"]


def count_flops(model, batch, device, cache=None):
    """Counted FLOPs of one forward + backward on `batch`, checkpointing off, with what `cache`
    serves not run and not counted (a warm cache: fill it first). Attention is
    counted in its eager form (the same matmuls): the counter cannot size SDPA's grouped-query
    (enable_gqa) calls."""
    from torch.utils.flop_counter import FlopCounterMode
    llm = model.language_model
    was_ckpt = unwrap(llm).is_gradient_checkpointing
    if was_ckpt:
        llm.gradient_checkpointing_disable()
    attn = getattr(unwrap(llm).config, "_attn_implementation", None)
    if attn == "sdpa":
        unwrap(llm).set_attn_implementation("eager")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        with FlopCounterMode(display=False) as counter:
            micro_step(model, batch, device, cache).backward()
    model.zero_grad(set_to_none=True)
    if attn == "sdpa":
        unwrap(llm).set_attn_implementation("sdpa")
    if was_ckpt:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return counter.get_total_flops()


@torch.no_grad()
def frozen_encoders_seconds(model, batch, autocast, reps=3):
    """Time of the frozen work of a step (vision encoder + mlp1, SAM2 image encoder): what a
    feature cache saves from the second epoch on (SAM2) and where a step's time goes."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        t0 = time.time()
        with autocast():
            image_embeddings(model, batch["pixel_values"])
            sam_image_features(model, batch["g_pixel_values"])
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        times.append(time.time() - t0)
    return float(np.median(times))


def measured_matmul_tflops(device, n=8192, reps=20):
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.time() - t0) / 1e12


def main(args):
    targs = train_sft.parse_args(["--model", args.model, "--data", "unused", "--lora_preset", args.lora_preset,
                                  "--lora_dropout", str(args.lora_dropout), "--batch_size", str(args.batch_size),
                                  "--zero_stage", str(args.zero_stage), "--num_workers", "0"]
                                 + (["--grad_ckpt"] if args.grad_ckpt else []) + (["--bf16"] if args.bf16 else []))
    deepspeed_on = use_deepspeed(targs)
    rank, world_size, device = init_distributed(deepspeed_on)
    torch.manual_seed(rank)
    model, processor, _ = cli.setup_model(targs, log=lambda *a: None)
    batch = move_batch(synthetic_batch(processor, args.batch_size, args.image_size, seed=rank), device)
    llm_params = sum(p.numel() for n, p in unwrap(model.language_model).named_parameters() if "lora_" not in n)

    # FLOPs on one sample before the engine owns the model, held as the engine will hold it: DeepSpeed
    # bf16 casts everything to bf16; the torch engine (train_sft.py under python) keeps what trains in fp32
    one = move_batch(synthetic_batch(processor, 1, args.image_size, seed=99), device)
    model.to(device=device, dtype=torch.bfloat16 if args.bf16 and deepspeed_on and device.type == "cuda" else None)
    cache = FeatureCache(device, args.feature_cache_gb) if args.feature_cache_gb > 0 else None
    if cache is not None:  # fill: what epoch 1 does
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            forward_batch(model, one, cache)
            forward_batch(model, batch, cache)
    flops_per_sample = count_flops(model, one, device, cache)
    if args.compile:  # after counting: the FLOP counter does not see inside compiled graphs (the warm-up compiles)
        cli.compile_decoder_layers(llm_module(model))
    tokens = int(batch["attention_mask"][0].sum())

    params = [p for p in model.parameters() if p.requires_grad]
    total = args.warmup + args.steps
    engine = build_engine(model, params, targs, total, device, deepspeed_on, world_size)
    model = engine.module.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(total):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        with engine.autocast():
            loss = micro_step(model, batch, device, cache)
        engine.backward(loss)
        engine_step(engine)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.time() - t0)
    step_s = float(np.median(times))
    if args.profile and device.type == "cuda" and is_main():
        from torch.profiler import ProfilerActivity, profile, record_function
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                with record_function("forward"), engine.autocast():
                    loss = micro_step(model, batch, device, cache)
                with record_function("backward"):
                    engine.backward(loss)
                with record_function("optimizer"):
                    engine_step(engine)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
    # with a warm cache the step runs no frozen encoder, so their time is no share of it
    frozen_s = None if cache is not None else frozen_encoders_seconds(model, batch, engine.autocast)
    peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    peaks = all_gather_objects(peak_gib)
    if not is_main():
        return None

    samples_per_s = args.batch_size * world_size / step_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in DATASHEET_TFLOPS if k in name), 0.0)
    achieved = flops_per_sample * samples_per_s / world_size / 1e12  # per GPU
    row = dict(model=args.model, device=name, world_size=world_size, engine="deepspeed" if deepspeed_on else "torch",
               zero_stage=args.zero_stage if deepspeed_on else None, bf16=args.bf16, grad_ckpt=args.grad_ckpt,
               feature_cache=cache is not None,
               lora_preset=args.lora_preset, lora_dropout=args.lora_dropout, compiled=args.compile, batch_per_gpu=args.batch_size, image_size=args.image_size,
               tokens_per_sample=tokens, llm_params=llm_params, step_s=step_s, samples_per_s=samples_per_s,
               tokens_per_s=samples_per_s * tokens, peak_gib_per_rank=peaks,
               frozen_encoders_s=frozen_s, frozen_share_of_step=None if frozen_s is None else frozen_s / step_s,
               counted_gflop_per_sample=flops_per_sample / 1e9, llm_4n_gflop_per_sample=4 * llm_params * tokens / 1e9,
               tflops_per_gpu=achieved, datasheet_peak_tflops=peak or None,
               mfu_datasheet=achieved / peak if peak else None, torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    if device.type == "cuda":
        row["measured_matmul_tflops"] = measured_matmul_tflops(device)
        row["mfu_measured_matmul"] = achieved / row["measured_matmul_tflops"]
    print(f"{os.path.basename(args.model.rstrip('/'))} x{world_size} {row['engine']} zero {row['zero_stage']} "
          f"ckpt {args.grad_ckpt} cache {cache is not None} dropout {args.lora_dropout} compile {args.compile} batch {args.batch_size}: {step_s * 1000:.0f} ms/step, {samples_per_s:.1f} samples/s, "
          f"{row['tokens_per_s']:.0f} tokens/s, peak {max(p or 0 for p in peaks):.1f} GiB, "
          f"{flops_per_sample / 1e9:.0f} GFLOP/sample (4N: {row['llm_4n_gflop_per_sample']:.0f}), "
          f"{achieved:.0f} TFLOP/s/GPU, MFU {100 * (row['mfu_datasheet'] or 0):.1f}%"
          + ("; frozen encoders served by the cache" if frozen_s is None else
             f"; frozen encoders {100 * frozen_s / step_s:.0f}% of the step"), flush=True)
    with open(args.output, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main(parse_args())
