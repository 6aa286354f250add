"""A user's own folder: no silent wrong result (issue #24). One test (or a few) per numbered item:
1 mask rule, 2 the checkpoint evaluate.py scores, 3 --threshold with generate, 4 still images,
5 dice_loss, 6 empty-prediction marking and no nan cells, 7 what was scored, 8 run.sh paths,
9 per-video outputs and nested layouts. Small folders built here; the tiny model; seconds each."""
import csv
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train_sft
from common import cli
from common.data import (DataError, MaskRule, apply_mask_rule, build_splits, file_names, read_mask, scan_folder,
                         select_split)
from common.evaluation import degenerate_masks
from common.lora import save_stage, set_trainable
from common.losses import segmentation_loss
from common.sa2va import load_model
from conftest import ROOT

SIZE = (24, 28)  # (H, W)
FAST = ["--num_workers", "0", "--batch_size", "4"]  # + "--model", tiny_folder: loads in < 1 s, `tiny` builds


def vessel(value=1, dtype=np.uint8):
    m = np.zeros(SIZE, dtype)
    m[8:12, 3:25] = value
    m[3:20, 13:15] = value
    return m


def make_folder(root, stems, masks=None, ext=".png"):
    """images/<stem>.png (random RGB) + masks/<stem><ext> for each stem; masks: {stem: array} or one
    array for all (default: a 0/255 vessel cross). Returns the folder as a string."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    for stem in stems:
        image = rng.integers(0, 255, (*SIZE, 3), dtype=np.uint8)
        image[vessel(1).astype(bool)] //= 3  # dark vessels
        Image.fromarray(image).save(os.path.join(root, "images", stem + ".png"))
        m = masks.get(stem, vessel(255)) if isinstance(masks, dict) else (vessel(255) if masks is None else masks)
        im = m if isinstance(m, Image.Image) else Image.fromarray(m)
        im.save(os.path.join(root, "masks", stem + ext), **({"quality": 75} if ext == ".jpg" else {}))
    return str(root)


def still_names(n=6, prefix="drive"):
    return [f"{prefix}_{i:02d}" for i in range(1, n + 1)]


def args_for(script, argv):
    return script.parse_args(argv)


# ----------------------------------------------------------------------------- 1. the mask rule

def test_label_map_and_jpeg_01_masks_read_as_vessel_not_empty(tmp_path):
    """0 = background, 1 = artery, 2 = vein, and 0/1 masks saved as JPEG (values 0, 1, 2, ...), used to
    be thresholded at 127.5 (every mask empty, val Dice 1.0). Now: vessel = value > 0."""
    label = vessel(1)
    label[3:20, 13:15] = 2  # the vein
    root = make_folder(tmp_path / "labels", ["a_1", "b_1"], masks=label)
    with pytest.warns(UserWarning, match=r"2 mask\(s\) read with small values .* vessel = value > 0"):
        frames = scan_folder(root)
    assert [f.vessel_pixels for f in frames] == [int((label > 0).sum())] * 2
    jpeg = make_folder(tmp_path / "jpeg", ["a_1", "b_1"], masks=vessel(1), ext=".jpg")
    array = np.asarray(Image.open(os.path.join(jpeg, "masks", "a_1.jpg")))
    np.testing.assert_array_equal(read_mask(os.path.join(jpeg, "masks", "a_1.jpg")), array > 0)
    assert array.max() == 1 and array.sum() > 0.5 * vessel(1).sum()
    noisy = vessel(1)  # what other encoders make of it: 0, 1, 2, 3 around the edges
    noisy[7, 3:25], noisy[12, 3:25], noisy[0, 0] = 2, 3, 1
    mask, how = apply_mask_rule(noisy)
    assert how == "small" and mask.sum() == (noisy > 0).sum()


def test_voc_style_mask_is_refused_with_its_values_then_read_with_vessel_values(tmp_path):
    """Palette 0 / 1 = vessel / 255 = void border: auto cannot tell which value is vessel."""
    voc = vessel(1)
    voc[7, 3:25] = voc[12, 3:25] = 255  # void border around the vessel
    im = Image.fromarray(voc, mode="L").convert("P")
    im.putpalette([0, 0, 0, 128, 0, 0] + [0, 0, 0] * 253 + [224, 224, 192])
    root = make_folder(tmp_path, ["a_1", "b_1"], masks=im)
    with pytest.raises(DataError, match=r"a_1.png: mask holds 3 values: 0 \(\d+ px\), 1 \(\d+ px\), 255 \(\d+ px\).*"
                                        r"--vessel_values"):
        scan_folder(root)
    frames = scan_folder(root, mask_rule=MaskRule("values", (1,)))
    assert frames[0].vessel_pixels == int((voc == 1).sum())
    parsed = cli.parser("x")
    cli.add_data_args(parsed)
    assert MaskRule.from_args(parsed.parse_args(["--data", root, "--vessel_values", "1"])) == MaskRule("values", (1,))
    with pytest.raises(SystemExit):
        parsed.parse_args(["--data", root, "--mask_rule", "values"])  # values without --vessel_values


def test_a_rule_that_would_empty_a_non_zero_mask_refuses(tmp_path):
    grey = (vessel(1) * 100).astype(np.uint8)
    grey[0, :20] = np.arange(20, 120, 5)  # many values, all below 127.5
    with pytest.raises(DataError, match=r"m.png: no pixel is above half the range \(127.5\).*non-zero pixels"):
        apply_mask_rule(grey, MaskRule(), "m.png")
    # an explicit rule may empty a mask (the user chose it), but never silently
    root = make_folder(tmp_path, ["a_1", "b_1", "c_1"], masks={"a_1": vessel(255), "b_1": vessel(255),
                                                               "c_1": vessel(7)})
    with pytest.warns(UserWarning, match=r"1 mask\(s\) read with vessel = values 255 .*LEFT EMPTY.*c_1.png"):
        scan_folder(root, mask_rule=MaskRule("values", (255,)))


def test_all_empty_validation_masks_are_an_error_not_dice_1(tmp_path, tiny_folder):
    stems = [f"v{v}_{i}" for v in range(3) for i in range(2)]
    root = make_folder(tmp_path, stems, masks={"v0_0": np.zeros(SIZE, np.uint8), "v0_1": np.zeros(SIZE, np.uint8)})
    with open(os.path.join(root, "splits.json"), "w") as f:
        json.dump({"train": stems[2:], "val": stems[:2]}, f)  # the validation video has no vessel
    with pytest.raises(DataError, match=r"every mask of the val split .* is empty.*Dice 1.0"):
        build_splits(root)
    args = evaluate.parse_args(["--data", root, "--split", "val", "--model", tiny_folder] + FAST)
    with pytest.raises(DataError, match="every mask of the val split"):
        select_split(args, "val")
    # training refuses before it trains (no run exits 0 on masks its rule emptied)
    with pytest.raises(DataError, match="every mask of the val split"):
        train_sft.main(args_for(train_sft, ["--data", root, "--output", str(tmp_path / "runs"), "--epochs", "1",
                                            "--lora_preset", "small", "--model", tiny_folder] + FAST))
    # and a rule that reads no vessel anywhere is caught the same way
    with pytest.raises(DataError, match="every mask of the train split"):
        build_splits(root, mask_rule=MaskRule("values", (3,)))


# ----------------------------------------------------------------------------- 2. the checkpoint named is the one scored

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_folder):
    """A stage checkpoint of the tiny model whose mask decoder differs from the base model's."""
    model, _ = load_model(tiny_folder)
    set_trainable(model, ["mask_decoder"])
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    out = str(tmp_path_factory.mktemp("ckpt") / "sft_x" / "best")
    save_stage(model, out, ["mask_decoder"], dict(stage="sft", base_model=tiny_folder))
    return out


def test_evaluate_init_on_a_labelled_folder_scores_that_checkpoint(tmp_path, checkpoint, tiny_folder):
    root = make_folder(tmp_path / "data", still_names(4))
    out = str(tmp_path / "eval")
    both = evaluate.main(evaluate.parse_args(["--data", root, "--split", "all", "--still_images", "--output", out,
                                              "--checkpoints", "base", f"mine={checkpoint}", "--no_cldice", "--model", tiny_folder] + FAST))
    assert both["base"]["mean_dice"] != both["mine"]["mean_dice"]
    init = evaluate.main(evaluate.parse_args(["--data", root, "--split", "all", "--still_images", "--output", out,
                                              "--init", checkpoint, "--no_cldice", "--model", tiny_folder] + FAST))
    (name,) = init
    assert name == "sft_x" and init[name]["checkpoint"] == checkpoint
    assert init[name]["mean_dice"] == both["mine"]["mean_dice"]
    with open(os.path.join(out, "stage_table.md")) as f:
        assert f"| sft_x | {checkpoint} |" in f.read()
    with open(os.path.join(out, "metrics.csv")) as f:
        assert {r["checkpoint_path"] for r in csv.DictReader(f)} == {checkpoint}
    with pytest.raises(SystemExit, match="one would be ignored"):
        evaluate.main(evaluate.parse_args(["--data", root, "--output", out, "--init", checkpoint,
                                           "--checkpoints", "base", "--model", tiny_folder] + FAST))


def test_prediction_uses_the_checkpoint_named_by_checkpoints(tmp_path, checkpoint, tiny_folder):
    root = make_folder(tmp_path / "data", still_names(2))
    folder = os.path.join(root, "images")  # no masks/: prediction
    out, base_out = str(tmp_path / "pred"), str(tmp_path / "pred_base")
    evaluate.main(evaluate.parse_args(["--data", folder, "--output", out, "--checkpoints", f"sft={checkpoint}", "--model", tiny_folder] + FAST))
    evaluate.main(evaluate.parse_args(["--data", folder, "--output", base_out, "--model", tiny_folder] + FAST))
    with open(os.path.join(out, "predictions.json")) as f:
        report = json.load(f)
    assert report["init"] == checkpoint and report["checkpoint"] == "sft"
    with open(os.path.join(base_out, "predictions.json")) as f:
        assert json.load(f)["init"] is None
    assert [r["vessel_pixels"] for r in report["frames"]] != \
        [r["vessel_pixels"] for r in json.load(open(os.path.join(base_out, "predictions.json")))["frames"]]
    with pytest.raises(SystemExit, match="writes one set of masks"):
        evaluate.main(evaluate.parse_args(["--data", folder, "--output", out, "--checkpoints", "base",
                                           f"sft={checkpoint}", "--model", tiny_folder] + FAST))


# ----------------------------------------------------------------------------- 3. --threshold with generate

def test_threshold_with_generate_is_refused_and_not_recorded(tmp_path, tiny_folder):
    root = make_folder(tmp_path / "data", still_names(1))
    folder = os.path.join(root, "images")
    with pytest.raises(SystemExit, match=r"--threshold 0.35 does not apply to --answer_mode generate"):
        evaluate.main(evaluate.parse_args(["--data", folder, "--output", str(tmp_path / "p"), "--answer_mode",
                                           "generate", "--threshold", "0.35", "--model", tiny_folder] + FAST))
    evaluate.main(evaluate.parse_args(["--data", folder, "--output", str(tmp_path / "p"), "--answer_mode",
                                       "generate", "--model", tiny_folder] + FAST))
    with open(tmp_path / "p" / "predictions.json") as f:
        report = json.load(f)
    assert report["threshold"] == 0.5 and report["threshold_from"] == "predict_forward (fixed)"


# ----------------------------------------------------------------------------- 4. still images

def test_still_images_named_like_frames_are_refused_with_the_fix_then_split_per_image(tmp_path):
    root = make_folder(tmp_path, still_names(10))
    with pytest.raises(DataError, match=r"all 10 frame\(s\) are ONE video 'drive'.*--still_images \(run.sh: "
                                        r"STILL_IMAGES=1\)"):
        build_splits(root)
    train, val = build_splits(root, video_regex=None)
    assert len(val) == 2 and len(train) == 8 and len({f.video for f in train + val}) == 10
    assert not {f.video for f in train} & {f.video for f in val}


def test_video_regex_without_frame_group_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        train_sft.parse_args(["--data", "x", "--video_regex", r"(?P<video>.+)_(\d+)"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no group frame" in err and "IndexError" not in err
    with pytest.raises(SystemExit):
        train_sft.parse_args(["--data", "x", "--still_images", "--video_regex", r"(?P<video>.+)_(?P<frame>\d+)"])
    assert train_sft.parse_args(["--data", "x", "--still_images"]).video_regex is None


def test_still_images_train_with_a_validation_split_and_dice_loss_logged(tmp_path, tiny_folder):
    """Items 4 and 5: the start-up line names videos and frames per split; the log's Dice term is
    dice_loss (1 - soft Dice), never `dice`, in train.log and metrics.jsonl."""
    root = make_folder(tmp_path / "data", still_names(6))
    run = train_sft.main(args_for(train_sft, ["--data", root, "--still_images", "--output", str(tmp_path / "runs"),
                                              "--epochs", "1", "--lora_preset", "small", "--log_every", "1",
                                              "--val_fraction", "0.34", "--model", tiny_folder] + FAST))
    log = open(os.path.join(run, "train.log")).read()
    assert "data: train 4 frames of 4 videos, val 2 frames of 2 videos" in log
    steps = [line for line in log.splitlines() if "| loss " in line]
    assert steps and all(" dice_loss " in line and " dice " not in line for line in steps)
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert any("train/dice_loss" in r for r in records) and not any("train/dice" in r for r in records)
    info = json.load(open(os.path.join(run, "training_info.json")))
    assert info["best_epoch"] in (0, 1) and info["args"]["still_images"] and np.isfinite(info["best_val_dice"])


def test_video_mode_on_still_images_is_refused(tmp_path, tiny_folder):
    root = make_folder(tmp_path / "data", still_names(2))
    with pytest.raises(SystemExit, match="--video_mode carries SAM2's memory"):
        evaluate.main(evaluate.parse_args(["--data", root, "--still_images", "--video_mode", "--output",
                                           str(tmp_path / "e"), "--model", tiny_folder] + FAST))


# ----------------------------------------------------------------------------- 5. dice_loss

def test_segmentation_loss_names_its_dice_term_dice_loss():
    logits, mask = torch.full((4, 4), 10.0), torch.ones(4, 4)
    out = segmentation_loss([logits], [mask])
    assert set(out) == {"loss", "dice_loss", "bce"} and out["dice_loss"] < 0.01  # a perfect mask: loss ~ 0


# ----------------------------------------------------------------------------- 6. empty predictions, no nan cells

def test_degenerate_masks_and_the_stage_table_mark():
    def record(key, tp, fp, fn):
        return dict(key=key, tp=[tp], fp=[fp], fn=[fn], pixels=100)
    records = [record("ok", 5, 1, 1), record("collapsed", 0, 0, 9), record("both_empty", 0, 0, 0),
               record("only_fp", 0, 3, 0)]
    d = degenerate_masks(records)
    assert (d["frames_with_vessel"], d["empty_masks"], d["full_masks"]) == (2, 1, 0)
    row = dict(checkpoint=None, threshold=0.5, mean_dice=0.5, mean_recall=0.5, mean_precision=0.5, mean_iou=0.3,
               samples=4, frames_with_vessel=4, empty_masks=0, full_masks=0, collapsed=False)
    table = evaluate.stage_table({"base": row, "hard": dict(row, empty_masks=3, collapsed=True)},
                                 caption="Scored: val")
    lines = table.splitlines()
    assert lines[0] == "Scored: val"
    assert lines[-3].endswith("| 3 empty, 0 full of 4 COLLAPSED |") and "! degenerate masks" in lines[-1]
    assert "hard: 3 empty" in lines[-1]
    video = evaluate.video_table({"a": dict(row, cluster_frames=0, cluster_mean_dice=float("nan")),
                                  "a+video": dict(row, cluster_frames=0, cluster_mean_dice=float("nan"))})
    assert "nan" not in video and "no temporal hard cluster" in video


# ----------------------------------------------------------------------------- 7. what was scored

def test_the_table_says_which_split_and_how_many_frames(tmp_path, tiny_folder):
    root = make_folder(tmp_path / "data", [f"v{v}_{i}" for v in range(5) for i in range(2)])
    out = str(tmp_path / "eval")
    evaluate.main(evaluate.parse_args(["--data", root, "--output", out, "--no_cldice", "--overlays", "0", "--model", tiny_folder] + FAST))
    first = open(os.path.join(out, "stage_table.md")).readline()
    assert first.startswith(f"Scored: val split of {root}, 2 frames of 1 videos (of 10 frames in the folder; "
                            f"--split all scores every frame)")
    evaluate.main(evaluate.parse_args(["--data", root, "--output", out, "--split", "all", "--no_cldice",
                                       "--overlays", "0", "--model", tiny_folder] + FAST))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["samples"] == summary["folder_frames"] == 10 and summary["videos"] == 5


# ----------------------------------------------------------------------------- 8. run.sh paths

def test_run_sh_resolves_relative_paths_from_the_callers_directory_and_quotes_them(tmp_path, tiny_folder):
    caller = tmp_path / "my project"
    make_folder(caller / "data set", still_names(5))
    env = dict(os.environ, MODEL=tiny_folder, DATA="data set", OUT="out dir/run 1", STAGES="sft,eval", BASELINES="0", MAX_TRAIN="3",
               MAX_VAL="1", STILL_IMAGES="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), "quick"], cwd=caller, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = caller / "out dir" / "run 1"
    (run,) = os.listdir(out / "sft")
    info = json.load(open(out / "sft" / run / "training_info.json"))
    assert info["args"]["data"] == str(caller / "data set") and info["args"]["still_images"]
    summary = json.load(open(out / "eval" / "summary.json"))
    assert list(summary["checkpoints"]) == ["base", "sft"]
    assert summary["checkpoints"]["sft"]["checkpoint"] == str(out / "sft" / run / "best")
    assert "Scored: val split of" in result.stdout and "| sft |" in result.stdout


def test_run_sh_skips_a_stage_with_nothing_to_learn_and_carries_its_start(tmp_path, tiny_folder):
    """A model whose own samples agree gives no DPO pair, one that scores every train frame above the
    bar gives no hard frame (make_dpo_pairs / mine_hard then write counts of 0): run.sh says so, trains
    neither, and their rows are their starts."""
    make_folder(tmp_path / "data", still_names(5))
    out = tmp_path / "out"
    for path, key in (("pairs/summary.json", "pairs"), ("mine/hard_samples.json", "hard_count")):
        os.makedirs(os.path.dirname(out / path), exist_ok=True)
        json.dump({key: 0}, open(out / path, "w"))
    env = dict(os.environ, MODEL=tiny_folder, DATA=str(tmp_path / "data"), OUT=str(out), STAGES="sft,dpo,hard,eval",
               BASELINES="0", MAX_TRAIN="3", MAX_VAL="1", STILL_IMAGES="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), "quick"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "dpo: skipped, no preference pair" in result.stdout and "hard: skipped, no train frame" in result.stdout
    assert not os.path.exists(out / "dpo") and not os.path.exists(out / "hard")
    rows = json.load(open(out / "eval" / "summary.json"))["checkpoints"]
    assert list(rows) == ["base", "sft", "dpo", "hard"]
    assert rows["dpo"]["checkpoint"] == rows["hard"]["checkpoint"] == rows["sft"]["checkpoint"]


# ----------------------------------------------------------------------------- 9. per-video outputs, layouts

def test_per_video_names_never_collide_and_stills_get_no_gif(tmp_path, tiny_folder):
    assert file_names(["left eye", "left_eye", "Left_eye", "a/b"]) == \
        {"Left_eye": "Left_eye", "a/b": "a_b", "left eye": "left_eye-2", "left_eye": "left_eye-3"}
    folder = tmp_path / "frames"
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for stem in ["left eye_1", "left eye_2", "left_eye_1", "left_eye_2", "single_7"]:
        Image.fromarray(rng.integers(0, 255, (*SIZE, 3), dtype=np.uint8)).save(folder / f"{stem}.png")
    out = tmp_path / "pred"
    evaluate.main(evaluate.parse_args(["--data", str(folder), "--output", str(out), "--model", tiny_folder] + FAST))
    report = json.load(open(out / "predictions.json"))
    assert sorted(os.listdir(out / "gifs")) == sorted(report["gifs"].values()) == ["left_eye-2.gif", "left_eye.gif"]
    assert "single" not in report["gifs"] and len(os.listdir(out / "masks")) == 5


def test_nested_video_folders_get_a_hint_of_the_supported_layouts(tmp_path, tiny_folder):
    os.makedirs(tmp_path / "data" / "images" / "video1")
    os.makedirs(tmp_path / "data" / "masks")
    Image.fromarray(np.zeros((*SIZE, 3), np.uint8)).save(tmp_path / "data" / "images" / "video1" / "0001.png")
    with pytest.raises(DataError, match=r"no images .*holds 1 folder\(s\), e\.g\. .*video1/: nested .* not read.*"
                                        r"supported layouts: .*--still_images"):
        scan_folder(str(tmp_path / "data"))
    with pytest.raises(SystemExit, match="nested"):
        evaluate.main(evaluate.parse_args(["--data", str(tmp_path / "data" / "images"), "--output",
                                           str(tmp_path / "p"), "--model", tiny_folder] + FAST))
