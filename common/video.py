"""SAM2's video memory at inference: a whole video segmented the way the released Sa2VA segments one.

The released InternVL-family `predict_forward(video=frames)` (bytedance/Sa2VA,
projects/sa2va/hf/models/modeling_sa2va_chat.py and sam2.py):

- the LLM sees the first min(5, N) frames, each resized to one tile (no dynamic tiling), as
  `<img>...</img>` blocks joined by newlines in one prompt; its [SEG] state, projected by
  `text_hidden_fcs`, is the prompt of the whole video;
- SAM2 (`language_embd_inference`): those first frames are conditioning frames, each decoded from its
  own features + `no_mem_embed` with the [SEG] prompt, exactly as a single image is (no memory);
  `propagate_in_video` then encodes their masks into memory (`_encode_new_memory`) and tracks every
  later frame with `track_step`: memory attention over the conditioning frames, the 6 frames before it
  and their object pointers, and **no prompt** (the mask decoder sees only the memory-conditioned
  features);
- masks: low-res logits -> bilinear to SAM2's size -> bilinear to the frame's size.

`track_video` runs these steps through the model's own `track_step` and `_encode_new_memory` (so a
real checkpoint uses its real memory modules), with the SAM2 image encoder batched over chunks of
frames instead of one frame at a time, and the memory kept as the released code keeps it (bf16 on a
GPU). `prompt="every"` is this project's variant: every frame after the first also gets the [SEG]
prompt, on top of its memory-conditioned features, for a decoder that was fine-tuned on [SEG] prompts.

Inference only: nothing here trains (the memory modules stay as the checkpoint has them).
"""
import torch
import torch.nn.functional as F

from common.forward import llm_forward, model_dtype, move_batch, sam_autocast, upsample_logits
from common.sa2va import QWENVL, family

RELEASED_CLIP_FRAMES = 5  # frames the released video inference shows the LLM (and prompts in SAM2)
PROMPTS = ("first", "every")


def check_video_model(model):
    """Video mode needs the InternVL family's video prompt and a SAM2 with memory modules."""
    if family(model) is QWENVL:
        raise ValueError("--video_mode follows the InternVL family's released video inference; the Qwen-VL "
                         "family's video input (its processor's video path) is not supported here")
    sam = model.grounding_encoder.sam2_model
    missing = [name for name in ("memory_attention", "memory_encoder", "track_step", "_encode_new_memory")
               if not hasattr(sam, name)]
    if missing:
        raise ValueError(f"--video_mode: this model's SAM2 has no {', '.join(missing)} (no video memory)")


@torch.no_grad()
def clip_seg_embedding(model, processor, frames, device, clip_frames=RELEASED_CLIP_FRAMES):
    """The [SEG] prompt embedding (C,) of a video: the teacher-forced answer after the prompt with the
    first `clip_frames` frames, then `text_hidden_fcs`."""
    if clip_frames < 1:
        raise ValueError(f"clip_frames must be at least 1 (the LLM needs a frame to see), got {clip_frames}")
    clip = frames[:clip_frames]
    batch = move_batch(processor([dict(image=clip[0], frames=clip, key=None)]), device)
    seg_hidden, _ = llm_forward(model, batch)
    return model.text_hidden_fcs(seg_hidden.to(model_dtype(model.text_hidden_fcs)))[0]


def memory_reach(sam):
    """How many frames back SAM2's memory read-out looks: object pointers of up to
    max_obj_ptrs_in_encoder - 1 frames, spatial memories of num_maskmem - 1 frames (x the stride)."""
    return max(sam.max_obj_ptrs_in_encoder, sam.num_maskmem * getattr(sam, "memory_temporal_stride_for_eval", 1))


@torch.no_grad()
def track_video(model, seg_embed, g_pixel_values, prompt="first", cond_frames=RELEASED_CLIP_FRAMES, chunk=8):
    """Low-res mask logits (N, 1, h, w), float32, of the N frames of one video, in order.

    seg_embed: (C,) [SEG] prompt embedding; g_pixel_values: (N, 3, S, S) uint8 SAM2 inputs (the
    processor's `sam_pixels`), on any device (moved a chunk at a time). prompt="first": frames
    0..cond_frames-1 are prompted conditioning frames, later frames are tracked from memory alone (the
    released inference); "every": frame 0 is the conditioning frame, every later frame gets memory +
    prompt. Memory stays bounded on long videos: outputs older than the furthest frame SAM2 reads
    back (object pointers, 15 frames) are dropped, which the released predictor keeps for the whole video."""
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    encoder = model.grounding_encoder
    sam = encoder.sam2_model
    device = seg_embed.device
    num_frames = len(g_pixel_values)
    reach = memory_reach(sam)
    cond = range(min(cond_frames if prompt == "first" else 1, num_frames))
    # the released SAM2VideoPredictor stores memories in bf16 (it runs under bf16 autocast on a GPU)
    storage = torch.bfloat16 if device.type == "cuda" else None
    language = seg_embed.to(model_dtype(sam.sam_mask_decoder)).reshape(1, 1, -1)
    memory = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    logits = []
    with sam_autocast(device):
        for start in range(0, num_frames, chunk):
            x = g_pixel_values[start:start + chunk].to(device, non_blocking=True)
            x = encoder.preprocess_image(x.to(model_dtype(sam.image_encoder)))
            backbone = sam.forward_image(x)
            for i in range(len(x)):
                t = start + i
                frame = {key: [f[i:i + 1] for f in backbone[key]] for key in ("backbone_fpn", "vision_pos_enc")}
                _, feats, pos, sizes = sam._prepare_backbone_features(frame)
                is_cond = t in cond
                out = sam.track_step(frame_idx=t, is_init_cond_frame=is_cond, current_vision_feats=feats,
                                     current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=None,
                                     mask_inputs=None, output_dict=memory, num_frames=num_frames,
                                     track_in_reverse=False, run_mem_encoder=not is_cond, prev_sam_mask_logits=None,
                                     language_embd=language if is_cond or prompt == "every" else None)
                masks = out["pred_masks"].float()
                features, features_pos = out["maskmem_features"], out["maskmem_pos_enc"]
                if is_cond:  # propagate_in_video_preflight: the conditioning frame's mask, at SAM2 size, into memory
                    high_res = F.interpolate(masks, size=(sam.image_size, sam.image_size), mode="bilinear",
                                             align_corners=False)
                    features, features_pos = sam._encode_new_memory(current_vision_feats=feats, feat_sizes=sizes,
                                                                    pred_masks_high_res=high_res,
                                                                    is_mask_from_pts=True)
                # (the released consolidation copies a conditioning frame's pointer into a float32 buffer)
                memory["cond_frame_outputs" if is_cond else "non_cond_frame_outputs"][t] = dict(
                    maskmem_features=features.to(storage or features.dtype), maskmem_pos_enc=features_pos,
                    pred_masks=masks, obj_ptr=out["obj_ptr"].float() if is_cond else out["obj_ptr"])
                memory["non_cond_frame_outputs"].pop(t - reach, None)
                logits.append(masks)
    return torch.cat(logits)


@torch.no_grad()
def segment_video(model, processor, frames, device, prompt="first", clip_frames=RELEASED_CLIP_FRAMES, chunk=8):
    """Vessel probabilities (H, W) float32 for every PIL frame of one video, in order."""
    seg_embed = clip_seg_embedding(model, processor, frames, device, clip_frames)
    g_pixels = torch.stack([processor.sam_pixels(f) for f in frames])
    low_res = track_video(model, seg_embed, g_pixels, prompt, clip_frames, chunk)
    sam_size = model.grounding_encoder.sam2_model.image_size
    return [upsample_logits(low_res[t:t + 1], frames[t].size[::-1], sam_size)[0].sigmoid()
            for t in range(len(frames))]
