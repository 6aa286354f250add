"""The differentiable forward path: batch -> [SEG] embedding -> SAM2 mask logits.

This is the fix for the failure the project exists to prevent: training through
`predict_forward()` runs `generate()` under `torch.no_grad()`, so no gradient ever reaches
LoRA, `text_hidden_fcs` or the mask decoder. Here the whole answer ("It is [SEG].") is
teacher-forced through the LLM's `forward`; the last layer's hidden state at the input
position of `[SEG]` (the same state `predict_forward` reads from `generate`), projected by
`text_hidden_fcs`, prompts SAM2's mask decoder:

    tiles -> vision_model -> pixel shuffle -> mlp1 -> spliced at <IMG_CONTEXT> positions
    LLM(inputs_embeds) -> hidden[-1][SEG position] -> text_hidden_fcs -> (B, 256)
    SAM2 image encoder (frozen unless `sam_encoder` trains) -> conv_s0/conv_s1, + no_mem_embed -> _forward_sam_heads
    -> low-res logits (B, 1, S/4, S/4) -> bilinear to S x S -> bilinear to H x W

The Qwen-VL family (`Sa2VAChatModelQwen`) differs only before the [SEG] state: the model's own
multimodal forward (pixel_values, image_grid_thw[, mm_token_type_ids]) replaces the splicing,
and the [SEG] state is read pre- or post-norm as the checkpoint records (`common.qwenvl`).

The last two resizes are the released inference's (`propagate_in_video` returns S x S,
`predict_forward` resizes to the frame), so a threshold on our logits gives its mask.

`sample_masks` draws binary masks from the model's own per-pixel distribution (DPO pairs from
on-policy samples, and hard mining by how much the samples disagree).

Frozen work is cached: the SAM2 image encoder's maps unless it trains (the `sam_encoder` part,
off by default), and when the LLM side is frozen (stages 2 and 3 train only `text_hidden_fcs` +
the mask decoder) the [SEG] hidden state of a sample, which is a constant then (`FeatureCache`).
"""
import contextlib
import math

import torch
import torch.nn.functional as F

from common.sa2va import family


def model_dtype(module):
    return next(module.parameters()).dtype


def requires_grad(module):
    return any(p.requires_grad for p in module.parameters())


def llm_is_frozen(model):
    """True when nothing before the [SEG] hidden state trains (LLM, LoRA, mlp1, vision)."""
    return not any(requires_grad(m) for m in family(model).pre_seg_modules(model))


def llm_forward(model, batch, with_text_logits=False, cache=None):
    """Teacher-forced LLM forward. Returns (seg_hidden (B, h), answer logits or None).

    `seg_hidden` is the last layer's hidden state at each sample's [SEG] input position, before or
    after the final norm as the model's family says (`seg_convention`). Right padding keeps every
    position and the causal attention of real tokens unchanged, so a batch gives each sample's
    unbatched result."""
    hidden, seg_hidden = family(model).seg_hidden(model, batch, cache)
    text_logits = None
    if with_text_logits:
        # position t predicts token t+1: keep the positions whose next token is an answer token
        next_labels = batch["labels"][:, 1:]
        keep = next_labels != -100
        text_logits = (model.get_output_embeddings()(hidden[:, :-1][keep]).float(), next_labels[keep])
    return seg_hidden, text_logits


def bf16_autocast(enabled, device):
    """The project's one autocast: a factory of bf16 autocast contexts on `device` when `enabled`, of
    do-nothing contexts otherwise (`with autocast():` either way). Training under plain torch asks for it
    with --bf16 (TorchEngine); inference with --bf16 on a GPU (common.cli.load_for_inference)."""
    if not enabled:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def sam_autocast(device):
    """The released inference runs SAM2 under bf16 autocast on a GPU (`language_embd_inference`);
    so does this path, or its layer norms and softmaxes would round differently."""
    return bf16_autocast(device.type == "cuda", device)()


def sam_encoder_is_frozen(model):
    return not requires_grad(model.grounding_encoder.sam2_model.image_encoder)


def sam_image_features(model, g_pixel_values):
    """The SAM2 image encoder: its FPN maps (highest resolution first), with autograd only when
    the encoder trains (`sam_encoder`: a domain far from SA-1B/SA-V, README "Real images").

    `g_pixel_values` are the processor's resized uint8 images (B, 3, S, S); they are normalised
    here by the model's own `preprocess_image` in the encoder's dtype, which is exactly what
    predict_forward does (the released one uses bf16 mean/std constants). Float input is taken
    as already normalised."""
    encoder = model.grounding_encoder
    image_encoder = encoder.sam2_model.image_encoder
    dtype = model_dtype(image_encoder)
    trains = torch.is_grad_enabled() and not sam_encoder_is_frozen(model)
    x = g_pixel_values
    with torch.set_grad_enabled(trains):
        if not x.is_floating_point():
            x = encoder.preprocess_image(x.to(dtype))
        with sam_autocast(x.device):
            out = image_encoder(x.to(dtype))
    return list(out["backbone_fpn"]) if trains else [f.detach() for f in out["backbone_fpn"]]


def decode_masks(model, seg_embeds, fpn):
    """[SEG] prompt embeddings (B, C) + FPN maps -> low-res mask logits (B, 1, S/4, S/4).

    The released `forward_image` (conv_s0/conv_s1 on the two high-res levels), the
    `no_mem_embed` added to a first frame, and `_forward_sam_heads` with the multimask
    choice SAM2 makes for a prompt without points (3 masks, highest predicted IoU)."""
    sam = model.grounding_encoder.sam2_model
    decoder = sam.sam_mask_decoder
    dtype = model_dtype(decoder)
    with sam_autocast(seg_embeds.device):
        high_res = [decoder.conv_s0(fpn[0].to(dtype)), decoder.conv_s1(fpn[1].to(dtype))]
        pix = fpn[-1].to(dtype) + sam.no_mem_embed.to(dtype).reshape(1, -1, 1, 1)
        outputs = sam._forward_sam_heads(backbone_features=pix, point_inputs=None, mask_inputs=None,
                                         high_res_features=high_res,
                                         multimask_output=sam._use_multimask(is_init_cond_frame=True, point_inputs=None),
                                         language_embd=seg_embeds.to(dtype)[:, None, :])
    return outputs[3].float()


def upsample_logits(low_res, size, sam_image_size):
    """Low-res logits (N, 1, h, w) -> (N, H, W) as the released inference resizes them."""
    x = F.interpolate(low_res.float(), size=(sam_image_size, sam_image_size), mode="bilinear", align_corners=False)
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


class FeatureCache:
    """Per-sample constants of the forward path, keyed by the sample's key.

    The SAM2 FPN maps while the image encoder is frozen (unless `sam_encoder` trains). When
    `llm_is_frozen(model)`, the [SEG] hidden state; otherwise, when the vision encoder and mlp1
    are frozen (stage 1 trains LoRA only), their image embeddings (~1 MB per 448 px tile at 2048
    hidden, bf16).
    Entries live on `device` (the GPU when it fits, else "cpu"); keys must identify sample +
    prompt + answer + augmentation view."""

    TABLES = ("seg_hidden", "fpn", "vit")

    def __init__(self, device="cpu", limit_gb=2.0):
        self.device = torch.device(device)
        self.limit_bytes = limit_gb * 2 ** 30
        self.bytes = 0
        self.seg_hidden, self.fpn, self.vit = {}, {}, {}
        # samples served from / missing in each table: proof that later epochs skip the frozen work
        self.hits = dict.fromkeys(self.TABLES, 0)
        self.misses = dict.fromkeys(self.TABLES, 0)

    def __len__(self):
        return len(self.fpn)

    def summary(self):
        """One line for the log: entries, memory, hits/lookups per table."""
        counts = ", ".join(f"{name} {self.hits[name]}/{self.hits[name] + self.misses[name]}" for name in self.TABLES
                           if self.hits[name] + self.misses[name])
        return (f"{len(self.fpn)} entries ({len(self.seg_hidden)} with [SEG] states, {len(self.vit)} with image "
                f"embeddings), {self.bytes / 2 ** 20:.1f} MB; hits/lookups: {counts}")

    def get(self, name, keys, device):
        """The batch of `keys` from table `name`, or None if any is missing: [SEG] states stacked
        (B, h), FPN levels each stacked (B, C, h, w), image embeddings concatenated over the
        samples' tiles (tiles, tokens, hidden)."""
        table = getattr(self, name)
        if any(k not in table for k in keys):
            self.misses[name] += len(keys)
            return None
        self.hits[name] += len(keys)
        rows = [table[k] for k in keys]
        if name == "fpn":
            return [torch.stack([r[level] for r in rows]).to(device, non_blocking=True) for level in range(len(rows[0]))]
        return (torch.cat if name == "vit" else torch.stack)(rows).to(device, non_blocking=True)

    def put(self, name, keys, rows):
        """Store one entry per key (a tensor, or a list of tensors) until the memory limit is
        reached; samples beyond it are simply recomputed each time."""
        table = getattr(self, name)
        for k, row in zip(keys, rows):
            entry = [t.detach().to(self.device) for t in row] if isinstance(row, list) else row.detach().to(self.device)
            size = sum(t.numel() * t.element_size() for t in (entry if isinstance(entry, list) else [entry]))
            if k in table or self.bytes + size > self.limit_bytes:
                continue
            table[k] = entry
            self.bytes += size


def forward_batch(model, batch, cache=None, with_text_logits=False):
    """Batch -> dict(low_res_logits (B,1,h,w) float32, seg_embeds (B,C), text (logits, labels) or None,
    image_features (B,C,h',w'): SAM2's lowest-resolution FPN map, e.g. for train_ppo's critic).

    Only parameters that require grad get gradients; frozen parts run without autograd and,
    given a cache, only once per sample."""
    device = batch["input_ids"].device
    keys = batch["keys"]
    use_cache = cache is not None and all(k is not None for k in keys)
    seg_hidden = text = None
    frozen_llm = llm_is_frozen(model)
    if use_cache and frozen_llm and not with_text_logits:
        seg_hidden = cache.get("seg_hidden", keys, device)
    if seg_hidden is None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_llm):
            seg_hidden, text = llm_forward(model, batch, with_text_logits,
                                           cache if use_cache and not frozen_llm else None)
        if use_cache and frozen_llm:
            cache.put("seg_hidden", keys, seg_hidden)
    cache_fpn = use_cache and sam_encoder_is_frozen(model)
    fpn = cache.get("fpn", keys, device) if cache_fpn else None
    if fpn is None:
        fpn = sam_image_features(model, batch["g_pixel_values"])
        if cache_fpn:
            cache.put("fpn", keys, [[level[i] for level in fpn] for i in range(len(keys))])
    seg_embeds = model.text_hidden_fcs(seg_hidden.to(model_dtype(model.text_hidden_fcs)))
    low_res = decode_masks(model, seg_embeds, fpn)
    return dict(low_res_logits=low_res, seg_embeds=seg_embeds, text=text, image_features=fpn[-1])


def full_size_logits(model, low_res, image_sizes):
    """List of (H, W) float32 logits at each sample's original size."""
    sam_size = model.grounding_encoder.sam2_model.image_size
    if len({tuple(s) for s in image_sizes}) == 1:  # one resize for the batch (the usual case: equal frames)
        return list(upsample_logits(low_res, image_sizes[0], sam_size))
    return [upsample_logits(low_res[i:i + 1], size, sam_size)[0] for i, size in enumerate(image_sizes)]


# ---------------------------------------------------------------- sampling masks from the model

SAMPLE_NOISE_SIGMA = 2.0  # spatial correlation of the sampling noise, in low-res pixels (see sample_masks)


def sample_masks(model, low_res, size, num_samples, temperature=1.0, sigma=SAMPLE_NOISE_SIGMA, generator=None):
    """(num_samples, H, W) bool masks drawn from the model's per-pixel distribution of one image.

    low_res: (1, 1, h, w) logits of the mask decoder; size: (H, W) of the frame. Each sample
    thresholds logits / T + logistic noise, `low_res / T + L > 0`, at the decoder's own grid, and
    the perturbed logits are then resized exactly as inference resizes logits. With L ~
    Logistic(0, 1) every low-res pixel is a Bernoulli draw with p = sigmoid(logit / T): at T = 1
    the samples come from the distribution whose log-likelihood DPO trains
    (`losses.mask_log_likelihood`), i.e. they are on-policy. Why low-res: the decoder has no finer
    degrees of freedom; sampling at full size would invent speckle the model cannot express, and
    the bilinear resize of perturbed logits gives smooth, mask-like edges.
    Independent pixel noise averages out over a mask (every sample would get nearly the same
    IoU), so the noise is spatially correlated (`sigma`, low-res pixels): a Gaussian field
    smoothed with that sigma, mapped through the normal CDF and the logistic quantile (a Gaussian
    copula), which keeps each pixel's marginal exactly Bernoulli(sigmoid(logit / T)) while whole
    vessel segments appear or vanish together, the kind of error a real prediction makes. The
    noise is clamped to +-16.1 (u in [1e-7, 1 - 1e-7]), so a pixel with |logit / T| > 16.2 never flips."""
    shape = (num_samples, 1) + tuple(low_res.shape[-2:])
    if sigma > 0:
        radius = int(math.ceil(3 * sigma))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-x ** 2 / (2 * sigma ** 2))
        k = k / k.norm()  # unit L2 norm: smoothed white noise keeps unit variance
        z = torch.randn(shape[:2] + (shape[2] + 2 * radius, shape[3] + 2 * radius), generator=generator)
        z = F.conv2d(z, k.view(1, 1, -1, 1))  # 'valid' convolutions: no border effects
        z = F.conv2d(z, k.view(1, 1, 1, -1))
        u = 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # normal CDF: uniform marginals
    else:
        u = torch.rand(shape, generator=generator)
    u = u.clamp(1e-7, 1 - 1e-7)
    noise = torch.log(u) - torch.log1p(-u)  # logistic quantile: P(l / T + noise > 0) = sigmoid(l / T)
    perturbed = low_res.float().cpu().expand(shape) / temperature + noise
    return torch.stack(full_size_logits(model, perturbed, [size] * num_samples)) > 0


def sample_generator(seed, index):
    """The generator of sample_masks for one image, seeded by the run's seed and the image's index
    in its dataset: the same samples on any number of ranks and in any batch order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def move_batch(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else
                [x.to(device, non_blocking=True) for x in v] if isinstance(v, list) and v and torch.is_tensor(v[0])
                else v) for k, v in batch.items()}
