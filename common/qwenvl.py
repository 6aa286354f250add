"""The Qwen-VL family of Sa2VA (`Sa2VAChatModelQwen`): everything that differs from the InternVL one.

The released class (bytedance/Sa2VA, projects/sa2va/hf/models_qwen2_5_vl/ and models_qwen3vl/,
modeling_sa2va_qwen.py) wraps a whole `Qwen2_5_VLForConditionalGeneration` /
`Qwen3VLForConditionalGeneration` as `model` next to the same `grounding_encoder` and
`text_hidden_fcs`. Its `predict_forward` builds the LLM input like this, and so does `encode`:

    prompt without "<image>" -> [{"role": "user", "content": [image, text]}]
    -> processor.apply_chat_template(..., add_generation_prompt=True)
    -> qwen_vl_utils.process_vision_info: RGB, resize onto a 28 px grid (`fetch_image` below)
    -> processor(text, images, min_pixels=512*28*28, max_pixels=2048*28*28): the processor
       resizes again (its own patch x merge grid), normalises, patchifies, expands <|image_pad|>
    -> model.generate(input_ids, attention_mask, pixel_values, image_grid_thw[, mm_token_type_ids])

The forward path teacher-forces the answer after that prompt and runs the model's own
multimodal forward (`seg_hidden`). The `[SEG]` state is the last decoder layer's output at the
input `[SEG]` position, taken explicitly before or after the final RMSNorm (`SEG_HIDDEN_STATES`):
`hidden_states[-1]`, which the released training and inference feed to `text_hidden_fcs`, is the
pre-norm state for Qwen3-VL on transformers 4.57 and the post-norm one on 5.x (FACTS.md), so a
checkpoint carries the convention it was trained with (`seg_hidden_convention`).

This module is the family object the rest of the project asks (common.sa2va.family), with the
names common.internvl has (NAME, LLM_ATTR, TOKENS, PARTS, LORA_TARGETS, lora_pattern, ...).

Needs transformers >= 4.57 (Qwen3-VL; Qwen2.5-VL's `model.language_model` layout). Imports no
torchvision and no qwen_vl_utils: without torchvision the HF processor cannot hold a video
processor, so `load_processor` builds the same processor class for images only.
"""
import json
import math
import os

import torch
from PIL import Image

from common import internvl
from common.internvl import SEG, unwrap

NAME, LLM_ATTR = "qwenvl", "model"  # LoRA wraps the whole Qwen-VL model (lora_pattern: its text layers only)
VL_ARCHS = ("Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration")
IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
TOKENS = (SEG, IMAGE_PAD, VISION_START, VISION_END)
END_OF_TURN = "<|im_end|>"
# qwen_vl_utils' fetch_image: a 28 px grid (14 px patches x 2 merge, its default for every model)
# and its default pixel bounds (4 to 16384 tokens of 28 x 28)
FETCH_FACTOR, FETCH_MIN_PIXELS, FETCH_MAX_PIXELS = 28, 4 * 28 * 28, 16384 * 28 * 28
# the released class's own bounds for the processor (Sa2VAChatModelQwen.__init__)
RELEASED_MIN_PIXELS, RELEASED_MAX_PIXELS = 512 * 28 * 28, 2048 * 28 * 28
SEG_HIDDEN_STATES = ("post_norm", "pre_norm")
# LoRA adapts the whole Qwen-VL model (`model`): these names match its text layers
# (model.language_model.layers.N.self_attn.q_proj ...) and, for Qwen2.5-VL, the vision blocks' MLP
# (`visual.blocks`) too, hence the `language_model.` anchor of `lora_pattern`.
LORA_TARGETS = dict.fromkeys(VL_ARCHS, (
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]))
# Trainable parts -> parameter name prefixes: the LLM is inside `model` next to the vision tower
# (`visual`, its merger last); the heads are InternVL's.
PARTS = dict(internvl.PARTS, lora=("model.",), llm=("model.model.language_model.", "model.lm_head."),
             mlp1=("model.model.visual.merger.",), vision=("model.model.visual.",))


def smart_resize(height, width, factor, min_pixels, max_pixels):
    """(h, w): multiples of `factor`, aspect ratio kept, h*w within [min_pixels, max_pixels];
    qwen_vl_utils' rounding (round, then floor when too large, ceil when too small)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio over 200 ({width}x{height}): the Qwen-VL processor refuses it")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def fetch_image(image):
    """qwen_vl_utils.fetch_image for a PIL image: RGB (RGBA over white), resized onto the 28 px
    grid with PIL's default filter (bicubic), as `process_vision_info` does in predict_forward."""
    if image.mode == "RGBA":
        rgb = Image.new("RGB", image.size, (255, 255, 255))
        rgb.paste(image, mask=image.split()[3])
        image = rgb
    else:
        image = image.convert("RGB")
    width, height = image.size
    h, w = smart_resize(height, width, FETCH_FACTOR, FETCH_MIN_PIXELS, FETCH_MAX_PIXELS)
    return image.resize((w, h))


def chat_text(processor, image, prompt):
    """The prompt turn exactly as predict_forward renders it: `<image>` removed from the text, the
    image first, the processor's own chat template (Qwen2.5-VL's adds its default system turn)."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": prompt.replace("<image>", "")}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def processor_inputs(processor, image, prompt, min_pixels, max_pixels):
    """predict_forward's `mm_inputs` for one image: input_ids, attention_mask, pixel_values,
    image_grid_thw (and mm_token_type_ids where the processor makes them, transformers 5)."""
    # `size` is what the deprecated min_pixels/max_pixels call arguments are turned into
    return processor(text=[chat_text(processor, image, prompt)], images=[fetch_image(image)], videos=None, padding=True,
                     return_tensors="pt", size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


def encode(processor, image, prompt, answer, min_pixels, max_pixels):
    """One sample of a batch: the prompt as predict_forward builds it + the answer's tokens + the
    end-of-turn token (what `generate` emits after "It is [SEG].")."""
    mm = processor_inputs(processor, image, prompt, min_pixels, max_pixels)
    prompt_ids = mm["input_ids"][0].tolist()
    answer_ids = processor.tokenizer.encode(answer + END_OF_TURN, add_special_tokens=False)
    out = dict(prompt_ids=prompt_ids, answer_ids=answer_ids, pixel_values=mm["pixel_values"],
               image_grid_thw=mm["image_grid_thw"])
    if "mm_token_type_ids" in mm:  # answer tokens are text: type 0
        out["mm_token_type_ids"] = mm["mm_token_type_ids"][0].tolist() + [0] * len(answer_ids)
    return out


def collate(encoded, pad_id):
    """The Qwen-VL part of a batch: image patches of all samples concatenated (the model splits
    them by image_grid_thw), mm_token_type_ids right-padded with 0 like input_ids."""
    batch = dict(pixel_values=torch.cat([e["pixel_values"] for e in encoded]),
                 image_grid_thw=torch.cat([e["image_grid_thw"] for e in encoded]))
    if all("mm_token_type_ids" in e for e in encoded):
        types = [e["mm_token_type_ids"] for e in encoded]
        batch["mm_token_type_ids"] = torch.tensor([t + [0] * (max(map(len, types)) - len(t)) for t in types])
    return batch


def lora_pattern(targets):
    """A regex anchored at the text layers: Qwen2.5-VL's vision MLP has the same names."""
    return r".*language_model\.layers\.\d+\.(" + "|".join(t.replace(".", r"\.") for t in targets) + ")"


def seg_convention(model):
    """The [SEG] state the model's `text_hidden_fcs` was trained on, from its config."""
    return seg_hidden_convention(vars(model.config), type(unwrap(model.model)).__name__)


def pre_seg_modules(model):
    """The modules in front of the [SEG] hidden state."""
    return [model.model]


def predict(model, processor, image, text):
    return model.predict_forward(image=image, text=text, processor=processor)


def decoder_layers(model):
    """The text decoder's layers of a Sa2VA Qwen-VL model (through a PEFT wrapper)."""
    return unwrap(model.model).model.language_model.layers


def seg_hidden(model, batch, cache=None):
    """Teacher-forced multimodal forward -> (hidden (B, L, h) after the final norm, [SEG] states (B, h)).
    (No `cache`: the vision tower runs inside the model's own forward.)

    The model's own forward places the vision features and computes M-RoPE positions; the
    [SEG] state is taken as the model's config says (`QwenVL.seg_convention`): `post_norm` (the
    decoder's output) or `pre_norm` (the last decoder layer's output, read by a hook, before the
    final RMSNorm)."""
    vl = unwrap(model.model)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"].to(next(vl.model.visual.parameters()).dtype),
                  image_grid_thw=batch["image_grid_thw"], use_cache=False)
    if "mm_token_type_ids" in batch:
        inputs["mm_token_type_ids"] = batch["mm_token_type_ids"]
    convention = seg_convention(model)
    captured = {}
    hook = None
    if convention == "pre_norm":
        def keep(module, args, output):
            captured["pre_norm"] = output[0] if isinstance(output, tuple) else output
        hook = decoder_layers(model)[-1].register_forward_hook(keep)
    try:
        hidden = vl.model(**inputs).last_hidden_state
    finally:
        if hook is not None:
            hook.remove()
    states = captured.get("pre_norm", hidden)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden, states[rows, batch["seg_index"]]


def seg_hidden_convention(config, arch):
    """Which state a checkpoint's `text_hidden_fcs` was trained on, from its config (config.json as a dict):
    its own `seg_hidden_state` when it records one (this project's folders do); otherwise what
    `hidden_states[-1]` was on the transformers version that wrote it (`transformers_version`):
    Qwen3-VL on 4.x gives the last layer's output before the final norm, everything else after."""
    recorded = config.get("seg_hidden_state")
    if recorded is not None:
        if recorded not in SEG_HIDDEN_STATES:
            raise ValueError(f"config.json seg_hidden_state {recorded!r}: choose from {SEG_HIDDEN_STATES}")
        return recorded
    version = str(config.get("transformers_version") or "5")
    if arch.startswith("Qwen3VL") and int(version.split(".")[0]) < 5:
        return "pre_norm"
    return "post_norm"


# ------------------------------------------------------------------ the HF processor, without torchvision

def image_only_processor(cls, image_processor, tokenizer, chat_template):
    """An instance of `cls` (Qwen3VLProcessor, Qwen2_5_VLProcessor) holding only an image processor and a
    tokenizer (video_processor=None is dropped): the video processor needs torchvision, and predict_forward
    never uses it for an image. The subclass is module-level, one per base, so that the processor pickles
    (DataLoader workers)."""
    name = cls.__name__ + "ImageOnly"
    if name not in globals():
        attributes = ["image_processor", "tokenizer"]
        globals()[name] = type(name, (cls,), dict(attributes=attributes, __module__=__name__,
                                                  get_attributes=classmethod(lambda c: list(attributes))))
    return globals()[name](image_processor, tokenizer, None, chat_template=chat_template)


def load_processor(folder):
    """The folder's processor (AutoProcessor); where that fails (no torchvision, so no video
    processor; or a folder saved with an image-only processor), the same processor class built
    from the folder's image processor, tokenizer and chat template, for images."""
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    try:
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        if hasattr(processor, "image_processor"):  # (an unknown processor class gives back the tokenizer)
            return processor
        reason = f"AutoProcessor gave a {type(processor).__name__}"
    except Exception as error:  # no torchvision (no video processor), or an image-only folder
        reason = f"{type(error).__name__}: {error}"[:300]
    config = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path) as f:
                config = {**json.load(f), **config}
    cls_name = (config.get("processor_class") or "").removesuffix("ImageOnly")
    if not cls_name or not hasattr(transformers, cls_name):
        raise RuntimeError(f"{folder}: cannot build its processor without torchvision ({reason})")
    chat_template = None
    for name in ("chat_template.jinja", "chat_template.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path) as f:
                chat_template = f.read() if name.endswith(".jinja") else json.load(f)["chat_template"]
            break
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    return image_only_processor(getattr(transformers, cls_name), image_processor, tokenizer,
                                chat_template or tokenizer.chat_template)
