"""A tiny Sa2VA of the Qwen-VL family (`--model tiny-qwenvl`), with the released class's surface.

The released `Sa2VAChatModelQwen` (bytedance/Sa2VA, projects/sa2va/hf/models_qwen3vl/ and
models_qwen2_5_vl/) holds `model` (a whole `Qwen3VLForConditionalGeneration` /
`Qwen2_5_VLForConditionalGeneration`), `grounding_encoder` (SAM2), `text_hidden_fcs`, the
processor bounds `min_pixels` / `max_pixels`, and answers with `predict_forward(image, text,
processor=...)`. Here `model` is the transformers class itself at a tiny config (so the code
under test is the real multimodal forward: vision tower, merger, M-RoPE, deepstack for Qwen3-VL),
`grounding_encoder` is the tiny SAM2 stand-in of `common.tiny`, and the processor is the real
Qwen-VL processor class with a byte-level tokenizer and a chat template of the same format.

`predict_forward` follows the released one step by step (image path): SAM2 pixels by a direct
resize, the prompt without `<image>` after the image in one user turn, the processor's chat
template, `qwen_vl_utils`-style resize onto a 28 px grid (`common.qwenvl.fetch_image`, as
`process_vision_info` does), the processor with `min_pixels`/`max_pixels`, greedy `generate`,
`hidden_states[-1]` at the input `[SEG]`, `text_hidden_fcs`, SAM2, bilinear to the image,
sigmoid > 0.5. Differences: `max_new_tokens` 32 (released 2048), SAM2 at the model's dtype
(released: bf16), and `processor` defaults to the one `build_tiny_qwenvl` gives it.

`build_tiny_qwenvl(seed)` teaches the LLM to answer "It is [SEG]." as `common.tiny` does; save
it with `save_tiny_qwenvl(model, folder)` (weights + processor), load with
`common.sa2va.load_model(folder)`, or from the shell: `python -m common.tiny_qwenvl --out DIR`.
"""
import argparse
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

from common import qwenvl
from common.tiny import SEG, TINY_ANSWER, TinySAM2, build_tokenizer, get_seg_hidden_states

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", qwenvl.VISION_START, qwenvl.VISION_END,
                  qwenvl.IMAGE_PAD, "<|video_pad|>", SEG, "<p>", "</p>"]
# The Qwen-VL chat format for one user turn with images and text (Qwen2.5-VL's template starts
# with a default system turn, Qwen3-VL's does not), written for this tiny tokenizer.
_TURNS = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
          "{% for content in message['content'] %}"
          "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
          "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_TEMPLATES = {
    "qwen3_vl": _TURNS,
    "qwen2_5_vl": ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
                   "<|im_end|>\n{% endif %}" + _TURNS),
}
PATCH_SIZE = {"qwen3_vl": 16, "qwen2_5_vl": 14}
MAX_NEW_TOKENS = 32


class TinySa2VAQwenVLConfig(PretrainedConfig):
    model_type = "tiny_sa2va_qwenvl"

    def __init__(self, vl_model_type="qwen3_vl", vl_config=None, sam_config=None, min_tokens=16, max_tokens=64,
                 seg_hidden_state="post_norm", **kwargs):
        super().__init__(**kwargs)
        self.vl_model_type = vl_model_type
        self.vl_config = vl_config or {}
        self.sam_config = {**dict(image_size=256, hidden_dim=64), **(sam_config or {})}
        # processor bounds in merged tokens (the released class: 512 to 2048 tokens of 28 x 28 px)
        self.min_tokens, self.max_tokens = min_tokens, max_tokens
        # the [SEG] state its text_hidden_fcs works on (common.qwenvl.seg_hidden_convention):
        # hidden_states[-1] of generate() on transformers 5, which predict_forward reads
        self.seg_hidden_state = seg_hidden_state


def vl_classes(vl_model_type):
    """(config class, model class, processor class) of a Qwen-VL model_type."""
    import transformers
    if vl_model_type == "qwen3_vl":
        return transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration, transformers.Qwen3VLProcessor
    if vl_model_type == "qwen2_5_vl":
        return (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration,
                transformers.Qwen2_5_VLProcessor)
    raise ValueError(f"vl_model_type must be qwen3_vl or qwen2_5_vl, got {vl_model_type!r}")


def tiny_vl_config(vl_model_type, tokenizer):
    """A tiny Qwen-VL config (as a dict): 2 text layers of width 64, 1 vision block of width 32."""
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", qwenvl.IMAGE_PAD), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", qwenvl.VISION_START), ("vision_end_token_id", qwenvl.VISION_END))}
    import transformers
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                tie_word_embeddings=False)
    # M-RoPE sections must add up to head_dim / 2 = 8 (the defaults are for head_dim 128)
    if int(transformers.__version__.split(".")[0]) >= 5:
        text["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2])
        if vl_model_type == "qwen3_vl":
            text["rope_parameters"]["mrope_interleaved"] = True
    else:  # transformers 4.57: rope_theta + rope_scaling
        text.update(rope_theta=10000.0, rope_scaling=dict(rope_type="default", mrope_section=[4, 2, 2],
                                                          **({"mrope_interleaved": True}
                                                             if vl_model_type == "qwen3_vl" else {"type": "mrope"})))
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH_SIZE[vl_model_type],
                  out_hidden_size=64, spatial_merge_size=2, temporal_patch_size=2)
    if vl_model_type == "qwen3_vl":
        text.update(head_dim=16)
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
    else:
        vision.update(window_size=56, fullatt_block_indexes=[0])
    return dict(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


class TinySa2VAQwenVLModel(PreTrainedModel):
    config_class = TinySa2VAQwenVLConfig
    main_input_name = "pixel_values"
    base_model_prefix = "language_model"  # as released: no such attribute, so no key prefix
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen3VLTextDecoderLayer", "Qwen2_5_VLDecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        config_cls, model_cls, _ = vl_classes(config.vl_model_type)
        vl_config = config_cls(**config.vl_config)
        self.model = model_cls(vl_config)
        sc = config.sam_config
        self.grounding_encoder = TinySAM2(sc["image_size"], sc["hidden_dim"])
        hidden = vl_config.text_config.hidden_size
        self.text_hidden_fcs = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                             nn.Linear(hidden, sc["hidden_dim"]), nn.Dropout(0.0))
        factor = vl_config.vision_config.patch_size * vl_config.vision_config.spatial_merge_size
        self.min_pixels = config.min_tokens * factor * factor
        self.max_pixels = config.max_tokens * factor * factor
        self.processor = None  # set by build_tiny_qwenvl / load_model, or by predict_forward(processor=)
        self.post_init()

    def _init_weights(self, module):
        # keep PyTorch's and the Qwen-VL classes' own initialisation
        pass

    @property
    def lm_head(self):
        return self.model.lm_head

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    @torch.no_grad()
    def predict_forward(self, image=None, video=None, text=None, past_text="", mask_prompts=None, tokenizer=None,
                        processor=None):
        if image is None or video is not None or past_text:
            raise NotImplementedError("the tiny Qwen-VL Sa2VA answers one image (the released image path)")
        processor = processor or self.processor
        assert processor is not None
        self.processor = processor
        self.seg_token_idx = processor.tokenizer.convert_tokens_to_ids(SEG)
        text = text.replace("<image>", "")
        dtype = next(self.grounding_encoder.parameters()).dtype
        ori_image_size = image.size
        sam_size = self.grounding_encoder.sam2_model.image_size
        g_image = np.array(Image.fromarray(np.array(image), mode="RGB").resize((sam_size, sam_size)))  # DirectResize
        g_pixel_values = torch.from_numpy(g_image).permute(2, 0, 1).contiguous().to(dtype)
        g_pixel_values = torch.stack([self.grounding_encoder.preprocess_image(g_pixel_values, dtype)]).to(dtype)
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
        processed_text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image_inputs = [qwenvl.fetch_image(image)]  # qwen_vl_utils.process_vision_info
        with warnings.catch_warnings():  # transformers 5 deprecates these call arguments (predict_forward's)
            warnings.simplefilter("ignore", FutureWarning)
            mm_inputs = processor(text=[processed_text], images=image_inputs, videos=None, padding=True,
                                  return_tensors="pt", min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        mm_inputs = mm_inputs.to(self.device)
        generate_output = self.model.generate(**mm_inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                              output_hidden_states=True, return_dict_in_generate=True)
        trimmed = [out[len(inp):] for inp, out in zip(mm_inputs.input_ids, generate_output.sequences)]
        predict = processor.batch_decode(trimmed, skip_special_tokens=False)[0].strip()
        last_hidden_states = torch.cat([item[-1][0] for item in generate_output.hidden_states], dim=0)
        seg_hidden_states = get_seg_hidden_states(last_hidden_states, generate_output.sequences[0][:-1],
                                                  self.seg_token_idx)
        ret_masks = []
        for seg in self.text_hidden_fcs(seg_hidden_states):
            sam_states = self.grounding_encoder.get_sam2_embeddings(g_pixel_values)
            pred_masks = self.grounding_encoder.language_embd_inference(sam_states, [seg[None]])
            w, h = ori_image_size
            masks = F.interpolate(pred_masks, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            ret_masks.append((masks.sigmoid() > 0.5).cpu().numpy())
        return {"prediction": predict, "prediction_masks": ret_masks}


def build_processor(vl_model_type, tokenizer):
    """The Qwen-VL processor class for images: its image processor at the tiny patch size, this
    tokenizer and the family's chat format (`common.qwenvl.image_only_processor`)."""
    import transformers
    _, _, processor_cls = vl_classes(vl_model_type)
    image_cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    mean_std = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if vl_model_type == "qwen3_vl" else {}
    image_processor = image_cls(patch_size=PATCH_SIZE[vl_model_type], merge_size=2, temporal_patch_size=2, **mean_std)
    tokenizer.chat_template = CHAT_TEMPLATES[vl_model_type]
    return qwenvl.image_only_processor(processor_cls, image_processor, tokenizer, CHAT_TEMPLATES[vl_model_type])


def teach_answer(model, processor, answer=TINY_ANSWER, steps=60, seed=0):
    """Teacher-force the tiny model to answer `answer` after the vessel prompt for random images,
    through the Qwen-VL model's own forward (as common.tiny.teach_answer does for InternVL)."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (size, size + 16, 3), dtype=np.uint8)) for size in (96, 128)]
    encoded = [qwenvl.encode(processor, im, "<image>\nPlease segment the blood vessel.", answer,
                             model.min_pixels, model.max_pixels) for im in images]
    opt = torch.optim.Adam(model.model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        e = encoded[step % len(encoded)]
        ids = torch.tensor([e["prompt_ids"] + e["answer_ids"]])
        labels = ids.clone()
        labels[:, :len(e["prompt_ids"])] = -100
        extra = {"mm_token_type_ids": torch.tensor([e["mm_token_type_ids"]])} if "mm_token_type_ids" in e else {}
        loss = model.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=e["pixel_values"],
                           image_grid_thw=e["image_grid_thw"], labels=labels, **extra).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


def build_tiny_qwenvl(seed=0, vl_model_type="qwen3_vl", teach=True):
    """(model, tokenizer) of the tiny Qwen-VL Sa2VA, deterministic in `seed`; `model.processor` is set."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(SPECIAL_TOKENS)
    config = TinySa2VAQwenVLConfig(vl_model_type=vl_model_type, vl_config=tiny_vl_config(vl_model_type, tokenizer))
    model = TinySa2VAQwenVLModel(config)
    model.model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                                     pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.processor = build_processor(vl_model_type, tokenizer)
    if teach:
        teach_answer(model, model.processor, seed=seed)
    return model, tokenizer


def save_tiny_qwenvl(model, folder):
    """Weights + config (save_pretrained) and the processor (tokenizer, image processor, chat template)."""
    model.save_pretrained(folder)
    model.processor.save_pretrained(folder)


def main():
    parser = argparse.ArgumentParser(description="Write the tiny Qwen-VL Sa2VA (--model tiny-qwenvl) as a folder.")
    parser.add_argument("--out", required=True, help="folder to write (model + processor)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    parser.add_argument("--vl", choices=("qwen3_vl", "qwen2_5_vl"), default="qwen3_vl", help="the Qwen-VL class inside")
    args = parser.parse_args()
    model, _ = build_tiny_qwenvl(args.seed, args.vl)
    save_tiny_qwenvl(model, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny Qwen-VL Sa2VA ({args.vl}, {n / 1e6:.2f}M parameters) written to {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
