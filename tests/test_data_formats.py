"""The two data layouts: Sa2VA annotations.json polygons and mask folders (common/data.py).

Rasterisation against hand-computed masks and against the official loader's pycocotools
loop; the same data in both layouts gives identical samples; video grouping of odd names and
leak-free splits; every bad-input case stops with an error naming the entry."""
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402

from common import data  # noqa: E402
from common.data import (DataError, VesselDataset, build_splits, frame_mask, parse_video, rasterise,  # noqa: E402
                         scan_folder)

SQUARE = [2, 2, 8, 2, 8, 8, 2, 8]  # (2,2)-(8,8)
SQUARE_2 = [5, 5, 11, 5, 11, 11, 5, 11]  # (5,5)-(11,11), overlaps SQUARE on (5,5)-(8,8)
TRIANGLE = [2, 2, 10, 2, 2, 10]
ODD_NAMES = ["An Cong Xue(0000932433)_1-3_1_051C3E6A_frame_000011",
             "An Cong Xue(0000932433)_1-3_1_051C3E6A_frame_000012", "Li^Wei (2)_frame_3", "Li^Wei (2)_frame_4", "case_12_0007", "case_12_0008", "vid-A_frame9",
             "vid-A_frame10"]


def make_folder(root, entries, size=(12, 12), extra_images=(), seed=0):
    """images/ (random RGB PNGs, size = (H, W)) for every entry's image + extra_images; annotations.json = entries."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    names = {e["image"] for e in entries if isinstance(e, dict) and isinstance(e.get("image"), str)}
    names = {n for n in names if os.path.basename(n) == n and not n.startswith("missing")} or {"v_1.png"}
    for name in sorted(names | set(extra_images)):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(os.path.join(root, "images", name))
    with open(os.path.join(root, "annotations.json"), "w") as f:
        json.dump(entries, f)
    return str(root)


def target(root, **kw):
    (frame,) = scan_folder(root, **kw)
    return frame_mask(frame)


# ----------------------------------------------------------------------------- rasterisation

def test_square_is_36_pixels_not_pillows_49():
    expected = np.zeros((12, 12), bool)
    expected[2:8, 2:8] = True  # pixels whose centre (c + 0.5, r + 0.5) lies inside
    np.testing.assert_array_equal(rasterise([SQUARE], 12, 12), expected)
    pil = Image.new("L", (12, 12))
    ImageDraw.Draw(pil).polygon(SQUARE, fill=1)
    assert expected.sum() == 36 and np.asarray(pil).sum() == 49  # why we do not fill with Pillow


def test_triangle_and_overlapping_polygons():
    rows, cols = np.mgrid[0:12, 0:12]
    # centre strictly inside x > 2, y > 2, x + y < 12  <=>  c >= 2, r >= 2, c + r <= 10
    triangle = (cols >= 2) & (rows >= 2) & (cols + rows <= 10)
    np.testing.assert_array_equal(rasterise([TRIANGLE], 12, 12), triangle)
    union = np.zeros((12, 12), bool)
    union[2:8, 2:8] = union[5:11, 5:11] = True
    np.testing.assert_array_equal(rasterise([SQUARE, SQUARE_2], 12, 12), union)
    assert union.sum() == 36 + 36 - 9


@pytest.mark.parametrize("mask", [[[SQUARE], [SQUARE_2]],  # official: list of masks, each a list of polygons
                                  [[SQUARE, SQUARE_2]],  # official, one mask of two polygons
                                  [SQUARE, SQUARE_2],  # flat: a list of polygons
                                  [[SQUARE], [], [SQUARE_2]]])  # an object without polygon adds nothing
def test_both_nestings_give_the_union(tmp_path, mask):
    root = make_folder(tmp_path, [{"image": "v_frame_1.png", "mask": mask, "text": ["blood vessel"]}])
    np.testing.assert_array_equal(target(root), rasterise([SQUARE, SQUARE_2], 12, 12))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under numpy 2
def test_random_polygons_match_the_official_loader():
    """The official loop (bytedance/Sa2VA sa2va_data_finetune.py): per polygon frPyObjects([seg]) + decode, summed."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        height, width = rng.integers(5, 60, 2)  # H != W catches a transposed mask
        polygons = []  # 1-4 random (often self-intersecting) polygons, some vertices just outside the image
        for _ in range(rng.integers(1, 5)):
            n = int(rng.integers(3, 9))
            xs, ys = rng.uniform(-0.9, width + 0.9, n), rng.uniform(-0.9, height + 0.9, n)
            polygons.append(np.stack([xs, ys], 1).ravel().tolist())
        official = np.zeros((height, width), np.uint8)
        for seg in polygons:
            official += mask_utils.decode(mask_utils.frPyObjects([seg], height, width)).squeeze()
        np.testing.assert_array_equal(rasterise(polygons, height, width), official > 0)


# ----------------------------------------------------------------------------- both layouts

def test_same_data_in_both_layouts_gives_identical_samples(tmp_path):
    rng = np.random.default_rng(1)
    entries = []
    for name in ODD_NAMES:
        n = int(rng.integers(1, 4))
        polygons = [np.stack([rng.uniform(0, 20, 5), rng.uniform(0, 16, 5)], 1).ravel().round(2).tolist()
                    for _ in range(n)]
        entries.append({"image": name + ".png", "mask": [polygons], "text": ["Blood vessel."]})
    root = make_folder(tmp_path / "ann", entries, size=(16, 20))
    out, n = data.to_masks(root, str(tmp_path / "as_masks"))
    assert n == len(ODD_NAMES) and sorted(os.listdir(out)) == ["images", "masks"]
    ann = build_splits(root, val_fraction=0.25, seed=3)
    masks = build_splits(out, val_fraction=0.25, seed=3)
    for frames_a, frames_m in zip(ann, masks):
        a, m = VesselDataset(frames_a), VesselDataset(frames_m)
        assert len(a) == len(m) > 0
        for i in range(len(a)):
            sa, sm = a[i], m[i]
            assert {k: sa[k] for k in ("key", "video", "frame")} == {k: sm[k] for k in ("key", "video", "frame")}
            np.testing.assert_array_equal(np.asarray(sa["image"]), np.asarray(sm["image"]))
            np.testing.assert_array_equal(sa["mask"], sm["mask"])
            assert sa["mask"].any()
    assert frames_a[0].text == "blood vessel" and frames_m[0].text is None


def test_synthetic_annotations_convert_and_forced_format(tmp_path):
    from common.synth import write_dataset
    root = str(write_dataset(tmp_path / "synth", num_videos=3, frames_per_video=2, size=48, fmt="annotations"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its contours reach 0.5 px outside the image
        frames = scan_folder(root)
        out, n = data.to_masks(root)
    assert out == root + "_masks" and n == 6
    for f, g in zip(frames, scan_folder(out)):
        np.testing.assert_array_equal(frame_mask(f), frame_mask(g))
    # a folder with both masks/ and annotations.json must be told which to use
    os.rename(os.path.join(out, "masks"), os.path.join(root, "masks"))
    with pytest.raises(DataError, match="both masks/ and annotations.json.*--data_format"):
        scan_folder(root)
    assert scan_folder(root, data_format="masks")[0].mask_path is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert scan_folder(root, data_format="annotations")[0].bits is not None


def test_text_becomes_the_prompt_only_when_asked(tmp_path):
    root = make_folder(tmp_path, [{"image": "a_1.png", "mask": [SQUARE], "text": ["Blood Vessel.", "blood vessel"]}])
    frames = scan_folder(root)
    assert "prompt" not in VesselDataset(frames)[0]
    prompt = VesselDataset(frames, text_prompt=data.TEXT_PROMPT)[0]["prompt"]
    assert prompt == "<image>\nPlease segment the blood vessel."


def test_cli_flag_reaches_the_scan(tmp_path):
    import evaluate
    root = make_folder(tmp_path, [{"image": "a_1.png", "mask": [SQUARE]}, {"image": "b_1.png", "mask": []}])
    args = evaluate.parse_args(["--data", root, "--data_format", "annotations", "--split", "all"])
    with pytest.raises(DataError, match="no polygon"):
        evaluate.select_split(args, args.split)
    args = evaluate.parse_args(["--data", root, "--split", "all", "--allow_empty_annotations"])
    with pytest.warns(UserWarning, match="all-background"):
        assert len(evaluate.select_split(args, args.split)) == 2
    args = evaluate.parse_args(["--data", root, "--data_format", "masks"])
    with pytest.raises(DataError, match="masks: folder not found"):
        evaluate.select_split(args, args.split)


# ----------------------------------------------------------------------------- video names and splits

@pytest.mark.parametrize("stem, video, frame", [
    ("An Cong Xue(0000932433)_1-3_1_051C3E6A_frame_000011", "An Cong Xue(0000932433)_1-3_1_051C3E6A", 11),
    ("Li^Wei (2)_frame_3", "Li^Wei (2)", 3),
    ("case_12_0007", "case_12", 7),
    ("vid-A_frame9", "vid-A", 9),
    ("vid00_003", "vid00", 3),
    ("p 1_frame_2_frame_5", "p 1_frame_2", 5),
    ("no_index_here", "no_index_here", 0),  # no match: a one-frame video
])
def test_default_regex_groups_odd_names(stem, video, frame):
    assert parse_video(stem) == (video, frame)


def test_split_never_puts_a_video_on_both_sides(tmp_path):
    entries = [{"image": f"{video}_frame_{i:06d}.jpg", "mask": [SQUARE]}
               for video in ("An Cong Xue(0000932433)_1-3_1_051C3E6A", "Li^Wei (2)", "x_1", "x_2", "y(3)^z")
               for i in range(4)]
    root = make_folder(tmp_path, entries)
    for seed in range(5):
        train, val = build_splits(root, val_fraction=0.4, seed=seed)
        train_videos, val_videos = {f.video for f in train}, {f.video for f in val}
        assert train_videos and val_videos and not train_videos & val_videos
        assert len(train) + len(val) == 20 and all(len([f for f in train + val if f.video == v]) == 4
                                                   for v in train_videos | val_videos)


# ----------------------------------------------------------------------------- bad input

def good(**kw):
    return dict({"image": "v_1.png", "mask": [[SQUARE]], "text": ["blood vessel"]}, **kw)


@pytest.mark.parametrize("entries, message", [
    ({"images": [], "annotations": []}, r"must be a JSON list of entries .* got a JSON dict"),
    ([good(), ["v_2.png"]], r"entry 1: must be an object"),
    ([good(), {"mask": [SQUARE]}], r"entry 1: no 'image' \(keys: mask\)"),
    ([good(image=None)], r"entry 0: 'image' must be a file name, got None"),
    ([good(image="images/v_1.png")], r"entry 0 \(image 'images/v_1.png'\): 'image' must be a file name inside"),
    ([good(), good(image="missing_9.png")], r"entry 1 \(image 'missing_9.png'\): image file .*missing_9.png not found"),
    ([good(mask=[[2, 2, 8, 2, 8, 8, 2]])], r"entry 0 \(image 'v_1.png'\): mask\[0\]: odd number of coordinates \(7\)"),
    ([good(mask=[[SQUARE, [2, 2, 8, 8]]])],
     r"entry 0 \(image 'v_1.png'\): mask\[0\]\[1\]: 2 point\(s\); a polygon needs at least 3"),
    ([good(mask=[[2, 2, 8, 2, 8, 30]])],
     r"entry 0 \(image 'v_1.png'\): mask\[0\]: point \(8, 30\) lies more than 1 px outside the 12x12 image"),
    ([good(mask=[[2, 2, -3, 2, 8, 8]])], r"point \(-3, 2\) lies more than 1 px outside"),
    ([good(mask=[[2, 2, "8", 2, 8, 8]])],
     r"entry 0 \(image 'v_1.png'\): mask\[0\]: coordinate 2 is '8', not a finite number"),
    ([good(mask=[[2, 2, None, 2, 8, 8]])], r"coordinate 2 is None, not a finite number"),
    ([good(mask=[[2, 2, True, 2, 8, 8]])], r"coordinate 2 is True, not a finite number"),
    ([good(mask=[[2, 2, float("nan"), 2, 8, 8]])], r"coordinate 2 is nan, not a finite number"),
    ([good(mask=[[SQUARE], SQUARE])], r"mask\[1\] is not a list of polygons while other items are"),
    ([good(mask={"counts": "x"})], r"entry 0 \(image 'v_1.png'\): 'mask' must be a list"),
    ([good(mask=[SQUARE, []])], r"entry 0 \(image 'v_1.png'\): mask\[1\]: 0 point\(s\)"),  # flat: empty polygon
    ([{"image": "v_1.png", "text": ["vessel"]}], r"entry 0 \(image 'v_1.png'\): no 'mask'"),
    ([good(text=[1])], r"entry 0 \(image 'v_1.png'\): 'text' must be a string or a list of strings"),
    ([good(), good(image="v_2.png", mask=[]), good(image="v_3.png", mask=[[]])],
     r"2 image\(s\) have no polygon, e.g. entry 1 \(image 'v_2.png'\).*--allow_empty_annotations"),
    ([], r"annotations.json: no entries"),
])
def test_bad_annotations_name_the_entry(tmp_path, entries, message):
    root = make_folder(tmp_path, entries)
    with pytest.raises(DataError, match=message):
        scan_folder(root)


def test_bad_json_and_missing_layout(tmp_path):
    root = make_folder(tmp_path, [good()])
    with open(os.path.join(root, "annotations.json"), "w") as f:
        f.write("[{\"image\": ")
    with pytest.raises(DataError, match="annotations.json: not valid JSON"):
        scan_folder(root)
    os.remove(os.path.join(root, "annotations.json"))
    with pytest.raises(DataError, match="neither masks/ nor annotations.json"):
        scan_folder(root)
    with pytest.raises(DataError, match="annotations.json: file not found"):
        scan_folder(root, data_format="annotations")


def test_empty_entry_allowed_only_on_request(tmp_path):
    root = make_folder(tmp_path, [good(), good(image="v_2.png", mask=[])])
    with pytest.raises(DataError, match="no polygon.*must not become an all-background target"):
        scan_folder(root)
    with pytest.warns(UserWarning, match="1 image\\(s\\) with no polygon are all-background targets"):
        frames = scan_folder(root, allow_empty_annotations=True)
    assert [frame_mask(f).sum() for f in frames] == [36, 0]


def test_unlabelled_images_are_skipped_with_one_warning(tmp_path):
    root = make_folder(tmp_path, [good()], extra_images=["v_2.png", "v_3.png"])
    with pytest.warns(UserWarning, match=r"2 image\(s\) have no entry in annotations.json: unlabelled, skipped"):
        frames = scan_folder(root)
    assert [f.key for f in frames] == ["v_1"]
    with open(os.path.join(root, "splits.json"), "w") as f:
        json.dump({"train": ["v_1"], "val": ["v_2"]}, f)
    with pytest.raises(DataError, match="split 'val' names 1 stem\\(s\\) that are no labelled frame.*'v_2'"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_splits(root)


def test_slightly_outside_is_cropped_with_a_warning_and_repeats_are_united(tmp_path):
    root = make_folder(tmp_path, [good(mask=[[-0.8, -0.8, 12.9, -0.8, 12.9, 5, -0.8, 5]]), good(mask=[SQUARE_2])])
    with pytest.warns(UserWarning) as record:
        mask = target(root)
    messages = " | ".join(str(w.message) for w in record)
    assert "1 polygon(s) reach up to 1 px outside" in messages and "union of the polygons" in messages
    expected = rasterise([[0, 0, 12, 0, 12, 5, 0, 5], SQUARE_2], 12, 12)  # = clipping to the image
    np.testing.assert_array_equal(mask, expected)


def test_converter_is_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    root = make_folder(tmp_path / "d", [good(), good(image="v_2.png", mask=[TRIANGLE])])
    data.main(["--to_masks", root])
    assert "wrote 2 frames" in capsys.readouterr().out
    assert np.asarray(Image.open(os.path.join(root + "_masks", "masks", "v_2.png"))).max() == 255
    with pytest.raises(SystemExit, match="already exists"):
        data.main(["--to_masks", root])
    saved = []

    def failing_save(self, path, *a, **k):
        saved.append(path)
        raise OSError("disk full")
    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        data.to_masks(root, str(tmp_path / "out"))
    assert saved and sorted(os.listdir(tmp_path)) == ["d", "d_masks"]  # neither out nor its temporary folder


def test_missing_pycocotools_says_how_to_install(tmp_path, monkeypatch):
    import sys
    root = make_folder(tmp_path, [good()])
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(ImportError, match="pip install pycocotools"):
        scan_folder(root)
