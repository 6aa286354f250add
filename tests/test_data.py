"""The mask-folder layout (images/ + masks/): bad inputs, the mask rule, splits (common/data.py)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from common.data import DataError, VesselDataset, build_splits, cap_frames, load_splits, read_mask, scan_folder

SIZE = (10, 14)  # (H, W): not square, so a transposed mask is caught


def vessel(value=255, dtype=np.uint8):
    m = np.zeros(SIZE, dtype)
    m[3:6, 2:12] = value
    return m


def make_folder(root, stems=("v1_frame_1", "v1_frame_2"), mask=None):
    """images/<stem>.png (RGB) + masks/<stem>.png (0/255) for each stem; returns the folder."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    for stem in stems:
        image = rng.integers(0, 255, (*SIZE, 3), dtype=np.uint8)
        Image.fromarray(image).save(os.path.join(root, "images", stem + ".png"))
        Image.fromarray(vessel() if mask is None else mask).save(os.path.join(root, "masks", stem + ".png"))
    return str(root)


def test_corrupt_image_is_named_before_training(tmp_path):
    root = make_folder(tmp_path)
    with open(os.path.join(root, "images", "v1_frame_2.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"v1_frame_2.png: cannot read image"):
        scan_folder(root)


def test_missing_mask(tmp_path):
    root = make_folder(tmp_path)
    os.remove(os.path.join(root, "masks", "v1_frame_1.png"))
    with pytest.raises(DataError, match=r"no mask for 1 image\(s\), e\.g\. .*v1_frame_1.png"):
        scan_folder(root)


def test_size_mismatch_stops_unless_resize_masks(tmp_path):
    root = make_folder(tmp_path)
    Image.fromarray(np.full((5, 7), 255, np.uint8)).save(os.path.join(root, "masks", "v1_frame_2.png"))
    with pytest.raises(DataError, match=r"v1_frame_2.png: mask is 7x5 but image .* is 14x10 \(pass --resize_masks"):
        scan_folder(root)
    frames = scan_folder(root, resize_masks=True)
    sample = VesselDataset(frames, resize_masks=True)[1]
    assert sample["mask"].shape == SIZE and sample["mask"].all()  # nearest resize of an all-vessel mask
    with pytest.raises(DataError, match="differs from image"):
        VesselDataset(frames)[1]


def test_grey_mask_with_many_values_is_thresholded_at_half_range(tmp_path):
    """A 0/255 mask with JPEG-like noise (many values) is read as > 127.5; the folder's mask
    summary says so once (not a warning per file); a mask of a few values is refused (test_user_folder)."""
    m = vessel(200)
    m[0, :12] = np.arange(1, 13) * 10  # 10..120: ringing below half the range
    m[9, 13] = 128
    root = make_folder(tmp_path, mask=m)
    np.testing.assert_array_equal(read_mask(os.path.join(root, "masks", "v1_frame_1.png")), m > 127)
    with pytest.warns(UserWarning, match=r"2 mask\(s\) read with many grey values .* vessel = value > half the range"):
        frames = scan_folder(root)
    assert [f.vessel_pixels for f in frames] == [31, 31]


@pytest.mark.parametrize("kind", ["zeros", "0/1", "16-bit", "16-bit non-binary", "palette", "rgb"])
def test_mask_encodings(tmp_path, kind):
    path = os.path.join(tmp_path, "m.png")
    expected = vessel(1).astype(bool)
    if kind == "zeros":
        Image.fromarray(np.zeros(SIZE, np.uint8)).save(path)
        expected = np.zeros(SIZE, bool)  # an empty mask is allowed: a frame without vessel
    elif kind == "0/1":
        Image.fromarray(vessel(1)).save(path)
    elif kind == "16-bit":
        Image.fromarray(vessel(65535, np.uint16)).save(path)
    elif kind == "16-bit non-binary":
        m = vessel(40000, np.uint16)
        m[0, :10] = np.arange(1, 11) * 1000  # many values, all below half of 65535: background
        Image.fromarray(m).save(path)
    elif kind == "palette":
        im = Image.fromarray(vessel(1)).convert("P")
        im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 = red
        im.save(path)
    else:
        Image.fromarray(np.repeat(vessel()[..., None], 3, axis=2)).save(path)
    with Image.open(path) as im:
        assert im.mode == {"16-bit": "I;16", "16-bit non-binary": "I;16", "palette": "P", "rgb": "RGB"}.get(kind, "L")
    out = read_mask(path)
    np.testing.assert_array_equal(out, expected)


def test_grayscale_and_rgb_images_give_rgb_samples(tmp_path):
    root = make_folder(tmp_path)
    gray = np.arange(SIZE[0] * SIZE[1], dtype=np.uint8).reshape(SIZE)
    Image.fromarray(gray).save(os.path.join(root, "images", "v1_frame_1.png"))  # mode L
    ds = VesselDataset(scan_folder(root))
    for i in range(2):
        assert ds[i]["image"].mode == "RGB" and ds[i]["image"].size == SIZE[::-1]
    np.testing.assert_array_equal(np.asarray(ds[0]["image"])[..., 1], gray)
    assert ds[0]["mask"].dtype == bool and ds[0]["mask"].sum() == 30


def test_splits_json_naming_a_missing_stem(tmp_path):
    root = make_folder(tmp_path)
    frames = scan_folder(root)
    path = os.path.join(root, "splits.json")
    with open(path, "w") as f:
        json.dump({"train": ["v1_frame_1"], "val": ["v1_frame_3"]}, f)
    with pytest.raises(DataError, match=r"splits.json: split 'val' names 1 stem\(s\) .*'v1_frame_3'"):
        load_splits(root, frames)
    with open(path, "w") as f:
        json.dump(["v1_frame_1"], f)
    with pytest.raises(DataError, match="must be an object of lists of stems"):
        load_splits(root, frames)
    with open(path, "w") as f:
        json.dump({"train": ["v1_frame_1"], "val": ["v1_frame_2"]}, f)
    train, val = build_splits(root)
    assert [f.key for f in train] == ["v1_frame_1"] and [f.key for f in val] == ["v1_frame_2"]


def test_default_split_is_by_video_so_frames_cannot_leak(tmp_path):
    stems = [f"{video}_{i:03d}" for video in ("a", "b", "c", "d", "e(1) x") for i in range(5)]
    root = make_folder(tmp_path, stems)
    for seed in range(4):
        train, val = build_splits(root, val_fraction=0.4, seed=seed, max_train_samples=7, max_val_samples=3)
        assert len(train) == 7 and len(val) == 3
        assert not {f.video for f in train} & {f.video for f in val}
        full_train, full_val = build_splits(root, val_fraction=0.4, seed=seed)
        assert len({f.video for f in full_val}) == 2 and len(full_train) + len(full_val) == 25
        assert cap_frames(full_train, 7) == train  # the cap keeps (video, frame) order
