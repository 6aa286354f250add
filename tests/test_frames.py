"""common/frames.py: training frames sampled from cine runs that the tests make with the project's
own generator (common.synth: a beating vessel tree under one injection, `bolus_curve`), written as
GIF, multi-frame DICOM, TIFF stacks, folders of frames and, where PyAV is installed, MP4. pydicom is
required, not skipped: .ci/run installs requirements-extras.txt so that the DICOM tests run in CI."""
import itertools
import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from common import cli, frames, synth
from common.data import parse_video
from conftest import ROOT

FRAMES, SIZE, PER_VIDEO = 60, 128, 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One synthetic cine run: 8-bit grey frames (T, H, W), its contrast curve and heartbeat period."""
    truth = {}
    contrast = synth.bolus_curve(FRAMES)
    images, _, _ = synth.make_video(np.random.default_rng(3), FRAMES, SIZE, contrast=contrast, info=truth)
    return dict(frames=np.stack([im[:, :, 0] for im in images]), contrast=contrast, period=truth["period"])


def write(tmp_path, run, fmt, name="run00", **kw):
    folder = tmp_path / fmt
    folder.mkdir(exist_ok=True)
    synth.write_cine(folder / f"{name}{synth.CINE_FORMATS[fmt]}", run["frames"], fmt, **kw)
    return folder


def sample(videos, out, *extra):
    frames.main(frames.parse_args(["--videos", str(videos), "--out", str(out), "--per_video", str(PER_VIDEO), *extra]))
    return json.loads((out / "manifest.json").read_text())


def check_rule(manifest, out, contrast):
    """What must hold whatever the format: frames without contrast skipped, at most PER_VIDEO kept, no
    two kept frames closer than the threshold, names that the loaders read as (video, frame)."""
    (entry,) = manifest["runs"]
    chosen = [k["frame"] for k in entry["chosen"]]
    assert 1 <= len(chosen) <= PER_VIDEO
    peak = int(np.argmax(contrast))
    before = {t for t in range(peak) if contrast[t] == 0}
    after = {t for t in range(peak, len(contrast)) if contrast[t] == 0}
    assert before and after
    assert before <= set(entry["before_contrast"]) and after <= set(entry["washed_out"])
    assert all(contrast[t] > 0 for t in chosen)
    assert set(np.flatnonzero(contrast >= 0.9)) <= set(range(entry["span"][0], entry["span"][1] + 1))
    images = sorted((out / "images").iterdir())
    assert [parse_video(p.stem) for p in images] == [("run00", t) for t in chosen]
    thumbs = frames.thumbnails(np.stack([np.asarray(Image.open(p)) for p in images]))
    threshold = manifest["rule"]["min_distance"]
    assert all(frames.frame_distance(a, b) >= threshold for a, b in itertools.combinations(thumbs, 2))
    assert [f["frame"] for f in manifest["frames"]] == chosen and all(f["why"] for f in manifest["frames"])
    return chosen


@pytest.mark.parametrize("fmt", ["gif", "dicom"])
def test_skips_frames_without_contrast_keeps_at_most_n_apart(run, tmp_path, fmt):
    manifest = sample(write(tmp_path, run, fmt), tmp_path / "out")
    check_rule(manifest, tmp_path / "out", run["contrast"])
    (entry,) = manifest["runs"]
    # the heartbeat is measured, not assumed: the generator's period to a third of a frame (the fit was within
    # 0.25 frames on 9 of 10 synthetic runs of 60 frames, common/frames.py)
    assert abs(entry["period_frames"] - run["period"]) < 0.35
    assert manifest["frames"][0]["time"] == pytest.approx(manifest["frames"][0]["frame"] * synth.CINE_FRAME_MS / 1000,
                                                          abs=1e-3)


def test_mp4(run, tmp_path):
    pytest.importorskip("av")
    manifest = sample(write(tmp_path, run, "mp4"), tmp_path / "out")
    assert manifest["runs"][0]["frames"] == FRAMES
    check_rule(manifest, tmp_path / "out", run["contrast"])


def test_same_seed_same_frames(run, tmp_path):
    videos = write(tmp_path, run, "gif")
    first, again = sample(videos, tmp_path / "a"), sample(videos, tmp_path / "b")
    assert [f["image"] for f in first["frames"]] == [f["image"] for f in again["frames"]]
    assert all((tmp_path / "a" / f["image"]).read_bytes() == (tmp_path / "b" / f["image"]).read_bytes()
               for f in first["frames"])


def test_wide_frames_give_the_8bit_frames(run, tmp_path):
    """12- and 16-bit versions of the run read as its 8-bit frames. Exact, not within 1/255: the wide
    values are v * (2^b - 1) / 255 rounded, and scaling back by the bit depth lands within
    0.5 * 255 / (2^b - 1) grey levels of v (0.03 for 12 bits), far from a rounding boundary (synth.widen)."""
    eight = frames.read_run("run00", "stack", str(write(tmp_path, run, "gif") / "run00.gif")).frames
    assert np.array_equal(eight, run["frames"])
    wide = [frames.read_run("run00", "stack", str(write(tmp_path, run, "tiff", bits=16) / "run00.tif")),
            frames.read_run("run00", "dicom", str(write(tmp_path, run, "dicom", bits=12) / "run00.dcm")),
            # a window over the whole 12-bit range is the same mapping: LINEAR gives x / 4095 * 255
            frames.read_run("run00", "dicom", str(write(tmp_path, run, "dicom", "win", bits=12, window=(2048, 4096))
                                                  / "win.dcm"))]
    for read in wide:
        assert np.array_equal(read.frames, eight), read.info
    assert "window" in wide[-1].info["grey"] and wide[-1].info["saturated"] == 0


def test_dicom_window_is_applied_and_saturation_reported(run, tmp_path):
    centre, width = 1800, 1200  # stored values (12-bit) outside 1200-2400 saturate
    path = write(tmp_path, run, "dicom", bits=12, window=(centre, width)) / "run00.dcm"
    read = frames.read_run("run00", "dicom", str(path))
    values = synth.widen(run["frames"], 12).astype(np.float64)
    expected = np.round(np.clip((values - (centre - 0.5)) / (width - 1) + 0.5, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(read.frames, expected)
    outside = np.mean((values < centre - 0.5 - (width - 1) / 2) | (values > centre - 0.5 + (width - 1) / 2))
    assert read.info["saturated"] == pytest.approx(outside) and outside > 0


def test_pydicom_test_file_multiframe_colour():
    """A multi-frame file pydicom ships (30 JPEG-baseline YBR frames): decoded, grey, timed."""
    from pydicom import examples
    read = frames.read_run("ybr", "dicom", str(examples.get_path("ybr_color")))
    assert read.frames.shape == (30, 240, 320) and read.frames.dtype == np.uint8
    assert read.times[1] > 0


def test_frame_folders_loose_frames_and_duplicated_frames(run, tmp_path):
    """A sub-folder of 16-bit PNG frames is one run read like its 8-bit version; loose frames named
    <video>_<frame> are grouped as the loaders group them; a run whose every frame appears twice (a
    15 frames/s run exported at 30) never gives both copies."""
    videos = tmp_path / "videos"
    (videos / "folder_run").mkdir(parents=True)
    for t, frame in enumerate(synth.widen(run["frames"], 16)):
        Image.fromarray(frame).save(videos / "folder_run" / f"f{t}.png")  # natural order: f2 before f10
    for t, frame in enumerate(run["frames"][:5]):
        Image.fromarray(frame).save(videos / f"loose_{t}.png")
    synth.write_cine(videos / "doubled.tif", np.repeat(run["frames"], 2, axis=0), "tiff")
    found = frames.find_runs(str(videos))
    assert [(name, kind) for name, kind, _ in found] == [("doubled", "stack"), ("folder_run", "folder"),
                                                         ("loose", "frames")]
    folder = frames.read_run(*found[1])
    assert np.array_equal(folder.frames, run["frames"]) and folder.sources[10].endswith("f10.png")
    manifest = sample(videos, tmp_path / "out")
    doubled = next(r for r in manifest["runs"] if r["video"] == "doubled")
    kept = [k["frame"] for k in doubled["chosen"]]
    assert len({t // 2 for t in kept}) == len(kept)


def test_help_explains_every_flag_and_impossible_values_stop_at_start(capsys):
    assert all(action.help for action in frames.build_parser()._actions)
    for flag, value in (("--per_video", "0"), ("--min_distance", "-0.1"), ("--contrast_level", "1.5")):
        with pytest.raises(SystemExit) as stop:
            frames.parse_args(["--videos", "v", "--out", "o", flag, value])
        assert stop.value.code == 2 and f"argument {flag}: got" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the damaged file before it fails
def test_one_line_errors(run, tmp_path, capsys, monkeypatch):
    """Refusals name the file: a non-empty --out, a damaged DICOM, a DICOM without pydicom."""
    def error(argv):
        with pytest.raises(SystemExit) as stop:
            cli.run_main(frames.main, frames.parse_args, argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 1 and len(lines) == 1, lines
        return lines[0]

    videos = write(tmp_path, run, "gif")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("someone's")
    assert f"{taken}: exists and is not empty" in error(["--videos", str(videos), "--out", str(taken)])
    assert (taken / "notes.txt").exists() and not list(tmp_path.glob("taken.tmp*"))
    assert "holds the videos" in error(["--videos", str(videos), "--out", str(tmp_path), "--overwrite"])
    assert f"{tmp_path / 'nowhere'}: not a stage checkpoint" in error(
        ["--videos", str(videos), "--out", str(tmp_path / "o0"), "--init", str(tmp_path / "nowhere")])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    assert str(broken / "run.dcm") in error(["--videos", str(broken), "--out", str(tmp_path / "o1")])
    monkeypatch.setitem(__import__("sys").modules, "pydicom", None)  # as if requirements-extras.txt were not installed
    line = error(["--videos", str(broken), "--out", str(tmp_path / "o2")])
    assert str(broken / "run.dcm") in line and "requirements-extras.txt" in line
    assert not os.path.exists(tmp_path / "o1") and not os.path.exists(tmp_path / "o2")


def test_draft_masks_are_the_prediction_paths_and_marked(run, tmp_path, tiny_folder):
    """--init writes drafts/ (never masks/): the masks evaluate.py predicts for the same checkpoint."""
    import evaluate
    from common.lora import base_fingerprint, save_stage
    from common.sa2va import load_model

    model, _ = load_model(tiny_folder)
    ckpt = str(tmp_path / "ckpt")
    save_stage(model, ckpt, ["mask_decoder"], dict(stage="sft", base_model=tiny_folder,
                                                   base_fingerprint=base_fingerprint(model)))
    out = tmp_path / "out"
    manifest = sample(write(tmp_path, run, "gif"), out, "--init", ckpt, "--threshold", "0.35")
    stems = sorted(p.stem for p in (out / "images").iterdir())
    assert sorted(p.stem for p in (out / "drafts").glob("*.png")) == stems and not (out / "masks").exists()
    assert "NOT ground truth" in (out / "drafts" / "README.txt").read_text()
    assert "DRAFT" in Image.open(out / "drafts" / f"{stems[0]}.png").info["Description"]
    assert manifest["drafts"]["checkpoint"] == ckpt and manifest["drafts"]["base_model"] == tiny_folder
    evaluate.main(evaluate.parse_args(["--model", tiny_folder, "--init", ckpt, "--data", str(out), "--threshold", "0.35",
                                       "--output", str(tmp_path / "pred"), "--num_workers", "0"]))
    for stem in stems:
        assert np.array_equal(np.asarray(Image.open(out / "drafts" / f"{stem}.png")),
                              np.asarray(Image.open(tmp_path / "pred" / "masks" / f"{stem}.png")))


def test_run_sh_starts_from_videos(run, tmp_path):
    """VIDEOS=DIR: run.sh samples the frames into its data folder first (its banner says so), stops until
    they have masks, and does not sample again once they do."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), VIDEOS=str(write(tmp_path, run, "gif")), PER_VIDEO="4", STAGES="none")
    first = subprocess.run(["bash", "run.sh", "quick"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 3, first.stdout[-2000:] + first.stderr[-2000:]
    assert f"==== frames from videos: {env['VIDEOS']} -> {out}/data" in first.stdout
    assert "no masks yet" in first.stderr and f"{out}/data/masks/<same name>.png" in first.stderr
    images = sorted((out / "data" / "images").iterdir())
    assert 1 <= len(images) <= 4 and (out / "data" / "manifest.json").is_file()
    (out / "data" / "masks").mkdir()
    for path in images:  # what annotators hand back
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(out / "data" / "masks" / path.name)
    again = subprocess.run(["bash", "run.sh", "quick"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "not sampled again" in again.stdout, again.stderr[-2000:]
