"""The learning signal is real: a collapsed model is detected and reported, no stage's best/ is
below its start, the embedded model's [SEG] state depends on the image, its pretrained weights
are rebuilt deterministically, and stage gains over seeds come with their interval."""
import json
import math
import os

import numpy as np
import torch
from PIL import Image

from common.evaluation import collapse_warning, degenerate_masks, frame_record
from common.seeds import interval, stage_gains, verdict


def record(gt, pred, pixels=100):
    tp = min(gt, pred)
    return dict(tp=[tp], fp=[pred - tp], fn=[gt - tp], pixels=pixels)


def test_degenerate_masks_counts_empty_and_full_predictions_on_frames_with_vessel():
    records = [record(10, 0), record(10, 95), record(10, 12), record(0, 0), record(0, 50)]
    d = degenerate_masks(records)
    # frames without vessel are not judged; 2 of the 3 with vessel are degenerate
    assert d == dict(frames_with_vessel=3, empty_masks=1, full_masks=1, collapsed=True)
    assert not degenerate_masks([record(10, 0), record(10, 9), record(10, 11)])["collapsed"]
    assert degenerate_masks([record(0, 0)])["collapsed"] is False  # nothing to judge is no collapse


def test_frame_record_of_an_all_background_prediction_is_an_empty_mask_and_warns():
    mask = np.zeros((8, 8), bool)
    mask[2:4] = True
    r = frame_record("a", 0, torch.full((8, 8), 0.2), mask, torch.tensor([0.5]))
    d = degenerate_masks([r])
    assert d["empty_masks"] == 1 and d["collapsed"]
    assert "collapsed" in collapse_warning(d)
    assert collapse_warning(degenerate_masks([record(10, 10)])) == ""


def test_a_collapsed_model_leaves_best_at_the_start_and_reports_the_collapse(synth_data, tmp_path, monkeypatch):
    """Every optimizer step of this run ends by zeroing the mask heads' last layers, so every mask logit
    is exactly 0 and every mask empty (sigmoid 0.5 is not above the 0.5 threshold), whatever the
    shipped weights: epoch 1 validates below the start, best/ must be the starting model (epoch 0)
    with its Dice, and the collapse must be in training_info.json and in the log."""
    import train_sft
    real_step = train_sft.engine_step

    def step_then_collapse(engine):
        stepped = real_step(engine)
        with torch.no_grad():
            heads = [m for n, m in engine.module.named_modules() if n.endswith("output_hypernetworks_mlps")]
            assert heads
            for mlp in heads[0]:
                mlp[-1].weight.zero_()
                mlp[-1].bias.zero_()
        return stepped

    monkeypatch.setattr(train_sft, "engine_step", step_then_collapse)
    args = train_sft.parse_args(["--data", synth_data, "--output", str(tmp_path), "--epochs", "1",
                                 "--batch_size", "4", "--num_workers", "0", "--lora_preset",
                                 "small", "--max_train_samples", "16", "--max_val_samples", "8", "--log_every", "100"])
    run_dir = train_sft.main(args)
    with open(os.path.join(run_dir, "training_info.json")) as f:
        info = json.load(f)
    start, last = info["initial_val"]["mean_dice"], info["history"][-1]
    assert last["mean_dice"] == 0.0 < start
    assert info["best_epoch"] == 0 and info["best_val_dice"] == start
    assert info["collapsed_epochs"] == [1] and last["collapsed"]
    with open(os.path.join(run_dir, "best", "stage.json")) as f:
        assert json.load(f)["epoch"] == 0
    with open(os.path.join(run_dir, "train.log")) as f:
        assert "WARNING: collapsed masks" in f.read()


def test_seg_state_of_the_embedded_model_depends_on_the_image(synth_data):
    from common.forward import llm_forward
    from common.sa2va import Sa2VAProcessor, describe, load_model
    model, tokenizer = load_model("tiny")
    processor = Sa2VAProcessor(describe(model, tokenizer), tokenizer)
    images = sorted(os.listdir(os.path.join(synth_data, "images")))
    first = Image.open(os.path.join(synth_data, "images", images[0])).convert("RGB")
    other = Image.open(os.path.join(synth_data, "images", images[-1])).convert("RGB")
    batch = processor([dict(image=first), dict(image=other), dict(image=first)])
    with torch.no_grad():
        seg, _ = llm_forward(model, batch)
    assert torch.equal(seg[0], seg[2])
    # far above float noise (~1e-7 relative): the vision tower's tokens reach the [SEG] state through the LLM
    assert (seg[0] - seg[1]).norm() > 1e-3 * seg[0].norm()


def test_pretraining_is_deterministic(tmp_path):
    """Two builds with the same seed (a short budget of both phases) give the same bytes."""
    from common import tiny_pretrain
    outputs = []
    for name in ("a", "b"):
        args = tiny_pretrain.parse_args(["--out", str(tmp_path / name), "--device", "cpu", "--image_steps", "2",
                                         "--batch_size", "2", "--video_steps", "1", "--clip", "3", "--image_pool", "3",
                                         "--video_pool", "1", "--workers", "0", "--sam_size", "128"])
        tiny_pretrain.main(args)
        with open(tmp_path / name / "model.safetensors", "rb") as f:
            outputs.append(f.read())
    assert outputs[0] == outputs[1]


def test_shipped_weights_fit_the_tiny_model_and_answer_with_seg():
    from common.sa2va import load_model
    from common.tiny import WEIGHTS_DIR
    model, tokenizer = load_model("tiny")
    with open(os.path.join(WEIGHTS_DIR, "pretrain.json")) as f:
        recipe = json.load(f)
    assert recipe["parameters"] == sum(p.numel() for p in model.state_dict().values())
    image = Image.fromarray(np.full((64, 64, 3), 200, np.uint8))
    out = model.predict_forward(image=image, text="<image>\nPlease segment the blood vessel.", tokenizer=tokenizer)
    assert "[SEG]" in out["prediction"]


def test_stage_gains_are_paired_by_seed_with_a_t_interval():
    def summary(**dice):
        return dict(checkpoints={k: dict(mean_dice=v) for k, v in dice.items()})
    summaries = [summary(base=0.1, sft=0.5, dpo=0.5), summary(base=0.2, sft=0.7, dpo=0.7),
                 summary(base=0.3, sft=0.75, dpo=0.75)]
    rows = {r["stage"]: r for r in stage_gains(summaries)}
    assert set(rows) == {"sft", "dpo"}  # hard and ppo are not in the summaries
    sft = rows["sft"]
    gains = [0.4, 0.5, 0.45]
    half = 4.302652729911275 * np.std(gains, ddof=1) / math.sqrt(3)  # t(0.975, 2)
    assert math.isclose(sft["gain"], 0.45) and math.isclose(sft["low"], 0.45 - half)
    assert sft["verdict"] == "gain"
    assert rows["dpo"]["verdict"] == "no measurable gain"  # identical to its start in every seed
    assert verdict(*interval([-0.2, -0.21, -0.19])) == "regression"
    assert verdict(*interval([0.1])) == "one seed: no interval"
