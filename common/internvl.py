"""The InternVL family of Sa2VA (`Sa2VAChatModel`): the one place that knows its conventions.

The released class (bytedance/Sa2VA, projects/sa2va/hf/models/modeling_sa2va_chat.py) holds
`vision_model` (InternViT) + `mlp1` + `language_model` (InternLM2, Qwen2, Phi-3, ...) next to
`text_hidden_fcs` and `grounding_encoder` (SAM2). Its `predict_forward(image, text, tokenizer)`
tiles the image (`dynamic_preprocess`, ImageNet normalisation), writes `<img>` + `<IMG_CONTEXT>` x
(tokens per tile x tiles) + `</img>` in place of `<image>`, and splices the vision features at
the `<IMG_CONTEXT>` positions; the [SEG] state is the last layer's output after the final norm.

This module is the family object the rest of the project asks (common.sa2va.family), with the same
names as common.qwenvl: NAME, LLM_ATTR (the module LoRA wraps), TOKENS (a checkpoint has them all),
PARTS (trainable parts), LORA_TARGETS and lora_pattern, pre_seg_modules, seg_hidden, seg_convention
(the [SEG] state) and predict (the released predict_forward).
Checked against the released code: `preparing_for_generation`, `predict_forward`,
`dynamic_preprocess`, `extract_feature`.
"""
import numpy as np
import torch
from PIL import Image

NAME, LLM_ATTR = "internvl", "language_model"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_START, IMG_END, IMG_CONTEXT, SEG = "<img>", "</img>", "<IMG_CONTEXT>", "[SEG]"
TOKENS = (SEG, IMG_CONTEXT, IMG_START, IMG_END)
# The released `preparing_for_generation` sets these regardless of the config; a model that
# carries its own (the tiny one) is read instead.
RELEASED_TILING = dict(min_dynamic_patch=1, max_dynamic_patch=12, use_thumbnail=True)
# Attention projections of each LLM (the mission's q,k,v,o), and the MLP ones.
LORA_TARGETS = {
    "InternLM2ForCausalLM": (["attention.wqkv", "attention.wo"], ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]),
    "Phi3ForCausalLM": (["self_attn.qkv_proj", "self_attn.o_proj"], ["mlp.gate_up_proj", "mlp.down_proj"]),
    "Qwen2ForCausalLM": (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
                         ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
}
LORA_TARGETS["LlamaForCausalLM"] = LORA_TARGETS["Qwen3ForCausalLM"] = LORA_TARGETS["Qwen2ForCausalLM"]
# Trainable parts by name -> module path prefixes in the Sa2VA model (names without PEFT's
# wrapper infixes, see common.lora.canonical_name).
PARTS = {
    "lora": ("language_model.",),  # only the lora_ parameters in it
    "llm": ("language_model.",),
    "text_hidden_fcs": ("text_hidden_fcs.",),
    "mask_decoder": ("grounding_encoder.sam2_model.sam_mask_decoder.",),
    "prompt_encoder": ("grounding_encoder.sam2_model.sam_prompt_encoder.",),
    "sam_encoder": ("grounding_encoder.sam2_model.image_encoder.",),
    "mlp1": ("mlp1.",),
    "vision": ("vision_model.",),
}


def lora_pattern(targets):
    return targets  # PEFT matches name suffixes: the LLM holds nothing else of these names


def seg_convention(model):
    return "post_norm"


def pre_seg_modules(model):
    """The modules in front of the [SEG] hidden state."""
    return [model.vision_model, model.mlp1, model.language_model]


def predict(model, tokenizer, image, text):
    return model.predict_forward(image=image, text=text, tokenizer=tokenizer)


def unwrap(module):
    """The module under a PEFT wrapper, if any."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff, best_ratio = float("inf"), (1, 1)
    area = width * height
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff, best_ratio = ratio_diff, ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


def dynamic_preprocess(image, min_num=1, max_num=6, image_size=448, use_thumbnail=False):
    """InternVL's dynamic tiling, as in the released Sa2VA code (same tie-breaking)."""
    orig_width, orig_height = image.size
    target_ratios = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
                            for j in range(1, n + 1) if min_num <= i * j <= max_num}, key=lambda x: x[0] * x[1])
    ratio = find_closest_aspect_ratio(orig_width / orig_height, target_ratios, orig_width, orig_height, image_size)
    target_width, target_height = image_size * ratio[0], image_size * ratio[1]
    resized = image.resize((target_width, target_height), Image.BICUBIC)
    cols = target_width // image_size
    tiles = [resized.crop(((i % cols) * image_size, (i // cols) * image_size,
                           (i % cols + 1) * image_size, (i // cols + 1) * image_size))
             for i in range(ratio[0] * ratio[1])]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.BICUBIC))
    return tiles


def pil_to_normalized(image, size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """torchvision's Resize(bicubic) + ToTensor + Normalize on a PIL image, without torchvision."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def vision_is_frozen(model):
    return not any(p.requires_grad for m in (model.vision_model, model.mlp1) for p in m.parameters())


def image_embeddings(model, pixel_values):
    """Vision encoder + mlp1 for all tiles of the batch: (tiles, tokens per tile, hidden)."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and not vision_is_frozen(model)):
        return model.extract_feature(pixel_values.to(next(model.vision_model.parameters()).dtype))


def cached_image_embeddings(model, batch, cache=None):
    """image_embeddings of the batch, served from / stored in `cache` when the vision encoder
    and mlp1 are frozen (their output is then a constant of the sample)."""
    keys = batch["keys"]
    if cache is None or not vision_is_frozen(model):
        return image_embeddings(model, batch["pixel_values"])
    vit = cache.get("vit", keys, batch["input_ids"].device)
    if vit is None:
        vit = image_embeddings(model, batch["pixel_values"])
        tiles = ((batch["input_ids"] == model.img_context_token_id).sum(1) // vit.shape[1]).tolist()
        cache.put("vit", keys, list(vit.split(tiles)))
    return vit


def seg_hidden(model, batch, cache=None):
    """Teacher-forced forward: vision features (from `cache` when frozen) spliced at <IMG_CONTEXT>, the
    decoder stack -> (hidden (B, L, h) post-norm, [SEG] states (B, h))."""
    input_ids = batch["input_ids"]
    input_embeds = model.get_input_embeddings()(input_ids)
    vit = cached_image_embeddings(model, batch, cache).to(input_embeds.dtype)
    selected = (input_ids == model.img_context_token_id)[..., None]
    if selected.sum() != vit.shape[0] * vit.shape[1]:
        raise ValueError(f"{int(selected.sum())} <IMG_CONTEXT> tokens but {vit.shape[0] * vit.shape[1]} image "
                         f"embeddings: the processor and the model disagree on tokens per tile")
    input_embeds = input_embeds.masked_scatter(selected, vit)
    # The decoder stack without lm_head: the vocabulary projection is only needed where the
    # text loss looks (answer tokens), and at 150k words it would be most of the memory.
    backbone = unwrap(model.language_model).model
    hidden = backbone(inputs_embeds=input_embeds, attention_mask=batch["attention_mask"],
                      use_cache=False).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden, hidden[rows, batch["seg_index"]]
