"""The embedded default model: a tiny Sa2VA with the released model's surface.

The released InternVL-family `Sa2VAChatModel` (bytedance/Sa2VA, projects/sa2va/hf/models/
modeling_sa2va_chat.py) holds `vision_model`, `mlp1`, `language_model`, `text_hidden_fcs`
and `grounding_encoder.sam2_model`, and answers with `predict_forward(image, text,
tokenizer)`. This module builds the same thing at a size that trains on a CPU in well under
a second per step, so that tests and `run.sh quick` run the exact code path used on real
checkpoints:

- `language_model` is a real `transformers.Qwen2ForCausalLM` (Sa2VA-1B/4B use Qwen2.5), so
  PEFT LoRA targets real `q_proj/k_proj/v_proj/o_proj` modules;
- the tokenizer is a real `PreTrainedTokenizerFast` (byte level) with `[SEG]`, `<img>`,
  `</img>`, `<IMG_CONTEXT>` and Qwen's chat markers;
- `grounding_encoder.sam2_model` has SAM2's training-path methods with SAM2's semantics
  (`image_encoder`, `forward_image`, `_prepare_backbone_features`, `no_mem_embed`,
  `_use_multimask`, `_forward_sam_heads` returning the same 7-tuple, a mask decoder with
  `conv_s0/conv_s1`, 1 + 3 mask tokens, IoU and object-score heads) and the video-memory ones
  (`memory_attention`, `memory_encoder`, `_prepare_memory_conditioned_features`,
  `_encode_new_memory`, `track_step`; random, untrained: inference plumbing for `common.video`);
- `predict_forward` follows the released one step by step: template INSTRUCTION only, dynamic
  tiling, ImageNet normalisation, greedy `generate`, the hidden state at the `[SEG]` fed as
  input, SAM2 at `image_size`, low-res logits -> bilinear to `image_size` -> bilinear to the
  original size -> sigmoid > 0.5.

`build_tiny_model(seed)` also teaches the random LLM to answer "It is [SEG]." (a few seconds of
teacher-forced steps), as released checkpoints do, so the generate path yields a `[SEG]`.
Save and load it as a folder with `save_pretrained` / `TinySa2VAChatModel.from_pretrained`
(`common.sa2va.load_model` recognises the folder), or from the shell:
`python -m common.tiny --out DIR`.
"""
import argparse
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import (GenerationConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM)
from transformers.modeling_outputs import BaseModelOutput

from common.internvl import (IMAGENET_MEAN, IMAGENET_STD, IMG_CONTEXT, IMG_END, IMG_START, SEG, dynamic_preprocess,
                             pil_to_normalized)

# Qwen's chat markers, as in the released `qwen_chat` template that Sa2VA-1B/4B use.
QWEN_CHAT = dict(
    SYSTEM="<|im_start|>system\n{system}<|im_end|>\n",
    INSTRUCTION="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    SUFFIX="<|im_end|>",
    SUFFIX_AS_EOS=True,
    SEP="\n",
    STOP_WORDS=["<|im_end|>", "<|endoftext|>"],
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMG_START, IMG_END, IMG_CONTEXT, SEG,
                  "<p>", "</p>", "<vp>", "</vp>"]
TINY_ANSWER = "It is [SEG]."
TINY_SAM_SIZE_ENV = "SA2VA_TINY_SAM_SIZE"
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_weights")  # common.tiny_pretrain's output


def build_tokenizer(special_tokens=SPECIAL_TOKENS):
    """Byte-level tokenizer (256 byte symbols, no merges) plus Sa2VA's special tokens (the first
    is the padding token, `<|im_end|>` ends a turn)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    byte_symbols = pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(sorted(byte_symbols))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token=special_tokens[0],
                                        additional_special_tokens=list(special_tokens[1:]))
    return tokenizer


class TinySa2VAConfig(PretrainedConfig):
    model_type = "tiny_sa2va"

    def __init__(self, vision_config=None, llm_config=None, sam_config=None, select_layer=-1,
                 force_image_size=56, downsample_ratio=0.5, template="qwen_chat", use_thumbnail=True,
                 ps_version="v2", min_dynamic_patch=1, max_dynamic_patch=4, **kwargs):
        super().__init__(**kwargs)
        self.vision_config = {**dict(image_size=56, patch_size=14, hidden_size=32, num_layers=1, num_heads=2),
                              **(vision_config or {})}
        self.llm_config = {**dict(vocab_size=267, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                  tie_word_embeddings=False), **(llm_config or {})}
        # SAM2's input size as released (1024 px -> 256 x 256 low-res logits): a coarser grid caps the
        # Dice of thin vessels whatever the training (64 x 64: ~0.60 on DRIVE, README "Real images")
        self.sam_config = {**dict(image_size=1024, hidden_dim=128), **(sam_config or {})}
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch


# ---------------------------------------------------------------- vision encoder (InternViT stand-in)

class TinyVisionModel(nn.Module):
    """Patch embedding + class token + transformer layers; returns `last_hidden_state` with the
    class token first, as InternViT does (Sa2VA drops it with `[:, 1:]`)."""

    def __init__(self, image_size, patch_size, hidden_size, num_layers, num_heads):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, hidden_size, patch_size, patch_size)
        self.class_embedding = nn.Parameter(torch.randn(1, 1, hidden_size) * 0.02)
        self.position_embedding = nn.Parameter(torch.randn(1, (image_size // patch_size) ** 2 + 1, hidden_size) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden_size, num_heads, 2 * hidden_size, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(num_layers))

    @property
    def dtype(self):
        return self.patch_embed.weight.dtype

    def forward(self, pixel_values, output_hidden_states=False, return_dict=True):
        x = self.patch_embed(pixel_values.to(self.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embedding
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x)
            hidden_states.append(x)
        return BaseModelOutput(last_hidden_state=x, hidden_states=tuple(hidden_states) if output_hidden_states else None)


# ---------------------------------------------------------------- SAM2 stand-in

def sine_position_encoding(channels, height, width, device, dtype):
    """2D sine/cosine encoding, (1, channels, height, width), as SAM2's PositionEmbeddingSine."""
    quarter = channels // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys = torch.linspace(0, 2 * math.pi, height, device=device)[:, None] * freqs  # (H, q)
    xs = torch.linspace(0, 2 * math.pi, width, device=device)[:, None] * freqs  # (W, q)
    y = torch.cat([ys.sin(), ys.cos()], -1)[:, None, :].expand(height, width, 2 * quarter)
    x = torch.cat([xs.sin(), xs.cos()], -1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([y, x], -1).permute(2, 0, 1)[None].to(dtype)


class LayerNorm2d(nn.Module):
    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def filter_bank(size):
    """8 unit-norm (size x size) filters: Gaussian, two differences of Gaussians, ridge
    (second-derivative) filters at 4 orientations, a Laplacian of Gaussian."""
    r = torch.arange(size, dtype=torch.float64) - size // 2
    y, x = torch.meshgrid(r, r, indexing="ij")

    def gauss(sigma):
        g = torch.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))
        return g / g.sum()

    filters = [gauss(1.0), gauss(0.8) - gauss(1.6), gauss(1.2) - gauss(2.4)]
    for angle in (0, math.pi / 4, math.pi / 2, 3 * math.pi / 4):
        n = x * math.cos(angle) + y * math.sin(angle)  # coordinate across the ridge
        sigma = 1.2
        filters.append((n ** 2 / sigma ** 2 - 1) * gauss(sigma))
    filters.append((x ** 2 + y ** 2 - 2 * 2.0 ** 2) * gauss(2.0))
    filters = [f - f.mean() if i else f for i, f in enumerate(filters)]  # zero-mean but the Gaussian
    return torch.stack([f / f.norm() for f in filters]).float()


class ResidualBlock(nn.Module):
    def __init__(self, channels, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.gelu(self.conv1(x)))


def residual_blocks(channels, dilations):
    return [ResidualBlock(channels, d) for d in dilations]


class TinyImageEncoder(nn.Module):
    """Conv trunk at strides 4, 8, 16 + an FPN neck to `d_model`: the dict SAM2's ImageEncoder
    returns (`vision_features`, `vision_pos_enc`, `backbone_fpn`, highest resolution first)."""

    def __init__(self, d_model):
        super().__init__()
        widths = (64, 96, 128)
        # SAM2's encoder is pretrained; a random frozen one sees little of a 1-2 px vessel. The
        # stand-in's first layer is a fixed bank of smoothing, centre-surround and oriented
        # ridge filters (both signs), so the frozen features carry what a pretrained one would.
        # Dilated blocks at every stride: a 1-2 px vessel is decided at stride 4 and told from a
        # blob by its course; with one block there the trained model scored as well on its
        # training frames as on new ones (at capacity, README "The embedded model").
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 7, 2, 3), nn.GELU(), nn.Conv2d(16, widths[0], 3, 2, 1),
                                  nn.GELU(), *residual_blocks(widths[0], (1, 2, 4)))
        with torch.no_grad():
            bank = filter_bank(7)
            self.stem[0].weight.copy_(torch.cat([bank, -bank])[:, None].expand(-1, 3, -1, -1) / 3)
            self.stem[0].bias.zero_()
        self.stage2 = nn.Sequential(nn.Conv2d(widths[0], widths[1], 3, 2, 1), nn.GELU(), *residual_blocks(widths[1], (1, 2)))
        self.stage3 = nn.Sequential(nn.Conv2d(widths[1], widths[2], 3, 2, 1), nn.GELU(), *residual_blocks(widths[2], (1, 2)))
        self.neck = nn.ModuleList(nn.Conv2d(w, d_model, 1) for w in widths)
        self.d_model = d_model

    def forward(self, sample):
        x0 = self.stem(sample)
        x1 = self.stage2(x0)
        x2 = self.stage3(x1)
        fpn = [conv(x) for conv, x in zip(self.neck, (x0, x1, x2))]
        # top-down fusion down to the finest level (SAM2's FpnNeck fuses its coarser levels; the
        # stand-in's shallow trunk needs the context at stride 4, where thin vessels are decided)
        for level in (1, 0):
            fpn[level] = fpn[level] + F.interpolate(fpn[level + 1], size=fpn[level].shape[-2:], mode="nearest")
        pos = [sine_position_encoding(self.d_model, *f.shape[-2:], f.device, f.dtype).expand(f.shape[0], -1, -1, -1)
               for f in fpn]
        return {"vision_features": fpn[-1], "vision_pos_enc": pos, "backbone_fpn": fpn}


class TinyPromptEncoder(nn.Module):
    """No points, boxes or masks are given in Sa2VA: the sparse prompt is the padding point
    ("not a point") twice, the dense prompt is `no_mask_embed`, as in SAM2's PromptEncoder."""

    def __init__(self, embed_dim, image_embedding_size):
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = (image_embedding_size, image_embedding_size)
        self.mask_input_size = (4 * image_embedding_size, 4 * image_embedding_size)
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self):
        device, dtype = self.no_mask_embed.weight.device, self.no_mask_embed.weight.dtype
        return sine_position_encoding(self.embed_dim, *self.image_embedding_size, device, dtype)

    def forward(self, points, boxes, masks):
        if boxes is not None or masks is not None:
            raise NotImplementedError("the tiny prompt encoder takes only Sa2VA's empty point prompt")
        coords, labels = points
        batch = coords.shape[0]
        # SAM2 pads with one more label -1 point when no box is given: two "not a point" tokens
        sparse = self.not_a_point_embed.weight[None].expand(batch, labels.shape[1] + 1, -1)
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, *self.image_embedding_size)
        return sparse, dense


class TwoWayBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_token_to_image = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.cross_image_to_token = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))

    def forward(self, tokens, image, token_pe, image_pe):
        q = tokens + token_pe
        tokens = self.norms[0](tokens + self.self_attn(q, q, tokens, need_weights=False)[0])
        q, k = tokens + token_pe, image + image_pe
        tokens = self.norms[1](tokens + self.cross_token_to_image(q, k, image, need_weights=False)[0])
        tokens = self.norms[2](tokens + self.mlp(tokens))
        q, k = tokens + token_pe, image + image_pe
        image = self.norms[3](image + self.cross_image_to_token(k, q, tokens, need_weights=False)[0])
        return tokens, image


class TinyMaskDecoder(nn.Module):
    """SAM2's MaskDecoder at tiny width: object-score, IoU and 1 + 3 mask tokens; a two-way
    transformer; upscaling x4 with the high-resolution features from conv_s0/conv_s1;
    hypernetwork MLPs; `forward(..., multimask_output)` keeps masks 1..3 when True, mask 0 else."""

    def __init__(self, dim, heads=2, num_multimask_outputs=3):
        super().__init__()
        self.num_mask_tokens = num_multimask_outputs + 1
        self.obj_score_token = nn.Embedding(1, dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.transformer = TwoWayBlock(dim, heads)
        self.final_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.final_norm = nn.LayerNorm(dim)
        self.output_upscaling = nn.ModuleList([nn.ConvTranspose2d(dim, dim // 4, 2, 2), LayerNorm2d(dim // 4),
                                               nn.ConvTranspose2d(dim // 4, dim // 8, 2, 2)])
        self.conv_s0 = nn.Conv2d(dim, dim // 8, 1)
        self.conv_s1 = nn.Conv2d(dim, dim // 4, 1)
        self.output_hypernetworks_mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim // 8)) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, self.num_mask_tokens))
        self.pred_obj_score_head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1))

    def predict_masks(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                      high_res_features):
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.obj_score_token.weight, self.iou_token.weight, self.mask_tokens.weight], 0)
        output_tokens = output_tokens[None].expand(batch, -1, -1).to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)
        src = image_embeddings + dense_prompt_embeddings
        b, c, h, w = src.shape
        image = src.flatten(2).transpose(1, 2)
        image_pos = image_pe.expand(b, -1, -1, -1).flatten(2).transpose(1, 2)
        hs, image = self.transformer(tokens, image, tokens, image_pos)
        q = hs + tokens
        hs = self.final_norm(hs + self.final_attn(q, image + image_pos, image, need_weights=False)[0])
        iou_token_out = hs[:, 1]
        mask_tokens_out = hs[:, 2:2 + self.num_mask_tokens]
        src = image.transpose(1, 2).reshape(b, c, h, w)
        dc1, ln1, dc2 = self.output_upscaling
        feat_s0, feat_s1 = high_res_features
        upscaled = F.gelu(ln1(dc1(src) + feat_s1))
        upscaled = F.gelu(dc2(upscaled) + feat_s0)
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        iou_pred = self.iou_prediction_head(iou_token_out)
        object_score_logits = self.pred_obj_score_head(hs[:, 0])
        return masks, iou_pred, mask_tokens_out, object_score_logits

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output, repeat_image, high_res_features=None):
        masks, iou_pred, mask_tokens_out, object_score_logits = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, high_res_features)
        if multimask_output:
            return masks[:, 1:], iou_pred[:, 1:], mask_tokens_out[:, 1:], object_score_logits
        return masks[:, 0:1], iou_pred[:, 0:1], mask_tokens_out[:, 0:1], object_score_logits


class TinyMemoryEncoder(nn.Module):
    """SAM2's MemoryEncoder at tiny width: the (already sigmoided, scaled) mask downsampled x16 by
    strided convs, added to the projected frame features, a fuser block, projection to `mem_dim`;
    returns `vision_features` (B, mem_dim, h, w) and `vision_pos_enc` [(B, mem_dim, h, w)]."""

    def __init__(self, in_dim, mem_dim, stride=16):
        super().__init__()
        layers, channels = [], 1
        for _ in range(int(math.log2(stride))):
            layers += [nn.Conv2d(channels, channels * 4, 3, 2, 1), LayerNorm2d(channels * 4), nn.GELU()]
            channels *= 4
        self.mask_downsampler = nn.Sequential(*layers, nn.Conv2d(channels, in_dim, 1))
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, 1)
        self.fuser = nn.Sequential(nn.Conv2d(in_dim, in_dim, 7, padding=3, groups=in_dim), LayerNorm2d(in_dim),
                                   nn.Conv2d(in_dim, in_dim, 1), nn.GELU())
        self.out_proj = nn.Conv2d(in_dim, mem_dim, 1)
        self.mem_dim = mem_dim

    def forward(self, pix_feat, masks, skip_mask_sigmoid=False):
        if not skip_mask_sigmoid:
            masks = torch.sigmoid(masks)
        masks = self.mask_downsampler(masks)
        x = self.pix_feat_proj(pix_feat.to(masks.device)) + masks
        x = self.out_proj(x + self.fuser(x))  # the fuser's CXBlocks are residual
        pos = sine_position_encoding(self.mem_dim, *x.shape[-2:], x.device, x.dtype).expand(x.shape[0], -1, -1, -1)
        return {"vision_features": x, "vision_pos_enc": [pos]}


class TinyMemoryAttentionLayer(nn.Module):
    """Pre-norm self-attention on the frame, cross-attention to the memory (keys and values of
    `mem_dim`, position encodings on the keys), MLP: SAM2's MemoryAttentionLayer without RoPE."""

    def __init__(self, d_model, mem_dim, heads=2):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.cross_attn_image = nn.MultiheadAttention(d_model, heads, kdim=mem_dim, vdim=mem_dim, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.ReLU(), nn.Linear(2 * d_model, d_model))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(3))

    def forward(self, tgt, memory, memory_pos):
        x = self.norms[0](tgt)
        tgt = tgt + self.self_attn(x, x, x, need_weights=False)[0]
        x = self.norms[1](tgt)
        tgt = tgt + self.cross_attn_image(x, memory + memory_pos, memory, need_weights=False)[0]
        return tgt + self.mlp(self.norms[2](tgt))


class TinyMemoryAttention(nn.Module):
    """SAM2's MemoryAttention: the current frame's features (HW, B, C) attend to the memory
    (M, B, mem_dim: spatial memories of earlier frames, then object-pointer tokens); sequence-first
    in and out, 0.1 x the position encoding added at the input, a final LayerNorm."""

    def __init__(self, d_model, mem_dim, num_layers=1):
        super().__init__()
        self.d_model = d_model
        self.pos_enc_at_input = True
        self.layers = nn.ModuleList(TinyMemoryAttentionLayer(d_model, mem_dim) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, curr, memory, curr_pos=None, memory_pos=None, num_obj_ptr_tokens=0):
        if isinstance(curr, list):
            curr, curr_pos = curr[0], curr_pos[0]
        output = curr + 0.1 * curr_pos if self.pos_enc_at_input and curr_pos is not None else curr
        output, memory, memory_pos = (x.transpose(0, 1) for x in (output, memory, memory_pos))
        for layer in self.layers:
            output = layer(output, memory, memory_pos)
        return self.norm(output).transpose(0, 1)


class TinySAM2Base(nn.Module):
    """The SAM2Base methods Sa2VA's training and inference paths call, with SAM2's semantics."""

    def __init__(self, image_size, hidden_dim):
        super().__init__()
        self.image_size = image_size
        self.hidden_dim = hidden_dim
        self.sam_prompt_embed_dim = hidden_dim
        self.sam_image_embedding_size = image_size // 16
        self.num_feature_levels = 3
        self.use_high_res_features_in_sam = True
        self.directly_add_no_mem_embed = True
        self.multimask_output_in_sam = True
        self.multimask_output_for_tracking = True
        self.multimask_min_pt_num, self.multimask_max_pt_num = 0, 1
        self.pred_obj_scores = True
        self.image_encoder = TinyImageEncoder(hidden_dim)
        self.sam_prompt_encoder = TinyPromptEncoder(hidden_dim, self.sam_image_embedding_size)
        self.sam_mask_decoder = TinyMaskDecoder(hidden_dim)
        self.no_mem_embed = nn.Parameter(torch.randn(1, 1, hidden_dim) * 0.02)
        self.obj_ptr_proj = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim))
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, hidden_dim))
        # video memory (inference only here): SAM2's settings as Sa2VA builds its SAM2VideoPredictor
        self.num_maskmem = 7  # 1 conditioning + 6 previous frames
        self.mem_dim = hidden_dim // 4  # SAM2: 64 of 256; an object pointer becomes 4 memory tokens
        self.max_obj_ptrs_in_encoder = 16
        self.sigmoid_scale_for_mem_enc, self.sigmoid_bias_for_mem_enc = 20.0, -10.0
        self.binarize_mask_from_pts_for_mem_enc = False
        # built from their own seed so that adding them left every other tiny weight as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            self.memory_attention = TinyMemoryAttention(hidden_dim, self.mem_dim)
            self.memory_encoder = TinyMemoryEncoder(hidden_dim, self.mem_dim)
            self.maskmem_tpos_enc = nn.Parameter(torch.randn(self.num_maskmem, 1, 1, self.mem_dim) * 0.02)

    @property
    def device(self):
        return self.no_mem_embed.device

    def forward_image(self, img_batch):
        backbone_out = self.image_encoder(img_batch)
        backbone_out["backbone_fpn"][0] = self.sam_mask_decoder.conv_s0(backbone_out["backbone_fpn"][0])
        backbone_out["backbone_fpn"][1] = self.sam_mask_decoder.conv_s1(backbone_out["backbone_fpn"][1])
        return backbone_out

    def _prepare_backbone_features(self, backbone_out):
        backbone_out = backbone_out.copy()
        feature_maps = backbone_out["backbone_fpn"][-self.num_feature_levels:]
        vision_pos_embeds = backbone_out["vision_pos_enc"][-self.num_feature_levels:]
        feat_sizes = [(x.shape[-2], x.shape[-1]) for x in vision_pos_embeds]
        vision_feats = [x.flatten(2).permute(2, 0, 1) for x in feature_maps]
        vision_pos_embeds = [x.flatten(2).permute(2, 0, 1) for x in vision_pos_embeds]
        return backbone_out, vision_feats, vision_pos_embeds, feat_sizes

    def _use_multimask(self, is_init_cond_frame, point_inputs):
        num_pts = 0 if point_inputs is None else point_inputs["point_labels"].size(1)
        return (self.multimask_output_in_sam and (is_init_cond_frame or self.multimask_output_for_tracking)
                and (self.multimask_min_pt_num <= num_pts <= self.multimask_max_pt_num))

    def _forward_sam_heads(self, backbone_features, point_inputs=None, mask_inputs=None, high_res_features=None,
                           multimask_output=False, language_embd=None):
        batch, device = backbone_features.size(0), backbone_features.device
        coords = torch.zeros(batch, 1, 2, device=device)
        labels = -torch.ones(batch, 1, dtype=torch.int32, device=device)
        sparse, dense = self.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        if language_embd is not None:
            sparse = torch.cat([sparse.to(language_embd.dtype), language_embd], dim=1)
        low_res_multimasks, ious, sam_output_tokens, object_score_logits = self.sam_mask_decoder(
            image_embeddings=backbone_features, image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask_output,
            repeat_image=False, high_res_features=high_res_features)
        low_res_multimasks = low_res_multimasks.float()
        high_res_multimasks = F.interpolate(low_res_multimasks, size=(self.image_size, self.image_size),
                                            mode="bilinear", align_corners=False)
        sam_output_token = sam_output_tokens[:, 0]
        if multimask_output:
            best = torch.argmax(ious, dim=-1)
            rows = torch.arange(batch, device=device)
            low_res_masks = low_res_multimasks[rows, best].unsqueeze(1)
            high_res_masks = high_res_multimasks[rows, best].unsqueeze(1)
            sam_output_token = sam_output_tokens[rows, best]
        else:
            low_res_masks, high_res_masks = low_res_multimasks, high_res_multimasks
        obj_ptr = self.obj_ptr_proj(sam_output_token)
        appearing = object_score_logits.sigmoid()
        obj_ptr = appearing * obj_ptr + (1 - appearing) * self.no_obj_ptr
        return (low_res_multimasks, high_res_multimasks, ious, low_res_masks, high_res_masks, obj_ptr,
                object_score_logits)


    # -- video tracking: SAM2Base's memory read-out, memory encoding and track_step (forward in time,
    # memory stride 1, every conditioning frame attended to: SAM2's evaluation settings in Sa2VA)

    def _prepare_memory_conditioned_features(self, frame_idx, is_init_cond_frame, current_vision_feats,
                                             current_vision_pos_embeds, feat_sizes, output_dict, num_frames,
                                             track_in_reverse=False):
        """A conditioning frame: its features + no_mem_embed. Any other frame: its features after memory
        attention over the conditioning frames' memories (temporal position 0), the memories of the
        num_maskmem - 1 frames before it, and the object pointers of the conditioning frames up to it
        and of up to max_obj_ptrs_in_encoder - 1 frames before it."""
        batch, channels = current_vision_feats[-1].size(1), self.hidden_dim
        height, width = feat_sizes[-1]
        if is_init_cond_frame:
            return (current_vision_feats[-1] + self.no_mem_embed).permute(1, 2, 0).view(batch, channels, height, width)
        if track_in_reverse:
            raise NotImplementedError("the tiny SAM2 tracks forward in time only")
        device = current_vision_feats[-1].device
        cond, non_cond = output_dict["cond_frame_outputs"], output_dict["non_cond_frame_outputs"]
        previous = [(0, out) for out in cond.values()]
        previous += [(t_pos, non_cond.get(frame_idx - (self.num_maskmem - t_pos))) for t_pos in range(1, self.num_maskmem)]
        memory, memory_pos = [], []
        for t_pos, prev in previous:
            if prev is None:
                continue
            memory.append(prev["maskmem_features"].to(device).flatten(2).permute(2, 0, 1))
            pos = prev["maskmem_pos_enc"][-1].to(device).flatten(2).permute(2, 0, 1)
            memory_pos.append(pos + self.maskmem_tpos_enc[self.num_maskmem - t_pos - 1])
        pointers = [out["obj_ptr"] for t, out in cond.items() if t <= frame_idx]
        for t_diff in range(1, min(num_frames, self.max_obj_ptrs_in_encoder)):
            if frame_idx - t_diff < 0:
                break
            out = non_cond.get(frame_idx - t_diff)
            if out is not None:
                pointers.append(out["obj_ptr"])
        num_obj_ptr_tokens = 0
        if pointers:  # (P, B, C) -> P * C / mem_dim tokens of mem_dim, no temporal encoding (as Sa2VA's SAM2)
            ptrs = torch.stack(pointers).reshape(-1, batch, channels // self.mem_dim, self.mem_dim)
            ptrs = ptrs.permute(0, 2, 1, 3).flatten(0, 1)
            memory.append(ptrs)
            memory_pos.append(torch.zeros_like(ptrs))
            num_obj_ptr_tokens = ptrs.shape[0]
        memory = torch.cat([m.to(current_vision_feats[-1].dtype) for m in memory])
        pix = self.memory_attention(curr=current_vision_feats, curr_pos=current_vision_pos_embeds, memory=memory,
                                    memory_pos=torch.cat(memory_pos).to(memory.dtype),
                                    num_obj_ptr_tokens=num_obj_ptr_tokens)
        return pix.permute(1, 2, 0).view(batch, channels, height, width)

    def _encode_new_memory(self, current_vision_feats, feat_sizes, pred_masks_high_res, is_mask_from_pts):
        """The frame's features and its predicted mask (sigmoid x 20 - 10) -> a memory."""
        batch, channels = current_vision_feats[-1].size(1), self.hidden_dim
        pix_feat = current_vision_feats[-1].permute(1, 2, 0).view(batch, channels, *feat_sizes[-1])
        if self.binarize_mask_from_pts_for_mem_enc and is_mask_from_pts and not self.training:
            mask = (pred_masks_high_res > 0).float()
        else:
            mask = torch.sigmoid(pred_masks_high_res)
        mask = mask * self.sigmoid_scale_for_mem_enc + self.sigmoid_bias_for_mem_enc
        out = self.memory_encoder(pix_feat, mask.to(pix_feat.dtype), skip_mask_sigmoid=True)
        return out["vision_features"], out["vision_pos_enc"]

    def track_step(self, frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds, feat_sizes,
                   point_inputs, mask_inputs, output_dict, num_frames, track_in_reverse=False, run_mem_encoder=True,
                   prev_sam_mask_logits=None, language_embd=None):
        """One frame of tracking, as Sa2VA's SAM2Base.track_step: memory-conditioned features, the SAM
        heads (with the [SEG] prompt when `language_embd` is given), then optionally a new memory."""
        if point_inputs is not None or mask_inputs is not None or prev_sam_mask_logits is not None:
            raise NotImplementedError("the tiny SAM2 takes only Sa2VA's language prompt")
        high_res = [x.permute(1, 2, 0).view(x.size(1), x.size(2), *s)
                    for x, s in zip(current_vision_feats[:-1], feat_sizes[:-1])]
        pix = self._prepare_memory_conditioned_features(frame_idx, is_init_cond_frame, current_vision_feats[-1:],
                                                        current_vision_pos_embeds[-1:], feat_sizes[-1:], output_dict,
                                                        num_frames, track_in_reverse)
        _, _, _, low_res, high_res_masks, obj_ptr, _ = self._forward_sam_heads(
            pix, high_res_features=high_res, multimask_output=self._use_multimask(is_init_cond_frame, None),
            language_embd=language_embd)
        out = dict(point_inputs=None, mask_inputs=None, pred_masks=low_res, pred_masks_high_res=high_res_masks,
                   obj_ptr=obj_ptr, maskmem_features=None, maskmem_pos_enc=None)
        if run_mem_encoder and self.num_maskmem > 0:
            out["maskmem_features"], out["maskmem_pos_enc"] = self._encode_new_memory(
                current_vision_feats, feat_sizes, high_res_masks, is_mask_from_pts=False)
        return out


class TinySAM2(nn.Module):
    """The `grounding_encoder` wrapper: `sam2_model`, `hidden_dim`, `preprocess_image` and the
    inference calls `predict_forward` uses (`get_sam2_embeddings`, `language_embd_inference`)."""

    def __init__(self, image_size, hidden_dim):
        super().__init__()
        self.sam2_model = TinySAM2Base(image_size, hidden_dim)
        self.hidden_dim = hidden_dim
        self.img_mean = IMAGENET_MEAN
        self.img_std = IMAGENET_STD

    def preprocess_image(self, image, dtype=torch.float32):
        image = image.to(dtype) / 255.0
        mean = torch.tensor(self.img_mean, dtype=dtype, device=image.device)[:, None, None]
        std = torch.tensor(self.img_std, dtype=dtype, device=image.device)[:, None, None]
        return (image - mean) / std

    def get_sam2_embeddings(self, images):
        return {"images": images}

    def language_embd_inference(self, inference_state, language_embd):
        """One conditioning frame per image, as SAM2VideoPredictor.add_language_embd +
        propagate_in_video do for a single image: no memory, multimask, best IoU; the
        256px logits come back resized to image_size x image_size."""
        sam = self.sam2_model
        out = []
        for frame, embd in zip(inference_state["images"], language_embd):
            backbone_out = sam.forward_image(frame[None])
            _, feats, _, sizes = sam._prepare_backbone_features(backbone_out)
            high_res = [x.permute(1, 2, 0).view(x.size(1), x.size(2), *s) for x, s in zip(feats[:-1], sizes[:-1])]
            pix = (feats[-1] + sam.no_mem_embed).permute(1, 2, 0).view(1, sam.hidden_dim, *sizes[-1])
            low_res = sam._forward_sam_heads(pix, high_res_features=high_res,
                                             multimask_output=sam._use_multimask(True, None),
                                             language_embd=embd[None])[3]
            out.append(F.interpolate(low_res, size=(sam.image_size, sam.image_size), mode="bilinear",
                                     align_corners=False))
        return torch.cat(out, dim=0)


# ---------------------------------------------------------------- the chat model

class TinySa2VAChatModel(PreTrainedModel):
    config_class = TinySa2VAConfig
    main_input_name = "pixel_values"
    base_model_prefix = "language_model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        vc, lc, sc = config.vision_config, config.llm_config, config.sam_config
        image_size = config.force_image_size or vc["image_size"]
        self.patch_size = vc["patch_size"]
        self.select_layer = config.select_layer
        self.template = QWEN_CHAT
        self.num_image_token = int((image_size // self.patch_size) ** 2 * (config.downsample_ratio ** 2))
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.llm_arch_name = "Qwen2ForCausalLM"
        self.vision_model = TinyVisionModel(image_size, vc["patch_size"], vc["hidden_size"], vc["num_layers"],
                                            vc["num_heads"])
        self.language_model = Qwen2ForCausalLM(Qwen2Config(**lc))
        vit_hidden, llm_hidden = vc["hidden_size"], lc["hidden_size"]
        shuffled = vit_hidden * int(1 / self.downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(nn.LayerNorm(shuffled), nn.Linear(shuffled, llm_hidden), nn.GELU(),
                                  nn.Linear(llm_hidden, llm_hidden))
        self.grounding_encoder = TinySAM2(sc["image_size"], sc["hidden_dim"])
        self.text_hidden_fcs = nn.Sequential(nn.Linear(llm_hidden, llm_hidden), nn.ReLU(inplace=True),
                                             nn.Linear(llm_hidden, sc["hidden_dim"]), nn.Dropout(0.0))
        self.img_context_token_id = None
        self.init_prediction_config = False
        # the image settings the released `preparing_for_generation` sets, here from the config
        self.min_dynamic_patch = config.min_dynamic_patch
        self.max_dynamic_patch = config.max_dynamic_patch
        self.image_size = image_size
        self.use_thumbnail = config.use_thumbnail
        self.post_init()

    def _init_weights(self, module):
        # keep PyTorch's and Qwen2's own initialisation
        pass

    # -- the released model's methods, same names and semantics

    def pixel_shuffle(self, x, scale_factor=0.5):
        n, w, h, c = x.size()
        x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
        x = x.permute(0, 2, 1, 3).contiguous()
        x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
        if self.ps_version != "v1":
            x = x.permute(0, 2, 1, 3).contiguous()
        return x

    def extract_feature(self, pixel_values):
        if self.select_layer == -1:
            vit_embeds = self.vision_model(pixel_values=pixel_values, output_hidden_states=False,
                                           return_dict=True).last_hidden_state
        else:
            vit_embeds = self.vision_model(pixel_values=pixel_values, output_hidden_states=True,
                                           return_dict=True).hidden_states[self.select_layer]
        vit_embeds = vit_embeds[:, 1:, :]
        h = w = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], h, w, -1)
        vit_embeds = self.pixel_shuffle(vit_embeds, scale_factor=self.downsample_ratio)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        return self.mlp1(vit_embeds)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def preparing_for_generation(self, tokenizer, max_new_tokens=32):
        self.tokenizer = tokenizer
        self.bot_name = "BOT"
        self.gen_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.seg_token_idx = tokenizer.convert_tokens_to_ids(SEG)
        self.init_prediction_config = True

    def image_to_tiles(self, image):
        """Released `dynamic_preprocess` + `transformer` (bicubic resize, /255, ImageNet norm)."""
        tiles = dynamic_preprocess(image, self.min_dynamic_patch, self.max_dynamic_patch, self.image_size,
                                   self.use_thumbnail)
        return torch.stack([pil_to_normalized(t, self.image_size) for t in tiles])

    @torch.no_grad()
    def generate(self, pixel_values, input_ids, attention_mask, generation_config=None, **generate_kwargs):
        vit_embeds = self.extract_feature(pixel_values)
        input_embeds = self.language_model.get_input_embeddings()(input_ids)
        b, n, c = input_embeds.shape
        input_embeds = input_embeds.reshape(b * n, c)
        selected = input_ids.reshape(b * n) == self.img_context_token_id
        input_embeds[selected] = vit_embeds.reshape(-1, c).to(input_embeds.dtype)
        return self.language_model.generate(inputs_embeds=input_embeds.reshape(b, n, c), attention_mask=attention_mask,
                                            generation_config=generation_config, use_cache=True, **generate_kwargs)

    def predict_forward(self, image=None, text=None, tokenizer=None, **unused):
        if not self.init_prediction_config:
            assert tokenizer is not None
            self.preparing_for_generation(tokenizer=tokenizer)
        device = self.device
        ori_w, ori_h = image.size
        sam_size = self.grounding_encoder.sam2_model.image_size
        g_image = np.array(image.convert("RGB").resize((sam_size, sam_size), Image.BICUBIC))
        g_pixel_values = self.grounding_encoder.preprocess_image(
            torch.from_numpy(g_image).permute(2, 0, 1).to(device))[None]
        pixel_values = self.image_to_tiles(image).to(device)
        image_token_str = IMG_START + IMG_CONTEXT * (pixel_values.shape[0] * self.num_image_token) + IMG_END
        input_text = self.template["INSTRUCTION"].format(input=text.replace("<image>", image_token_str), round=1,
                                                         bot_name=self.bot_name)
        ids = torch.tensor(self.tokenizer.encode(input_text), device=device)[None]
        out = self.generate(pixel_values, ids, torch.ones_like(ids, dtype=torch.bool),
                            generation_config=self.gen_config, output_hidden_states=True,
                            return_dict_in_generate=True)
        predict = self.tokenizer.decode(out.sequences[0], skip_special_tokens=False).strip()
        last_hidden_states = torch.cat([step[-1][0] for step in out.hidden_states], dim=0)
        seg_hidden_states = get_seg_hidden_states(last_hidden_states, out.sequences[0][:-1], self.seg_token_idx)
        ret_masks = []
        for seg_embed in self.text_hidden_fcs(seg_hidden_states):
            sam_states = self.grounding_encoder.get_sam2_embeddings(g_pixel_values)
            pred_masks = self.grounding_encoder.language_embd_inference(sam_states, [seg_embed[None]])
            masks = F.interpolate(pred_masks, size=(ori_h, ori_w), mode="bilinear", align_corners=False)[:, 0]
            ret_masks.append((masks.sigmoid() > 0.5).cpu().numpy())
        return {"prediction": predict, "prediction_masks": ret_masks}


def get_seg_hidden_states(hidden_states, output_ids, seg_id):
    """As released: the states of the generated tokens whose *input* is [SEG]."""
    seg_mask = output_ids == seg_id
    n_out = len(seg_mask)
    if n_out == 0:
        return hidden_states[0:0]
    return hidden_states[-n_out:][seg_mask]


def teach_answer(model, tokenizer, answer=TINY_ANSWER, steps=80, seed=0):
    """Teacher-force the tiny LLM to answer `answer` after any image prompt, as released
    checkpoints answer "It is [SEG].", so the generate path yields a [SEG]."""
    model.preparing_for_generation(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    params = list(model.language_model.parameters()) + list(model.mlp1.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    prompt = "<image>\nPlease segment the blood vessel."
    image_tokens = IMG_START + IMG_CONTEXT * model.num_image_token + IMG_END
    text = model.template["INSTRUCTION"].format(input=prompt.replace("<image>", image_tokens), round=1, bot_name="BOT")
    prompt_ids = tokenizer.encode(text)
    answer_ids = tokenizer.encode(answer + model.template["SUFFIX"], add_special_tokens=False)  # no BOS mid-sequence
    ids = torch.tensor(prompt_ids + answer_ids)[None].repeat(4, 1)
    labels = ids.clone()
    labels[:, :len(prompt_ids)] = -100
    model.train()
    for _ in range(steps):
        pixel_values = torch.randn(4, 3, model.image_size, model.image_size, generator=gen)
        embeds = model.get_input_embeddings()(ids)
        vit = model.extract_feature(pixel_values)
        embeds = embeds.masked_scatter((ids == model.img_context_token_id)[..., None], vit.to(embeds.dtype))
        loss = model.language_model(inputs_embeds=embeds, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


def build_tiny_model(seed=0, pretrained=True):
    """The embedded default: (model, tokenizer).

    pretrained=True (the default everywhere): the weights `common/tiny_weights/` ships, made by
    `python -m common.tiny_pretrain` from synthetic vessel images (README, "The embedded model"); the
    same for every `seed`. pretrained=False: random weights from `seed` whose LLM was only taught to
    answer "It is [SEG]." (what the pretraining starts from; tests of plumbing that need no skill)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    # SAM2 runs at 1024 px as released; SA2VA_TINY_SAM_SIZE (e.g. 256: the CPU test suite and `run.sh quick`
    # on a CPU) runs the same weights on a coarser grid, every part being convolutional or size-agnostic
    sam_size = int(os.environ.get(TINY_SAM_SIZE_ENV, 0)) or None
    config = TinySa2VAConfig(llm_config=dict(vocab_size=len(tokenizer)),
                             sam_config=dict(image_size=sam_size) if sam_size else None)
    model = TinySa2VAChatModel(config)
    if not pretrained:
        teach_answer(model, tokenizer, seed=seed)
    else:
        load_pretrained_weights(model)
        model.preparing_for_generation(tokenizer)  # sets the token ids the forward path reads, as teach_answer does
    model.init_prediction_config = False
    return model, tokenizer


def load_pretrained_weights(model, folder=None):
    """Load `common/tiny_weights/model.safetensors` (or `folder`'s) into a tiny model, exactly."""
    from safetensors.torch import load_file
    path = os.path.join(folder or os.environ.get("TINY_WEIGHTS", WEIGHTS_DIR), "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the tiny model's pretrained weights are missing; rebuild them with "
                                f"`python -m common.tiny_pretrain` (README, 'The embedded model')")
    state = load_file(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit the tiny model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                         f"rebuild it with `python -m common.tiny_pretrain`")
    model.eval()


def main():
    parser = argparse.ArgumentParser(description="Write the tiny Sa2VA-shaped model (the embedded default) as a folder.")
    parser.add_argument("--out", required=True, help="folder to write (model + tokenizer)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    args = parser.parse_args()
    model, tokenizer = build_tiny_model(args.seed)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny Sa2VA ({n / 1e6:.2f}M parameters) written to {args.out}")


if __name__ == "__main__":
    main()
