"""Merge a stage checkpoint (LoRA + trained text_hidden_fcs / mask decoder) into a standalone
Sa2VA checkpoint that loads exactly like the original and predicts the same masks.

    python merge_lora.py --base_model /path/to/Sa2VA-4B --lora_weights runs/hard_x/best \
        --output_model /path/to/Sa2VA-4B-vessel

The LoRA adapter is folded into the LLM (peft `merge_and_unload`) and the stage's trained
weights are written over the base's. For a released Hugging Face folder every non-weight
file of the base (remote code, config.json, tokenizer files, generation config) is copied
as is and the weights are written as safetensors with the base checkpoint's key names,
shard layout and per-tensor dtypes (--dtype auto); for the tiny model, save_pretrained +
tokenizer. Before the folder is published (tmp + rename) it is reloaded from disk and its
forward-path mask logits are compared with base + adapter on synthetic frames; the numbers
go to <output_model>/merge_info.json. A stage checkpoint trained on another base is refused.
"""
import argparse
import json
import os
import shutil
import time

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from common import cli
from common.files import atomic_folder, current_umask, write_json
from common.forward import forward_batch, full_size_logits, move_batch
from common.lora import base_fingerprint, has_lora, load_stage, parts_of, read_stage_meta
from common.sa2va import (TINY_MODELS, CheckpointError, Sa2VAProcessor, describe, llm_module, load_model,
                          set_llm_module)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json", "*.bin.index.json")
ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool, "U8": torch.uint8}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base_model", "--model", dest="base_model", required=True,
                   help="the base the stage was trained from: a Sa2VA HF folder, a tiny folder, or `tiny`")
    p.add_argument("--lora_weights", "--init", dest="lora_weights", required=True,
                   help="stage checkpoint folder (a run's best/ or final/)")
    p.add_argument("--output_model", required=True, help="folder to write (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=("auto",) + tuple(DTYPES), default="auto",
                   help="weights to load, merge and write: auto = as the base stores them (tiny: fp32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the verification forward passes run")
    p.add_argument("--verify_frames", type=int, default=2, help="synthetic frames compared after reloading (0 = skip)")
    p.add_argument("--max_mask_diff", type=float, default=1e-3,
                   help="fail when more than this share of mask pixels differ between merged and base + adapter")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_model")
    p.add_argument("--seed", type=int, default=0, help="seed of `tiny` (must be the one the stage was trained on)")
    return cli.parse(p, argv)


def base_weights(folder):
    """{key: (shard file name, stored dtype)} of a released folder's safetensors weights."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors(.index.json); convert .bin weights to safetensors first")
    out = {}
    for shard in shards:
        with safe_open(os.path.join(folder, shard), "pt") as f:
            for key in f.keys():
                out[key] = (shard, ST_DTYPES.get(f.get_slice(key).get_dtype()))
    return out


def load_dtype(args):
    if args.dtype != "auto":
        return DTYPES[args.dtype]
    config_path = os.path.join(args.base_model, "config.json")
    if args.base_model in TINY_MODELS or not os.path.isfile(config_path):
        return torch.float32
    with open(config_path) as f:
        stored = json.load(f).get("torch_dtype") or "float32"
    return getattr(torch, stored) if stored in ("bfloat16", "float16", "float32") else torch.float32


def verification_batch(model, tokenizer, frames, prompt, answer, device):
    from common.synth import make_video
    images, _, _ = make_video(np.random.default_rng(0), frames, 128)
    processor = Sa2VAProcessor(describe(model, tokenizer), tokenizer, prompt, answer)
    return move_batch(processor([dict(image=Image.fromarray(im), key=str(i)) for i, im in enumerate(images)]), device)


@torch.no_grad()
def mask_logits(model, tokenizer, args, meta, device):
    """Full-size forward-path logits of the verification frames (None when skipped)."""
    if not args.verify_frames:
        return None
    model.to(device).eval()
    batch = verification_batch(model, tokenizer, args.verify_frames, meta.get("prompt") or meta["args"]["prompt"],
                               meta.get("answer") or meta["args"]["answer"], device)
    out = forward_batch(model, batch)
    logits = [x.float().cpu() for x in full_size_logits(model, out["low_res_logits"], batch["image_sizes"])]
    model.to("cpu")
    return logits


def write_released(model, base, tmp, dtype_override, trained_keys):
    """Copy the base's non-weight files; write the merged weights under the base's key names,
    shards and (unless overridden) per-tensor dtypes."""
    weights = base_weights(base)
    state = model.state_dict()
    missing = sorted(set(weights) - set(state))
    if missing:
        raise CheckpointError(f"merged model lacks {len(missing)} key(s) of {base}, e.g. {missing[:3]}: "
                              f"the key names drifted (PEFT wrapper left in place?)")
    extra = sorted(set(state) - set(weights))
    if any(k in trained_keys for k in extra):
        raise CheckpointError(f"trained weights {[k for k in extra if k in trained_keys][:3]} have no place in "
                              f"{base}'s checkpoint")
    shutil.copytree(base, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*WEIGHT_FILES, ".cache"))
    shards = {}
    for key, (shard, stored) in weights.items():
        shards.setdefault(shard, {})[key] = state[key].detach().to("cpu", dtype_override or stored).contiguous()
    for shard, tensors in shards.items():
        save_file(tensors, os.path.join(tmp, shard), metadata={"format": "pt"})
    index = os.path.join(base, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            info = json.load(f)
        info["metadata"] = dict(info.get("metadata", {}), total_size=sum(
            t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values()))
        write_json(os.path.join(tmp, "model.safetensors.index.json"), info)
    return len(weights), len(extra)


def main(args):
    t0 = time.time()
    meta = read_stage_meta(args.lora_weights)
    out = os.path.abspath(args.output_model)
    if os.path.exists(out) and not args.overwrite:
        raise SystemExit(f"--output_model {out} exists; pass --overwrite to replace it")
    device, dtype = torch.device(args.device), load_dtype(args)
    model, tokenizer = load_model(args.base_model, dtype=dtype, seed=args.seed)
    released = type(model).__module__.startswith("transformers_modules")  # remote code: keep the base's files
    fingerprint = base_fingerprint(model)
    load_stage(model, args.lora_weights)  # refuses a checkpoint of another base model
    reference = mask_logits(model, tokenizer, args, meta, device)
    lora = has_lora(model)
    if lora:
        set_llm_module(model, llm_module(model).merge_and_unload())
    parts = parts_of(model)
    prefixes = tuple(p for part in meta["trained_parts"] if part not in ("lora", "llm") for p in parts[part])
    if "llm" in meta["trained_parts"]:
        prefixes += parts["llm"]
    trained_keys = {k for k in model.state_dict() if k.startswith(prefixes)}

    # a merge another run published meanwhile is never removed; the temporary folder's name is dot-free:
    # remote code is imported by folder name
    with atomic_folder(out, args.overwrite, prefix="merge_") as tmp:
        override = DTYPES[args.dtype] if args.dtype != "auto" else None
        if released:
            n_keys, n_skipped = write_released(model, args.base_model, tmp, override, trained_keys)
        else:  # a tiny model: its weights and config, and its tokenizer (Qwen-VL family: processor)
            model.to(override or dtype).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            n_keys, n_skipped = len(model.state_dict()), 0
        del model
        info = dict(base_model=args.base_model, base_fingerprint=fingerprint, lora_weights=args.lora_weights,
                    stage=meta.get("stage"), trained_parts=meta["trained_parts"], lora_merged=lora,
                    dtype=args.dtype if override else str(dtype).replace("torch.", "") + " (auto)",
                    weights_written=n_keys, model_keys_not_in_base=n_skipped)
        if reference is not None:
            merged, merged_tok = load_model(tmp, dtype=dtype)
            if base_fingerprint(merged) != fingerprint:
                info["note"] = "the merged LLM embedding differs from the base's (embeddings were trained)"
            logits = mask_logits(merged, merged_tok, args, meta, device)
            del merged
            diff = max(float((a - b).abs().max()) for a, b in zip(reference, logits))
            differing = sum(int(((a.sigmoid() > 0.5) != (b.sigmoid() > 0.5)).sum()) for a, b in zip(reference, logits))
            share = differing / sum(a.numel() for a in reference)
            info.update(verify_frames=args.verify_frames, max_abs_logit_diff=diff, mask_pixels_differing=differing,
                        mask_share_differing=share)
            print(f"merged vs base + adapter on {args.verify_frames} frames: max |logit diff| {diff:.3g}, "
                  f"{differing} mask pixels differ ({100 * share:.4f}%)")
            if not np.isfinite(diff) or share > args.max_mask_diff:
                raise RuntimeError(f"the merged model's masks differ from base + adapter ({100 * share:.3f}% of "
                                   f"pixels, max |logit diff| {diff:.3g}); nothing written to {out}")
        info["wall_s"] = time.time() - t0
        write_json(os.path.join(tmp, "merge_info.json"), info)
        for f in os.listdir(tmp):  # safetensors writes 0600 files; publish them like the base's
            if os.path.isfile(os.path.join(tmp, f)):
                os.chmod(os.path.join(tmp, f), 0o666 & ~current_umask())
    print(f"merged {args.lora_weights} into {args.base_model} -> {out} ({n_keys} weights, {info['wall_s']:.0f} s)")
    return info


if __name__ == "__main__":
    cli.run_main(main, parse_args)
