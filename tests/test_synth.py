"""Tests for common/synth.py: determinism, file contracts, and the properties the
pipeline relies on (near-duplicate neighbours, washed-out stretches)."""

import json
import time

import numpy as np
import pytest
from PIL import Image
from skimage.draw import polygon2mask

from common import synth

SMALL = dict(num_videos=4, frames_per_video=8, size=128, seed=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synth.write_dataset(tmp_path_factory.mktemp("synth") / "data", **SMALL)


def load_mask(path):
    return np.array(Image.open(path)) > 0


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_video_types():
    images, masks, contrast = synth.make_video(np.random.default_rng(0), 5, 96)
    assert len(images) == len(masks) == len(contrast) == 5
    assert all(im.shape == (96, 96, 3) and im.dtype == np.uint8 for im in images)
    assert all(m.shape == (96, 96) and m.dtype == bool for m in masks)
    assert all(isinstance(c, float) for c in contrast)


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    again = synth.write_dataset(tmp_path / "again", **SMALL)
    assert tree_bytes(again) == tree_bytes(dataset)
    other = synth.write_dataset(tmp_path / "other", **{**SMALL, "seed": 1})
    other_files = tree_bytes(other)
    assert other_files.keys() == tree_bytes(dataset).keys()
    assert other_files["images/vid00_000.png"] != tree_bytes(dataset)["images/vid00_000.png"]


def test_layout_and_masks_binary(dataset):
    images = sorted((dataset / "images").iterdir())
    masks = sorted((dataset / "masks").iterdir())
    assert [p.name for p in images] == [p.name for p in masks]
    assert len(images) == SMALL["num_videos"] * SMALL["frames_per_video"]
    assert images[0].name == "vid00_000.png"
    for image_path, mask_path in zip(images, masks):
        image, mask = Image.open(image_path), np.array(Image.open(mask_path))
        assert image.mode == "RGB" and image.size == (SMALL["size"], SMALL["size"])
        assert mask.shape == (SMALL["size"], SMALL["size"])
        assert set(np.unique(mask)) <= {0, 255}


def test_vessel_fraction_sane(dataset):
    fractions = [load_mask(p).mean() for p in (dataset / "masks").iterdir()]
    assert 0.04 < np.mean(fractions) < 0.16
    assert 0.02 < min(fractions) and max(fractions) < 0.25


def test_neighbouring_frames_closer_than_other_videos(dataset):
    n_videos, n_frames = SMALL["num_videos"], SMALL["frames_per_video"]
    masks = [[load_mask(dataset / "masks" / f"vid{v:02d}_{f:03d}.png") for f in range(n_frames)]
             for v in range(n_videos)]
    neighbours = [iou(video[f], video[f + 1]) for video in masks for f in range(n_frames - 1)]
    across = [iou(masks[v][f], masks[w][f])
              for v in range(n_videos) for w in range(v + 1, n_videos) for f in range(n_frames)]
    assert np.mean(neighbours) > 0.45
    assert np.mean(neighbours) > 3 * np.mean(across)


def test_every_video_has_washed_out_stretch(dataset):
    meta = json.loads((dataset / "synth_meta.json").read_text())
    assert len(meta["videos"]) == SMALL["num_videos"]
    for video in meta["videos"]:
        low = np.array(video["contrast"]) < synth.HARD_CONTRAST
        runs = video["hard_stretches"]
        assert runs and any(last - first + 1 >= 2 for first, last in runs)
        for first, last in runs:
            assert low[first:last + 1].all()
        assert sum(last - first + 1 for first, last in runs) == low.sum()


def test_washed_out_frames_are_faint_but_masked():
    images, masks, contrast = synth.make_video(np.random.default_rng(3), 12, 128)
    contrast = np.array(contrast)

    def darkening(image, mask):
        gray = image[:, :, 0].astype(float)
        return gray[~mask].mean() - gray[mask].mean()

    faint = [darkening(im, m) for im, m, c in zip(images, masks, contrast) if c < synth.HARD_CONTRAST]
    normal = [darkening(im, m) for im, m, c in zip(images, masks, contrast) if c > 0.8]
    assert np.mean(faint) < 0.5 * np.mean(normal)
    fractions = np.array([m.mean() for m in masks])
    assert fractions[contrast < synth.HARD_CONTRAST].mean() > 0.8 * fractions.mean()


def test_annotations_format(dataset, tmp_path):
    out = synth.write_dataset(tmp_path / "ann", **SMALL, fmt="annotations")
    assert not (out / "masks").exists()
    records = json.loads((out / "annotations.json").read_text())
    assert isinstance(records, list) and len(records) == SMALL["num_videos"] * SMALL["frames_per_video"]
    size = SMALL["size"]
    for record in records:
        assert set(record) == {"image", "mask", "text"}
        assert record["text"] == ["blood vessel"]
        assert (out / "images" / record["image"]).read_bytes() == \
            (dataset / "images" / record["image"]).read_bytes()
        assert record["mask"]
        redrawn = np.zeros((size, size), bool)
        for polygon in record["mask"]:
            assert len(polygon) % 2 == 0 and len(polygon) >= 6
            xy = np.array(polygon).reshape(-1, 2)
            assert xy.min() >= 0 and xy.max() <= size  # COCO convention: pixel centres at +0.5
            redrawn |= polygon2mask((size, size), xy[:, ::-1] - 0.5)  # skimage: centres at integers
        mask = load_mask(dataset / "masks" / record["image"])
        # Polygons only lose the slits that open loops; they never add vessel.
        assert not (redrawn & ~mask).any()
        assert iou(redrawn, mask) > 0.93


def test_rerun_returns_existing_other_args_raise(dataset, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")}
    start = time.perf_counter()
    assert synth.write_dataset(dataset, **SMALL) == dataset
    assert time.perf_counter() - start < 0.5
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*")} == before
    with pytest.raises(ValueError, match="num_videos"):
        synth.write_dataset(dataset, **{**SMALL, "num_videos": 3})
    with pytest.raises(ValueError, match="fmt"):
        synth.write_dataset(dataset, **SMALL, fmt="annotations")

    not_synth = tmp_path / "not_synth"
    not_synth.mkdir()
    with pytest.raises(FileExistsError):
        synth.write_dataset(not_synth, **SMALL)


def test_interrupted_run_is_redone(tmp_path):
    args = dict(num_videos=1, frames_per_video=3, size=64, seed=0)
    leftover = tmp_path / "data.tmp"
    (leftover / "images").mkdir(parents=True)
    (leftover / "images" / "junk.png").write_bytes(b"half written")
    out = synth.write_dataset(tmp_path / "data", **args)
    assert not leftover.exists()
    assert sorted(p.name for p in (out / "images").iterdir()) == \
        ["vid00_000.png", "vid00_001.png", "vid00_002.png"]


def test_cli(tmp_path, capsys):
    synth.main(synth.parse_args(["--out", str(tmp_path / "cli"), "--videos", "1", "--frames", "2",
                                 "--size", "64", "--format", "annotations"]))
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "1 videos" in line
    assert (tmp_path / "cli" / "annotations.json").is_file()
