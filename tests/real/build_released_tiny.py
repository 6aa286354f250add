"""Build a TINY random model of the RELEASED Sa2VA class (InternVL family), as a Hugging Face
folder that loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)`.

This is how the project checks its code against the real `Sa2VAChatModel` without
downloading a checkpoint: the released remote code (modeling_sa2va_chat.py, sam2.py,
templates.py, configuration_*.py, ...; in a Sa2VA HF folder, or in a clone of Sa2VA at
projects/sa2va/hf/models/ or, older, projects/llava_sam2/hf/models/) is copied next to a
config of the released class at toy sizes: a 1-layer InternViT (448 px tiles of 14 px
patches, as `preparing_for_generation` hard-codes), a 2-layer Qwen2 or InternLM2 LLM, a
byte-level tokenizer holding Sa2VA's special tokens. SAM2 is the released Hiera-L (its
sizes are hard-coded in sam2.py: ~224M parameters, random). The LLM is taught to answer
"It is [SEG]." (a few seconds), so the released `predict_forward` yields a [SEG].

Nothing of the released code is part of this repository: pass your own copy.

    python tests/real/build_released_tiny.py --sa2va_code /path/to/Sa2VA-1B --out /tmp/sa2va_tiny_qwen2
    python tests/real/build_released_tiny.py --sa2va_repo /path/to/Sa2VA-clone --extract_to /tmp/sa2va_code
    python tests/real/build_released_tiny.py --sa2va_repo /path/to/Sa2VA-clone --out DIR --llm internlm2

Needs the released code's own imports (torchvision, timm, einops, peft): run it in the
environment you run released Sa2VA in, not the project's CI venv. Writes --out atomically.
"""
import argparse
import functools
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common.sa2va import released_classes  # noqa: E402
from common.internvl import IMG_CONTEXT, IMG_END, IMG_START, SEG  # noqa: E402
from common.tiny import teach_answer  # noqa: E402

# Where each Sa2VA repository keeps the InternVL-family HF code (newest first).
CODE_DIRS = ("projects/sa2va/hf/models", "projects/llava_sam2/hf/models")
REQUIRED = ("modeling_sa2va_chat.py", "configuration_sa2va_chat.py", "sam2.py", "templates.py")
TEMPLATES = {"qwen2": "qwen_chat", "internlm2": "internlm2_chat"}
# --shape: the released sizes (InternVL2.5 vision + LLM configs), random weights, for GPU timing.
VIT_300M = dict(hidden_size=1024, num_attention_heads=16, intermediate_size=4096, num_hidden_layers=24,
                qkv_bias=True, qk_normalization=False, norm_type="layer_norm")
VIT_6B = dict(hidden_size=3200, num_attention_heads=25, intermediate_size=12800, num_hidden_layers=45,
              qkv_bias=False, qk_normalization=True, norm_type="rms_norm")
SHAPES = {  # shape: (llm family, vision sizes, llm sizes)
    "tiny": (None, dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=1,
                        qkv_bias=True, qk_normalization=False, norm_type="layer_norm"),
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)),
    "1b": ("qwen2", VIT_300M, dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151674)),
    "4b": ("qwen2", VIT_300M, dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                   num_attention_heads=16, num_key_value_heads=2, vocab_size=151674)),
    "8b": ("internlm2", VIT_300M, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=8, vocab_size=92553)),
    "26b": ("internlm2", VIT_6B, dict(hidden_size=6144, intermediate_size=16384, num_hidden_layers=48,
                                      num_attention_heads=48, num_key_value_heads=8, vocab_size=92553)),
}
SPECIAL = ["<|im_start|>", "<|im_end|>", IMG_START, IMG_END, IMG_CONTEXT, SEG, "<p>", "</p>", "<vp>", "</vp>"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sa2va_code", default=None, help="folder with the released InternVL-family HF files "
                                                      "(a Sa2VA HF model folder, or <clone>/projects/sa2va/hf/models)")
    p.add_argument("--sa2va_repo", default=None, help="a Sa2VA clone (work tree or bare git dir); its HF code folder "
                                                      "is found at " + " or ".join(CODE_DIRS))
    p.add_argument("--extract_to", default=None, help="only copy the code folder of --sa2va_repo here and stop")
    p.add_argument("--out", default=None, help="model folder to write")
    p.add_argument("--llm", choices=tuple(TEMPLATES), default="qwen2", help="LLM family of the tiny model")
    p.add_argument("--shape", choices=tuple(SHAPES), default="tiny",
                   help="tiny (CPU checks) or the vision/LLM sizes of Sa2VA-1B/4B/8B/26B (random weights, for GPU "
                        "timing; the LLM family follows the release, the vocabulary stays tiny, nothing is taught)")
    p.add_argument("--device", default="cpu", help="where to build the weights (cuda: much faster for big shapes)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="stored weights (releases store bf16)")
    p.add_argument("--teach_steps", type=int, default=60, help="teacher-forced steps that teach 'It is [SEG].'")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    return p.parse_args(argv)


def extract_code(repo, dest):
    """Copy the HF code folder of a Sa2VA clone (work tree, or bare git dir via `git archive`)."""
    for sub in CODE_DIRS:
        if os.path.isfile(os.path.join(repo, sub, REQUIRED[0])):
            shutil.copytree(os.path.join(repo, sub), dest, dirs_exist_ok=True)
            return dest
    for sub in CODE_DIRS:
        archive = subprocess.run(["git", "-C", repo, "archive", "HEAD", sub], capture_output=True)
        if archive.returncode == 0:
            os.makedirs(dest, exist_ok=True)
            subprocess.run(["tar", "-x", "-C", dest, "--strip-components", str(sub.count("/") + 1)],
                           input=archive.stdout, check=True)
            return dest
    raise SystemExit(f"{repo}: no Sa2VA HF code folder ({' or '.join(CODE_DIRS)}) in its work tree or git HEAD")


def check_code_dir(code):
    missing = [f for f in REQUIRED if not os.path.isfile(os.path.join(code, f))]
    if missing:
        raise SystemExit(f"{code}: not the released InternVL-family Sa2VA code (missing {', '.join(missing)})")


def build_tokenizer(llm):
    """Byte-level BPE (no merges) + Sa2VA's special tokens. The InternLM2 flavour prepends
    <s> on encode like InternLM2's tokenizer (add_bos_token); Qwen2's adds nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    head = ["<unk>", "<s>", "</s>"] if llm == "internlm2" else ["<|endoftext|>"]
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(head + symbols)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if llm == "internlm2":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
        kw = dict(bos_token="<s>", eos_token="</s>", pad_token="</s>", unk_token="<unk>")
    else:
        kw = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=SPECIAL, **kw)


def save_weights(state, folder, shard_bytes=5 * 2 ** 30):
    """safetensors shards of <= shard_bytes + index, as HF checkpoints are laid out (the
    released config class cannot be built without arguments, which `save_pretrained` needs
    on most transformers versions; config.json is written by hand already)."""
    shards, size = [{}], 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.detach().to("cpu").contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(dict(metadata=dict(total_size=total), weight_map=weight_map), f, indent=2)


def save_tokenizer(tokenizer, folder):
    """tokenizer.json + a minimal tokenizer_config.json that transformers 4.x and 5.x both load
    (`save_pretrained` of 5.x writes a class name and special-token layout 4.x rejects)."""
    tokenizer.backend_tokenizer.save(os.path.join(folder, "tokenizer.json"))
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    config = {k: getattr(tokenizer, k) for k in names if getattr(tokenizer, k) is not None}
    config.update(tokenizer_class="PreTrainedTokenizerFast", additional_special_tokens=SPECIAL, model_max_length=4096)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def tiny_config(llm, tokenizer, dtype, shape="tiny"):
    """config.json of the released class at toy (or --shape) sizes (keys as in released Sa2VA configs)."""
    _, vit, llm_sizes = SHAPES[shape]
    sizes = dict(dict(vocab_size=len(tokenizer)), **llm_sizes, max_position_embeddings=32768,
                 tie_word_embeddings=False, torch_dtype=dtype, pad_token_id=tokenizer.pad_token_id,
                 eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if llm == "internlm2":
        # rope_scaling as in InternLM2.5-7B/20B's config (and transformers 5 needs its 'type' key)
        llm_config = dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=False,
                          attn_implementation="eager", rope_theta=1000000,
                          rope_scaling={"type": "dynamic", "factor": 2.0}, **sizes)
    else:
        llm_config = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1000000.0, **sizes)
    vision_config = dict(architectures=["InternVisionModel"], model_type="intern_vit_6b", image_size=448,
                         patch_size=14, use_flash_attn=False, drop_path_rate=0.0, torch_dtype=dtype, **vit)
    return dict(
        architectures=["Sa2VAChatModel"], model_type="sa2va_chat", torch_dtype=dtype,
        auto_map={"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
                  "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
                  "AutoModelForCausalLM": "modeling_sa2va_chat.Sa2VAChatModel"},
        vision_config=vision_config, llm_config=llm_config, template=TEMPLATES[llm], force_image_size=448,
        downsample_ratio=0.5, ps_version="v2", select_layer=-1, dynamic_image_size=True, use_thumbnail=True,
        min_dynamic_patch=1, max_dynamic_patch=12, use_backbone_lora=0, use_llm_lora=0, pad2square=False)


def main(args):
    if args.sa2va_repo and args.extract_to:
        print(f"code folder written to {extract_code(args.sa2va_repo, args.extract_to)}")
        return args.extract_to
    if not args.out or not (args.sa2va_code or args.sa2va_repo):
        raise SystemExit("pass --out and --sa2va_code (or --sa2va_repo)")
    out = os.path.abspath(args.out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    # a dot-free temporary name: transformers imports the folder's code as a module named after it
    tmp = tempfile.mkdtemp(prefix="sa2va_build_", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
    try:
        code = args.sa2va_code or extract_code(args.sa2va_repo, os.path.join(tmp, "_code"))
        check_code_dir(code)
        for f in glob.glob(os.path.join(code, "*.py")):
            shutil.copy(f, tmp)
        shutil.rmtree(os.path.join(tmp, "_code"), ignore_errors=True)
        dtype = "bfloat16" if args.dtype == "bf16" else "float32"
        llm = SHAPES[args.shape][0] or args.llm
        tokenizer = build_tokenizer(llm)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(tiny_config(llm, tokenizer, dtype, args.shape), f, indent=2)

        torch.manual_seed(args.seed)
        config, model_cls = released_classes(tmp)  # the folder's auto_map, with common.sa2va's shims
        if args.shape == "tiny":
            model = model_cls(config).float()
            # the older release casts the whole model to bf16 in preparing_for_generation: keep fp32 here
            model.preparing_for_generation = functools.partial(model.preparing_for_generation,
                                                               torch_dtype=torch.float32)
            loss = teach_answer(model, tokenizer, steps=args.teach_steps, seed=args.seed)
            print(f"taught 'It is [SEG].': final loss {loss:.4f}")
        else:  # release-sized: built straight in the stored dtype, on --device
            default = torch.get_default_dtype()
            torch.set_default_dtype(getattr(torch, dtype))
            with torch.device(args.device):
                model = model_cls(config)
            torch.set_default_dtype(default)
        save_weights(model.to(getattr(torch, dtype)).state_dict(), tmp)
        save_tokenizer(tokenizer, tmp)
        for f in glob.glob(os.path.join(tmp, "*")):  # safetensors writes 0600 files
            os.chmod(f, 0o666 & ~umask)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(p.numel() for p in model.parameters())
    llm_n = sum(p.numel() for p in model.language_model.parameters())
    print(f"{type(model).__name__} ({args.shape}, {llm}, {n / 1e6:.1f}M parameters, LLM {llm_n / 1e6:.1f}M) "
          f"written to {out}")
    return out


if __name__ == "__main__":
    main(parse_args())
