"""LoRA on the LLM, the choice of trained parts, and stage checkpoints.

A stage checkpoint is one folder that stands on the base model alone (stages chain
SFT -> DPO -> hard by `--init`):
    adapter_config.json, adapter_model.safetensors   the PEFT adapter of the LLM (if any)
    trained_parts.safetensors                         text_hidden_fcs, mask decoder, ... weights
    stage.json                                        base model, its fingerprint, parts, run args
It is written to a temporary folder and renamed, so a killed run never leaves a half checkpoint.
"""
import hashlib
import json
import os
from contextlib import nullcontext

import torch
from safetensors.torch import load_file, save_file

from common.files import atomic_folder, write_json
from common.internvl import unwrap
from common.sa2va import CheckpointError, check_safetensors, family, llm_module, set_llm_module

LORA_PRESETS = {"small": (16, 32), "medium": (32, 64), "large": (64, 128)}
STAGE_FILE, PARTS_FILE = "stage.json", "trained_parts.safetensors"
RESAVE_STAGE = ("save the stage again: take the run's other checkpoint (best/ or final/), or --resume the run "
                "(its checkpoints/) to write it anew")


def parts_of(model):
    """Part name -> parameter name prefixes, for the model's family."""
    return family(model).PARTS


def canonical_name(name):
    """A parameter's name in the base model: PEFT's `base_model.model.` and `.base_layer` removed."""
    return name.replace("base_model.model.", "", 1).replace(".base_layer", "")


def lora_target_modules(model, include_mlp=False):
    """LoRA target names for the model's LLM, from its family's table, checked against its module names
    (for the Qwen-VL family a regex anchored at the text layers)."""
    fam = family(model)
    llm = unwrap(getattr(model, fam.LLM_ATTR))
    arch = type(llm).__name__
    if arch not in fam.LORA_TARGETS:
        raise CheckpointError(f"no LoRA targets known for LLM {arch}; known: {', '.join(sorted(fam.LORA_TARGETS))}")
    attn, mlp = fam.LORA_TARGETS[arch]
    targets = attn + (mlp if include_mlp else [])
    names = [n for n, _ in llm.named_modules()]
    for t in targets:
        if not any(n.endswith(t) for n in names):
            raise CheckpointError(f"LoRA target {t!r} matches no module of {arch}; the LLM's module names differ "
                                  f"from the preset (found e.g. {names[-3:]})")
    return fam.lora_pattern(targets)


def apply_lora(model, rank, alpha, dropout=0.05, include_mlp=False):
    """Wrap the LLM module (`llm_module`) with a PEFT LoRA adapter, as the released wrap_llm_lora does."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                        target_modules=lora_target_modules(model, include_mlp))
    set_llm_module(model, get_peft_model(llm_module(model), config))


def has_lora(model):
    return hasattr(llm_module(model), "peft_config")


def set_trainable(model, parts):
    """Freeze everything, then unfreeze the named parts."""
    table = parts_of(model)
    unknown = set(parts) - set(table)
    if unknown:
        raise ValueError(f"unknown --trainable part(s) {sorted(unknown)}; choose from {', '.join(table)}")
    if "lora" in parts and not has_lora(model):
        raise ValueError("--trainable lora needs a LoRA adapter (a --lora_preset, or an --init checkpoint with one)")
    for name, p in model.named_parameters():
        p.requires_grad = False
        for part in parts:
            if canonical_name(name).startswith(table[part]) and (part != "lora" or "lora_" in name):
                p.requires_grad = True


def count_parameters(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def base_fingerprint(model):
    """A short hash of the base model: its shapes and a sample of its frozen LLM embedding.
    A stage checkpoint records it; loading onto another base model is refused."""
    llm = unwrap(llm_module(model))
    emb = llm.get_input_embeddings().weight
    sample = emb.detach().flatten()[:: max(1, emb.numel() // 4096)][:4096].float().cpu()
    shape = dict(cls=type(model).__name__, llm=type(llm).__name__, emb=list(emb.shape),
                 fcs_in=model.text_hidden_fcs[0].in_features, sam=model.grounding_encoder.hidden_dim)
    h = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    h.update(sample.round(decimals=3).numpy().tobytes())
    return h.hexdigest()[:16]


def trained_state(model, parts):
    """The non-LoRA weights of the trained parts, keyed by their names in the base model."""
    prefixes = tuple(p for part in parts if part not in ("lora", "llm") for p in parts_of(model)[part])
    return {canonical_name(n): p.detach().cpu().contiguous() for n, p in model.named_parameters()
            if canonical_name(n).startswith(prefixes) and "lora_" not in n}


def save_stage(model, out_dir, parts, meta, gather=None):
    """Write a stage checkpoint atomically. `gather` is a context manager factory that makes
    partitioned (ZeRO-3) parameters whole for the save; None when they already are."""
    # best/ is replaced by a better one: swapped in whole
    with atomic_folder(out_dir, overwrite=True) as tmp, gather(list(model.parameters())) if gather else nullcontext():
        if has_lora(model):
            llm_module(model).save_pretrained(tmp)
        save_file(trained_state(model, parts), os.path.join(tmp, PARTS_FILE))
        write_json(os.path.join(tmp, STAGE_FILE), dict(meta, trained_parts=list(parts), lora=has_lora(model),
                                                       family=family(model).NAME,
                                                       seg_hidden_state=family(model).seg_convention(model)))


def read_stage_meta(ckpt_dir):
    path = os.path.join(ckpt_dir, STAGE_FILE)
    if not os.path.isfile(path):
        if any(os.path.isfile(os.path.join(ckpt_dir, *sub, "unet.json")) for sub in ((), ("best",))):
            raise CheckpointError(f"{ckpt_dir}: a U-Net baseline (common/baselines.py, unet.json), not a Sa2VA stage "
                                  f"checkpoint; score it with evaluate.py --baselines unet --unet {ckpt_dir}")
        raise CheckpointError(f"{ckpt_dir}: not a stage checkpoint (no {STAGE_FILE})")
    with open(path) as f:
        return json.load(f)


def load_stage(model, ckpt_dir, trainable_lora=False):
    """Apply a stage checkpoint to a freshly loaded base model (in place); returns its meta."""
    meta = read_stage_meta(ckpt_dir)
    for name in ("adapter_model.safetensors", PARTS_FILE):
        if os.path.isfile(os.path.join(ckpt_dir, name)):
            check_safetensors(os.path.join(ckpt_dir, name), RESAVE_STAGE)
    fingerprint = base_fingerprint(model)
    if meta.get("base_fingerprint") not in (None, fingerprint):
        raise CheckpointError(f"{ckpt_dir} was trained on base model {meta.get('base_model')!r} "
                              f"(fingerprint {meta['base_fingerprint']}), not on this one ({fingerprint}); "
                              f"pass the same --model it was trained from")
    convention = family(model).seg_convention(model)
    if meta.get("seg_hidden_state", convention) != convention:
        raise CheckpointError(f"{ckpt_dir} was trained on the {meta['seg_hidden_state']} [SEG] state, this model reads "
                              f"the {convention} one: its text_hidden_fcs would get other inputs")
    if meta.get("lora"):
        from peft import PeftModel
        if has_lora(model):
            raise CheckpointError(f"{ckpt_dir}: the model already has a LoRA adapter")
        set_llm_module(model, PeftModel.from_pretrained(llm_module(model), ckpt_dir, is_trainable=trainable_lora))
    state = load_file(os.path.join(ckpt_dir, PARTS_FILE))
    own = {canonical_name(n): p for n, p in model.named_parameters() if "lora_" not in n}
    unknown = [k for k in state if k not in own]
    if unknown:
        raise CheckpointError(f"{ckpt_dir}: {len(unknown)} weight(s) do not exist in this model, e.g. {unknown[0]}")
    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise CheckpointError(f"{ckpt_dir}: {k} has shape {tuple(v.shape)}, model has {tuple(own[k].shape)}")
            own[k].copy_(v.to(own[k].dtype))
    return meta
