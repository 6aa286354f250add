"""Segmenting frames without ground truth (evaluate.py on a folder of images only): one mask per
frame at the original size and stem, overlays, one GIF per video with one frame per video frame,
and frames where the model writes no [SEG] reported by name."""
import json
import os
import shutil

import numpy as np
from PIL import Image

import evaluate


def unlabelled_folder(synth_data, out, per_video=3):
    """Images only (no masks/): the first frames of two videos, one of them resized (sizes vary)."""
    os.makedirs(out)
    names = sorted(os.listdir(os.path.join(synth_data, "images")))
    videos = sorted({n.split("_")[0] for n in names})[:2]
    chosen = [n for v in videos for n in [m for m in names if m.startswith(v + "_")][:per_video]]
    for i, name in enumerate(chosen):
        src = os.path.join(synth_data, "images", name)
        if i == 0:
            Image.open(src).resize((96, 80)).save(os.path.join(out, name))
        else:
            shutil.copy(src, os.path.join(out, name))
    return out, chosen, videos


def test_folder_without_masks_gives_one_mask_per_frame_and_a_gif_per_video(synth_data, tmp_path):
    folder, names, videos = unlabelled_folder(synth_data, str(tmp_path / "new_run"))
    out = str(tmp_path / "pred")
    evaluate.main(evaluate.parse_args(["--data", folder, "--output", out, "--batch_size", "2", "--num_workers", "0",
                                       "--save_probs", "--threshold", "0.4"]))
    for name in names:
        stem = os.path.splitext(name)[0]
        size = Image.open(os.path.join(folder, name)).size
        mask = Image.open(os.path.join(out, "masks", stem + ".png"))
        assert mask.size == size and set(np.unique(np.asarray(mask))) <= {0, 255}
        assert Image.open(os.path.join(out, "probs", stem + ".png")).size == size
        assert os.path.isfile(os.path.join(out, "overlays", stem + ".png"))
    for video in videos:
        gif = Image.open(os.path.join(out, "gifs", video + ".gif"))
        assert gif.n_frames == 3
    with open(os.path.join(out, "predictions.json")) as f:
        report = json.load(f)
    assert report["threshold"] == 0.4 and report["answer_mode"] == "fixed" and report["frames_without_seg"] == []
    assert [r["frame"] for r in report["frames"]] == sorted(os.path.splitext(n)[0] for n in names)


def test_generate_mode_reports_frames_without_seg_by_name(synth_data, tmp_path, monkeypatch, capsys):
    folder, names, _ = unlabelled_folder(synth_data, str(tmp_path / "new_run"), per_video=2)
    calls, real_predict = [], evaluate.predict

    def predict(model, tokenizer, image, text):  # the second frame's answer comes without [SEG]
        calls.append(1)
        if len(calls) == 2:
            return {"prediction": "There is no vessel.", "prediction_masks": []}
        return real_predict(model, tokenizer, image, text)
    monkeypatch.setattr(evaluate, "predict", predict)
    out = str(tmp_path / "pred")
    evaluate.main(evaluate.parse_args(["--data", folder, "--output", out, "--answer_mode", "generate"]))
    missing = os.path.splitext(sorted(names)[1])[0]
    with open(os.path.join(out, "predictions.json")) as f:
        report = json.load(f)
    assert report["frames_without_seg"] == [missing]
    assert missing in capsys.readouterr().out
    found = [r for r in report["frames"] if r["seg_found"]]
    assert len(found) == len(names) - 1 and all("[SEG]" in r["answer"] for r in found)
    empty = np.asarray(Image.open(os.path.join(out, "masks", missing + ".png")))
    assert empty.shape == Image.open(os.path.join(folder, sorted(names)[1])).size[::-1] and not empty.any()
