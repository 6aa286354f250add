"""SAM2's video memory at inference (common/video.py, evaluate.py --video_mode) on the tiny model.

What holds: the tiny SAM2 has the real memory modules' names and `track_step`; a prompted
conditioning frame is decoded exactly as a single image is (no memory), so with the same [SEG]
embedding video mode's first frame equals per-frame mode's; later frames are read through the
memory (they change when an earlier frame changes); batching the image encoder changes nothing;
evaluate.py scores and segments whole videos, and refuses what it cannot do."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from common.evaluation import predict_probabilities
from common.forward import decode_masks, sam_image_features
from common.sa2va import Sa2VAProcessor, describe, load_model
from common.synth import make_video
from common.video import clip_seg_embedding, segment_video, track_video
from test_predict import unlabelled_folder

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("tiny")
    return model.eval(), Sa2VAProcessor(describe(model, tokenizer), tokenizer)


def video_frames(n, size, seed=0):
    frames, masks, _ = make_video(np.random.default_rng(seed), n, size)
    return [Image.fromarray(f).convert("RGB") for f in frames], masks


def test_tiny_sam2_has_the_released_memory_surface(tiny):
    sam = tiny[0].grounding_encoder.sam2_model
    for name in ("memory_attention", "memory_encoder", "maskmem_tpos_enc", "track_step",
                 "_prepare_memory_conditioned_features", "_encode_new_memory"):
        assert hasattr(sam, name), name
    assert sam.num_maskmem == 7 and sam.hidden_dim % sam.mem_dim == 0


def test_conditioning_frames_equal_per_frame_decoding_and_later_frames_read_the_memory(tiny):
    model, processor = tiny
    images, _ = video_frames(8, 128)
    embed = clip_seg_embedding(model, processor, images, CPU)
    pixels = torch.stack([processor.sam_pixels(f) for f in images])
    low_res = track_video(model, embed, pixels, prompt="first", cond_frames=5)
    with torch.no_grad():
        single = decode_masks(model, embed[None].expand(8, -1), sam_image_features(model, pixels))
    # frames 0-4: prompted, no memory -> the single-image decoder output
    torch.testing.assert_close(low_res[:5], single[:5], atol=5e-5, rtol=0)
    # frames 5-7: tracked from memory alone (no prompt): not the single-image output
    assert (low_res[5:] - single[5:]).abs().amax() > 1e-2
    # and they depend on the earlier frames through the memory: with frame 0 the only conditioning
    # frame, another frame 0 changes frame 1 (the run is deterministic: a rerun is bit-identical;
    # the tiny model's random memory modules move the logits only a little)
    one_cond = track_video(model, embed, pixels, prompt="first", cond_frames=1)
    assert torch.equal(one_cond, track_video(model, embed, pixels, prompt="first", cond_frames=1))
    altered = pixels.clone()
    altered[0] = torch.flip(altered[0], dims=(-1,))
    assert (track_video(model, embed, altered, prompt="first", cond_frames=1)[1] - one_cond[1]).abs().amax() > 1e-5
    # "every": frame 0 the same, later frames get memory and the prompt
    every = track_video(model, embed, pixels, prompt="every")
    torch.testing.assert_close(every[0], low_res[0])
    assert (every[1:5] - low_res[1:5]).abs().amax() > 1e-4


def test_batching_the_image_encoder_does_not_change_the_masks(tiny):
    model, processor = tiny
    images, _ = video_frames(7, 128, seed=1)
    embed = clip_seg_embedding(model, processor, images, CPU)
    pixels = torch.stack([processor.sam_pixels(f) for f in images])
    torch.testing.assert_close(track_video(model, embed, pixels, chunk=1), track_video(model, embed, pixels, chunk=4),
                               atol=5e-5, rtol=0)


def test_dropping_memories_beyond_the_read_out_changes_nothing(tiny, monkeypatch):
    """A long video keeps only the outputs SAM2 can still read (16 frames back): the same masks as
    keeping every frame's memory."""
    import common.video
    model, processor = tiny
    images, _ = video_frames(22, 64, seed=3)
    embed = clip_seg_embedding(model, processor, images, CPU)
    pixels = torch.stack([processor.sam_pixels(f) for f in images])
    assert common.video.memory_reach(model.grounding_encoder.sam2_model) == 16
    bounded = track_video(model, embed, pixels, cond_frames=1, chunk=5)
    monkeypatch.setattr(common.video, "memory_reach", lambda sam: 10 ** 9)
    assert torch.equal(track_video(model, embed, pixels, cond_frames=1, chunk=5), bounded)


def test_first_frame_equals_per_frame_mode_when_the_llm_sees_the_same_input(tiny):
    """Video mode's [SEG] comes from a prompt with the clip's first frames, each one plain-resized tile;
    per-frame mode tiles each frame dynamically. With a one-frame clip of a frame that is a single tile
    (56 px for the tiny model) the LLM input is the same, so the whole first-frame result is too."""
    model, processor = tiny
    images, _ = video_frames(6, 56, seed=2)
    video = segment_video(model, processor, images, CPU, clip_frames=1)
    batch = processor([dict(image=images[0], key="f0")])
    per_frame = predict_probabilities(model, batch)[0]
    torch.testing.assert_close(video[0], per_frame, atol=5e-5, rtol=0)
    assert len(video) == 6 and all(p.shape == (56, 56) for p in video)


def test_evaluate_scores_each_checkpoint_per_frame_and_in_video_mode(synth_data, tmp_path):
    out = str(tmp_path / "eval")
    mine = str(tmp_path / "hard_samples.json")
    # a hard-cluster file naming frames of the validation split (as mine_hard.py writes it)
    with open(mine, "w") as f:
        json.dump(dict(clusters=[dict(video="vid07", keys=["vid07_003", "vid07_004"])]), f)
    summary = evaluate.main(evaluate.parse_args(["--data", synth_data, "--output", out, "--batch_size", "4",
                                                 "--num_workers", "0", "--no_cldice", "--overlays", "0",
                                                 "--video_mode", "--hard_clusters", mine]))
    assert list(summary) == ["base", "base+video"]
    assert summary["base"]["samples"] == summary["base+video"]["samples"] == 24
    assert summary["base"]["cluster_frames"] == 2
    with open(os.path.join(out, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert {r["checkpoint"] for r in rows} == {"base", "base+video"} and len(rows) == 48
    with open(os.path.join(out, "stage_table.md")) as f:
        assert "video-mode Dice" in f.read()


def test_hard_clusters_of_another_split_are_refused(synth_data, tmp_path):
    bad = str(tmp_path / "hard_samples.json")
    with open(bad, "w") as f:
        json.dump(dict(clusters=[dict(video="vid00", keys=["vid00_000"])]), f)
    with pytest.raises(SystemExit, match="not in the scored split"):
        evaluate.main(evaluate.parse_args(["--data", synth_data, "--output", str(tmp_path / "e"), "--num_workers", "0",
                                           "--video_mode", "--hard_clusters", bad]))


def test_video_mode_segments_unlabelled_videos(synth_data, tmp_path):
    folder, names, videos = unlabelled_folder(synth_data, str(tmp_path / "new_run"), per_video=4)
    out = str(tmp_path / "pred")
    evaluate.main(evaluate.parse_args(["--data", folder, "--output", out, "--num_workers", "0", "--video_mode",
                                       "--clip_frames", "2"]))
    for name in names:
        stem = os.path.splitext(name)[0]
        assert Image.open(os.path.join(out, "masks", stem + ".png")).size == Image.open(os.path.join(folder, name)).size
    for video in videos:
        assert Image.open(os.path.join(out, "gifs", video + ".gif")).n_frames == 4
    with open(os.path.join(out, "predictions.json")) as f:
        report = json.load(f)
    assert report["video_mode"] == {"prompt": "first", "clip_frames": 2} and len(report["frames"]) == len(names)


def test_video_mode_refuses_generate_answers_and_the_qwenvl_family(synth_data, tmp_path):
    folder, _, _ = unlabelled_folder(synth_data, str(tmp_path / "new_run"), per_video=2)
    with pytest.raises(SystemExit, match="fixed answer"):
        evaluate.main(evaluate.parse_args(["--data", folder, "--output", str(tmp_path / "p"), "--num_workers", "0",
                                           "--video_mode", "--answer_mode", "generate"]))
    with pytest.raises(ValueError, match="Qwen-VL"):
        evaluate.main(evaluate.parse_args(["--model", "tiny-qwenvl", "--data", folder, "--output", str(tmp_path / "q"),
                                           "--num_workers", "0", "--video_mode"]))


def test_a_clip_without_frames_is_refused(tiny):
    model, processor = tiny
    images, _ = video_frames(3, 56)
    with pytest.raises(ValueError, match="clip_frames must be at least 1"):
        segment_video(model, processor, images, CPU, clip_frames=0)
