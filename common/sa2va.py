"""Loading Sa2VA, and the one place that knows its input conventions.

Everything the forward path needs is read from the loaded model and tokenizer
(`describe`), never typed in elsewhere: the chat template, the image tokens and how many
per tile, SAM2's input size and normalisation, the `[SEG]` id and the LLM family.
`Sa2VAProcessor` turns (image, prompt, answer) into the tensors of a batch exactly as the
released `predict_forward` builds its inputs (sam2.py: `preprocess_image`, DirectResize), so
a mask from the training path equals a mask from the released inference for the same answer.

Two families, one API: `family(model)` is the module `common.internvl` (`Sa2VAChatModel`:
vision_model + mlp1 + language_model) or `common.qwenvl` (`Sa2VAChatModelQwen`: one
Qwen2.5-VL / Qwen3-VL model as `model`). Each knows its tokens, LLM module, LoRA targets,
trainable parts and [SEG] state; the rest of the project asks it, never the family's name.
The embedded tiny models (`common.tiny`, `common.tiny_qwenvl`) are imported only when one is
asked for: loading a released folder never loads them.
"""
import importlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from common import internvl, qwenvl
from common.internvl import (IMG_CONTEXT, IMG_END, IMG_START, RELEASED_TILING, SEG, dynamic_preprocess,
                             pil_to_normalized)

TINY = "tiny"
TINY_QWENVL = "tiny-qwenvl"
TINY_MODELS = (TINY, TINY_QWENVL)
TINY_CLASSES = {"tiny_sa2va": ("common.tiny", "TinySa2VAChatModel"),  # config model_type -> toy class
                "tiny_sa2va_qwenvl": ("common.tiny_qwenvl", "TinySa2VAQwenVLModel")}
INTERNVL, QWENVL = internvl, qwenvl  # the two families: each module is its family's one object
DEFAULT_PROMPT = "<image>\nPlease segment the blood vessel."
DEFAULT_ANSWER = "It is [SEG]."


class CheckpointError(ValueError):
    """A model folder or stage checkpoint that cannot be used as asked."""


REFETCH_MODEL = "copy or download the model folder again (a copy or download was cut short)"


def check_safetensors(path, advice):
    """CheckpointError naming `path` unless it is a whole safetensors file: an 8-byte header length,
    the JSON header, then every tensor's bytes. A file cut short (a killed save or copy) otherwise
    fails inside safetensors with `incomplete metadata`, naming no file. Reads the header only."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or 8 + length > size:
            problem = f"{size} bytes, its header is cut short"
        else:
            try:
                header = json.loads(f.read(length))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                problem = f"{size} bytes, its tensors need {8 + length + end}" if 8 + length + end > size else None
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                problem = "its header is not valid"
    if problem:
        raise CheckpointError(f"{path}: truncated or damaged safetensors file ({problem}); {advice}")


def load_model(name_or_path, dtype=torch.float32, seed=0):
    """(model, tokenizer) for `tiny` / `tiny-qwenvl` (built in memory, deterministic in `seed`), a
    saved tiny folder, or a released Sa2VA Hugging Face folder of either family (loaded with its
    own remote code). For the Qwen-VL family the second item is the folder's processor (it holds the
    tokenizer): what that family's predict_forward takes where the InternVL one takes a tokenizer."""
    if name_or_path == TINY:
        from common.tiny import build_tiny_model
        model, tokenizer = build_tiny_model(seed)
        return model.to(dtype), tokenizer
    if name_or_path == TINY_QWENVL:
        from common.tiny_qwenvl import build_tiny_qwenvl
        model, _ = build_tiny_qwenvl(seed)
        return model.to(dtype), model.processor
    config_path = os.path.join(name_or_path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{name_or_path}: not a model folder (no config.json); pass `tiny` or a local "
                              f"Sa2VA folder (nothing is downloaded)")
    with open(config_path) as f:
        config = json.load(f)
    for name in sorted(os.listdir(name_or_path)):
        if name.endswith(".safetensors"):
            check_safetensors(os.path.join(name_or_path, name), REFETCH_MODEL)
    fam = folder_family(config)
    if fam is QWENVL:
        tokenizer = qwenvl.load_processor(name_or_path)
        vocab = tokenizer.tokenizer.get_vocab()
    else:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=True)
        vocab = tokenizer.get_vocab()
    missing = [t for t in fam.TOKENS if t not in vocab]
    if missing:
        raise CheckpointError(f"{name_or_path}: tokenizer has no {missing[0]} token; is this a Sa2VA checkpoint "
                              f"of the {fam.NAME} family?")
    if config.get("model_type") in TINY_CLASSES:
        module, cls = TINY_CLASSES[config["model_type"]]
        model = getattr(importlib.import_module(module), cls).from_pretrained(name_or_path, **dtype_kwarg(dtype))
    else:
        model = load_released(name_or_path, dtype)
    if fam is INTERNVL:
        # the released class leaves this None until preparing_for_generation(); the forward path needs it
        model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    return model, tokenizer


def folder_family(config):
    """The family of a model folder from its config.json (a dict): the tiny Qwen-VL one, or a
    released folder whose auto_map / architectures name `Sa2VAChatModelQwen`."""
    names = [str((config.get("auto_map") or {}).get("AutoModel", "")).rsplit(".", 1)[-1]]
    names += list(config.get("architectures") or [])
    if config.get("model_type") == "tiny_sa2va_qwenvl" or "Sa2VAChatModelQwen" in names:
        return QWENVL
    return INTERNVL


def family(model):
    """The family of a loaded Sa2VA, the module common.internvl or common.qwenvl: Qwen-VL
    when its `model` is a Qwen-VL model, else InternVL."""
    inner = getattr(model, "model", None)
    if inner is not None and type(qwenvl.unwrap(inner)).__name__ in qwenvl.VL_ARCHS:
        return QWENVL
    return INTERNVL


def llm_module(model):
    """The module LoRA wraps: InternVL's `language_model`, Qwen-VL's whole `model` (LoRA targets
    match only its text layers)."""
    return getattr(model, family(model).LLM_ATTR)


def set_llm_module(model, module):
    setattr(model, family(model).LLM_ATTR, module)


def predict(model, tokenizer, image, text):
    """The released `predict_forward` of either family (Qwen-VL's takes the processor load_model gave)."""
    return family(model).predict(model, tokenizer, image, text)


def dtype_kwarg(dtype):
    """`from_pretrained`'s dtype argument: `torch_dtype` before transformers 4.56 (an unknown
    `dtype` is silently ignored there and the weights load as float32), `dtype` after."""
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_released(path, dtype):
    """A released Sa2VA folder through its own remote code, with the shims newer
    transformers need (see README, "Supported checkpoints")."""
    config, model_cls = released_classes(path)
    model = model_cls.from_pretrained(path, config=config, low_cpu_mem_usage=True, **dtype_kwarg(dtype))
    rebuild_unsaved_state(model)
    prefer_sdpa(llm_module(model))
    # `_llm_forward` increments a counter the released __init__ never creates
    model._count = 0
    return model


def rebuild_unsaved_state(model):
    """Shim 3, transformers >= 5: models are built on the meta device and only checkpoint weights
    are filled in, so state the released code computes in __init__ without saving it is left
    empty: InternLM2's rotary `inv_freq`/`cos_cached`/`sin_cached` (garbage -> NaN hidden states)
    and SAM2 memory attention's `freqs_cis` (meta). Recompute both as their __init__ does;
    refuse to go on if any other tensor was left on the meta device."""
    for name, module in model.named_modules():
        if hasattr(module, "_set_cos_sin_cache") and hasattr(module, "base") and hasattr(module, "dim"):
            device, dtype = module.cos_cached.device, module.cos_cached.dtype
            if device.type == "meta":
                device, dtype = torch.device("cpu"), torch.get_default_dtype()
            inv_freq = 1.0 / (module.base ** (torch.arange(0, module.dim, 2, device=device).float() / module.dim))
            module.register_buffer("inv_freq", inv_freq, persistent=False)
            module._set_cos_sin_cache(seq_len=module.max_position_embeddings, device=device, dtype=dtype)
        freqs = getattr(module, "freqs_cis", None)
        if torch.is_tensor(freqs) and freqs.is_meta and hasattr(module, "compute_cis"):
            side = int(round(freqs.shape[0] ** 0.5))
            module.freqs_cis = module.compute_cis(end_x=side, end_y=side)
        for key, value in list(vars(module).items()) + list(module.named_buffers(recurse=False)):
            if torch.is_tensor(value) and value.is_meta:
                raise CheckpointError(f"{name}.{key} was left on the meta device by this transformers version; "
                                      f"use a supported version (README, 'Supported checkpoints')")


def prefer_sdpa(llm):
    """The released __init__ picks flash_attention_2 when flash-attn is installed and eager
    otherwise. For an LLM class of transformers itself (Qwen2, Llama, Qwen3) PyTorch's fused
    SDPA kernels compute the same attention several times faster than eager at training batch
    sizes (README, "Performance"); the remote InternLM2 code has no SDPA path and stays as is."""
    native = type(llm).__module__.startswith("transformers.")
    # transformers < 4.56 builds attention classes at __init__ and has no setter: eager stays there
    if native and llm.config._attn_implementation == "eager" and hasattr(llm, "set_attn_implementation"):
        llm.set_attn_implementation("sdpa")


def released_classes(path):
    """(config, model class) of a folder's remote code (its config.json auto_map), shimmed."""
    import transformers
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    with open(os.path.join(path, "config.json")) as f:
        auto_map = json.load(f).get("auto_map") or {}
    if "AutoConfig" not in auto_map or "AutoModel" not in auto_map:
        raise CheckpointError(f"{path}/config.json has no auto_map for AutoConfig/AutoModel: not a released Sa2VA folder")
    if auto_map["AutoModel"].rsplit(".", 1)[-1] not in ("Sa2VAChatModel", "Sa2VAChatModelQwen"):
        raise CheckpointError(f"{path}: {auto_map['AutoModel']} is neither Sa2VAChatModel (InternVL family) nor "
                              f"Sa2VAChatModelQwen (Qwen-VL family)")
    config_cls = get_class_from_dynamic_module(auto_map["AutoConfig"], path)
    # Shim 1, transformers >= 4.50: the released config cannot be built without arguments (KeyError
    # 'architectures'); the flag that used to be `is_composition` tells transformers not to try.
    config_cls.has_no_defaults_at_init = True
    config = config_cls.from_pretrained(path)
    # Shim 2, transformers >= 5: the released __init__ never calls post_init(), which now sets
    # attributes loading needs (`all_tied_weights_keys`); call it once after __init__.
    model_cls = get_class_from_dynamic_module(auto_map["AutoModel"], path)
    if int(transformers.__version__.split(".")[0]) >= 5 and not getattr(model_cls, "_sa2va_post_init_shim", False):
        released_init = model_cls.__init__

        def __init__(self, *args, **kwargs):
            released_init(self, *args, **kwargs)
            if not hasattr(self, "all_tied_weights_keys"):
                self.post_init()
        model_cls.__init__ = __init__
        model_cls._sa2va_post_init_shim = True
    return config, model_cls


@dataclass
class Sa2VAInterface:
    """The input conventions of the forward path, read from the loaded model (`describe`)."""
    sam_image_size: int
    sam_mean: tuple
    sam_std: tuple
    seg_token_id: int
    img_context_token_id: int
    pad_token_id: int
    llm_arch: str
    family: str
    # InternVL family: the prompt template, image tokens per tile and the tiling
    template: dict = None
    num_image_token: int = 0
    image_size: int = 0
    min_dynamic_patch: int = 0
    max_dynamic_patch: int = 0
    use_thumbnail: bool = False
    # Qwen-VL family: the HF processor and the class's processor bounds
    processor: object = None
    min_pixels: int = 0
    max_pixels: int = 0


def describe(model, tokenizer):
    """Read every input convention of the forward path from the loaded model and the tokenizer (Qwen-VL
    family: the processor) load_model gave with it."""
    sam = model.grounding_encoder
    fields = dict(sam_image_size=int(sam.sam2_model.image_size), sam_mean=tuple(sam.img_mean),
                  sam_std=tuple(sam.img_std), family=family(model).NAME)
    if family(model) is QWENVL:
        if not hasattr(tokenizer, "image_processor"):
            raise CheckpointError("a Qwen-VL Sa2VA needs its processor: the second item load_model returns")
        processor, tokenizer = tokenizer, tokenizer.tokenizer
        fields.update(img_context_token_id=tokenizer.convert_tokens_to_ids(qwenvl.IMAGE_PAD),
                      llm_arch=type(qwenvl.unwrap(model.model)).__name__, processor=processor,
                      min_pixels=int(model.min_pixels), max_pixels=int(model.max_pixels))
    else:
        if not isinstance(model.template, dict):
            raise CheckpointError(f"model template {model.template!r} is not a prompt-template dict")
        config = model.config
        image_size = getattr(model, "image_size", None) or config.force_image_size or config.vision_config.image_size
        fields.update(template=model.template, num_image_token=int(model.num_image_token), image_size=int(image_size),
                      img_context_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT),
                      llm_arch=type(internvl.unwrap(model.language_model)).__name__,
                      **{k: getattr(model, k, v) for k, v in RELEASED_TILING.items()})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Sa2VAInterface(seg_token_id=tokenizer.convert_tokens_to_ids(SEG), pad_token_id=pad, **fields)


class Sa2VAProcessor:
    """(image, prompt, answer) -> model inputs, the way the released predict_forward builds them.

    Picklable (DataLoader workers run it). The answer is tokenised on its own and appended
    after the instruction, as Sa2VA's training data (xtuner) does, and ends with the
    template's SUFFIX (the end-of-turn token)."""

    def __init__(self, iface: Sa2VAInterface, tokenizer, prompt=DEFAULT_PROMPT, answer=DEFAULT_ANSWER):
        # Qwen-VL family: the prompt turn and image patches come from the model's processor exactly as
        # its predict_forward makes them (common.qwenvl.encode); the rest of the batch is shared
        self.iface, self.tokenizer, self.prompt, self.answer = iface, tokenizer, prompt, answer
        if "<image>" not in prompt:
            raise ValueError(f"--prompt must contain <image>, got {prompt!r}")
        if SEG not in answer:
            raise ValueError(f"the answer must contain {SEG}, got {answer!r}")

    def image_tiles(self, image):
        i = self.iface
        tiles = dynamic_preprocess(image, i.min_dynamic_patch, i.max_dynamic_patch, i.image_size, i.use_thumbnail)
        return torch.stack([pil_to_normalized(t, i.image_size) for t in tiles])

    def sam_pixels(self, image):
        """DirectResize to the SAM2 size (PIL bicubic), as uint8 (3, S, S). The forward path
        normalises it with the model's own `preprocess_image` (/255, mean/std in the model's
        dtype and constants), so the SAM2 input is bit-identical to predict_forward's."""
        size = self.iface.sam_image_size
        x = np.array(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8)  # writable
        return torch.from_numpy(x).permute(2, 0, 1).contiguous()

    def clip_tiles(self, frames):
        """A video clip as the released predict_forward(video=...) feeds it to the LLM: one tile per
        frame (a plain resize to the tile size, no dynamic tiling)."""
        return torch.stack([pil_to_normalized(f, self.iface.image_size) for f in frames])

    def token_ids(self, num_tiles, prompt=None, answer=None, frames=1):
        """(prompt ids, answer ids) for an image of `num_tiles` tiles, or for `frames` video frames of
        `num_tiles` each (their image blocks joined by newlines, as the released video prompt)."""
        i = self.iface
        image_tokens = "\n".join([IMG_START + IMG_CONTEXT * (num_tiles * i.num_image_token) + IMG_END] * frames)
        text = (prompt or self.prompt).replace("<image>", image_tokens)
        instruction = i.template["INSTRUCTION"].format(input=text, round=1, bot_name="BOT")
        # with the tokenizer's own special tokens, as predict_forward's `tokenizer.encode(input_text)`:
        # InternLM2's prepends <s> (xtuner's training data starts with it too), Qwen2's adds nothing
        prompt_ids = self.tokenizer.encode(instruction)
        answer_ids = self.tokenizer.encode((answer or self.answer) + i.template.get("SUFFIX", ""),
                                           add_special_tokens=False)
        return prompt_ids, answer_ids

    def __call__(self, samples):
        """Collate samples (dicts with `image` PIL, optional `mask` bool array, `key`; or a video clip:
        `frames`, a list of PIL frames the LLM sees, with `image` its first frame) into a batch."""
        tiles, g_pixels, ids, labels, seg_index, encoded = [], [], [], [], [], []
        for s in samples:
            if self.iface.family == QWENVL.NAME:
                e = qwenvl.encode(self.iface.processor, s["image"], s.get("prompt") or self.prompt,
                                  s.get("answer") or self.answer, self.iface.min_pixels, self.iface.max_pixels)
                encoded.append(e)
                prompt_ids, answer_ids = e["prompt_ids"], e["answer_ids"]
            elif "frames" in s:  # a video clip (common.video): the LLM sees its frames, SAM2 input is s["image"]
                t = self.clip_tiles(s["frames"])
                tiles.append(t)
                prompt_ids, answer_ids = self.token_ids(1, s.get("prompt"), s.get("answer"), frames=len(t))
            else:
                t = self.image_tiles(s["image"])
                tiles.append(t)
                prompt_ids, answer_ids = self.token_ids(len(t), s.get("prompt"), s.get("answer"))
            seq = prompt_ids + answer_ids
            if self.iface.seg_token_id not in answer_ids:
                raise ValueError(f"{s.get('key')}: the answer tokenises without a {SEG} token")
            g_pixels.append(self.sam_pixels(s["image"]))
            ids.append(seq)
            labels.append([-100] * len(prompt_ids) + answer_ids)
            seg_index.append(len(prompt_ids) + answer_ids.index(self.iface.seg_token_id))
        length = max(len(x) for x in ids)  # right padding keeps positions 0..n-1
        input_ids = torch.tensor([x + [self.iface.pad_token_id] * (length - len(x)) for x in ids])
        label_ids = torch.tensor([x + [-100] * (length - len(x)) for x in labels])
        attention_mask = torch.tensor([[1] * len(x) + [0] * (length - len(x)) for x in ids])
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=label_ids,
                     g_pixel_values=torch.stack(g_pixels),
                     seg_index=torch.tensor(seg_index), image_sizes=[s["image"].size[::-1] for s in samples],
                     keys=[s.get("key") for s in samples])
        batch.update(qwenvl.collate(encoded, self.iface.pad_token_id) if encoded else dict(pixel_values=torch.cat(tiles)))
        if all(s.get("mask") is not None for s in samples):
            batch["masks"] = [torch.from_numpy(np.ascontiguousarray(s["mask"])) for s in samples]
        for extra in ("index", "chosen_mask", "rejected_mask"):
            if all(extra in s for s in samples):
                value = [s[extra] for s in samples]
                batch[extra] = (torch.tensor(value) if extra == "index"
                                else [torch.from_numpy(np.ascontiguousarray(v)) for v in value])
        return batch
