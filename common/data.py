"""Vessel frames from videos: the folder dataset, video grouping, video-level splits.

Layout (DESIGN.md): `<data>/images/` and `<data>/masks/` with the same file stem; a mask is
any single-channel (or RGB) image where vessel pixels are non-zero. Optional
`<data>/splits.json` = {"train": [stems], "val": [...], "test": [...]}.

Mask rule: a mask with at most two distinct values is read as "> 0 is vessel" (0/255, 0/1,
16-bit 0/65535, palette indices). A mask with more values (a JPEG-compressed mask, say) is
thresholded at half its type's range, with a warning naming the file. Empty masks are
allowed (metrics define empty vs empty as a perfect match).

Frames of one video are near-duplicates, so without a split file the split is made by
VIDEO, never by frame. The video of a frame comes from its stem with `VIDEO_REGEX`
(`<video>_frame_<n>` or `<video>_<n>`; video ids may hold spaces, brackets, carets...).

Every problem is a `DataError` naming the file; the whole folder is checked when the
dataset is built (every image and mask decoded once), so a corrupt frame stops a run
before the first step, not in the middle of epoch 3.
"""
import json
import math
import os
import random
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VIDEO_REGEX = r"^(?P<video>.+?)_(?:frame_?)?(?P<frame>\d+)$"
SPLITS_FILE = "splits.json"


class DataError(ValueError):
    """Bad input data; the message names the file and what is wrong."""


@dataclass
class Frame:
    key: str  # file stem, unique in the folder
    image_path: str
    mask_path: str
    video: str
    frame: int


def parse_video(stem, video_regex=VIDEO_REGEX):
    """(video id, frame index) of a stem; a stem that does not match is a one-frame video."""
    m = re.match(video_regex, stem)
    if not m:
        return stem, 0
    return m.group("video"), int(m.group("frame"))


def list_images(folder):
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: folder not found")
    files = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        if stem in files:
            raise DataError(f"{os.path.join(folder, name)}: two files with stem {stem!r}")
        files[stem] = os.path.join(folder, name)
    return files


def read_image(path):
    """RGB PIL image, fully decoded; DataError on a missing or corrupt file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for bad files
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def read_mask(path, warn=True):
    """Bool (H, W) vessel mask with the module's mask rule."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGB", "RGBA", "LA"):
                im = im.convert("L")
            array = np.asarray(im)
    except Exception as e:
        raise DataError(f"{path}: cannot read mask ({type(e).__name__}: {e})") from None
    if array.ndim != 2:
        raise DataError(f"{path}: mask must be single-channel, got shape {array.shape}")
    values = np.unique(array)
    if len(values) <= 2:
        return array > 0
    top = np.iinfo(array.dtype).max if np.issubdtype(array.dtype, np.integer) else 1.0
    if warn:
        warnings.warn(f"{path}: mask has {len(values)} distinct values, not binary; "
                      f"thresholding at {top / 2:g} (vessel = value > half the range)")
    return array > top / 2


def image_size(path):
    try:
        with Image.open(path) as im:
            return im.size[::-1]
    except Exception as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def scan_folder(root, video_regex=VIDEO_REGEX, check=True, resize_masks=False):
    """All labelled frames of a data folder, sorted by (video, frame); checked when `check`."""
    images = list_images(os.path.join(root, "images"))
    masks = list_images(os.path.join(root, "masks"))
    if not images:
        raise DataError(f"{os.path.join(root, 'images')}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    missing = sorted(set(images) - set(masks))
    if missing:
        raise DataError(f"{os.path.join(root, 'masks')}: no mask for {len(missing)} image(s), e.g. "
                        f"{images[missing[0]]} (masks must have the image's file stem)")
    frames = []
    for stem, path in images.items():
        video, index = parse_video(stem, video_regex)
        frames.append(Frame(stem, path, masks[stem], video, index))
    frames.sort(key=lambda f: (f.video, f.frame, f.key))
    if check:
        for f in tqdm(frames, desc=f"checking {root}", leave=False, disable=len(frames) < 200):
            check_frame(f, resize_masks)
    return frames


def check_frame(frame, resize_masks=False):
    image = read_image(frame.image_path)
    mask = read_mask(frame.mask_path)
    if mask.shape != image.size[::-1] and not resize_masks:
        raise DataError(f"{frame.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but image "
                        f"{frame.image_path} is {image.size[0]}x{image.size[1]} (pass --resize_masks to resize "
                        f"masks with nearest neighbour)")


def split_by_video(frames, val_fraction=0.2, seed=0):
    """{'train': [...], 'val': [...]} with whole videos on each side (seeded shuffle of videos)."""
    videos = sorted({f.video for f in frames})
    random.Random(seed).shuffle(videos)
    n_val = max(1, round(val_fraction * len(videos))) if len(videos) > 1 else 0
    val = set(videos[:n_val])
    return {"train": [f for f in frames if f.video not in val], "val": [f for f in frames if f.video in val]}


def load_splits(root, frames, val_fraction=0.2, seed=0):
    """The folder's splits.json if present (validated), else a split by video."""
    path = os.path.join(root, SPLITS_FILE)
    if not os.path.exists(path):
        return split_by_video(frames, val_fraction, seed)
    try:
        with open(path) as f:
            spec = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(spec, dict) or not all(isinstance(v, list) for v in spec.values()):
        raise DataError(f"{path}: must be an object of lists of stems, like {{\"train\": [...], \"val\": [...]}}")
    by_key = {f.key: f for f in frames}
    splits = {}
    for name, stems in spec.items():
        unknown = [s for s in stems if s not in by_key]
        if unknown:
            raise DataError(f"{path}: split {name!r} names {len(unknown)} stem(s) with no image/mask, e.g. "
                            f"{unknown[0]!r}")
        splits[name] = [by_key[s] for s in stems]
    return splits


def cap_frames(frames, limit):
    """The first `limit` frames in (video, frame) order: a cap never splits the video-level split."""
    return frames if not limit or limit <= 0 else frames[:limit]


class VesselDataset(torch.utils.data.Dataset):
    """Samples: dict(image=PIL RGB, mask=bool (H, W), key, video, frame, index)."""

    def __init__(self, frames, resize_masks=False, transform=None):
        self.frames = list(frames)
        self.resize_masks = resize_masks
        self.transform = transform

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, index):
        f = self.frames[index]
        image = read_image(f.image_path)
        mask = read_mask(f.mask_path, warn=False)
        if mask.shape != image.size[::-1]:
            if not self.resize_masks:
                raise DataError(f"{f.mask_path}: mask size {mask.shape} differs from image {image.size[::-1]}")
            mask = np.asarray(Image.fromarray(mask).resize(image.size, Image.NEAREST))
        sample = dict(image=image, mask=mask, key=f.key, video=f.video, frame=f.frame, index=index)
        return self.transform(sample) if self.transform else sample


def build_splits(root, val_fraction=0.2, seed=0, max_train_samples=0, max_val_samples=0, video_regex=VIDEO_REGEX,
                 resize_masks=False):
    """(train frames, val frames) of a data folder, checked and capped."""
    frames = scan_folder(root, video_regex, resize_masks=resize_masks)
    splits = load_splits(root, frames, val_fraction, seed)
    if not splits.get("train") and not splits.get("val"):
        raise DataError(f"{root}: empty split")
    return cap_frames(splits.get("train", []), max_train_samples), cap_frames(splits.get("val", []), max_val_samples)


class ShardedSampler(torch.utils.data.Sampler):
    """Training order: a seeded permutation per epoch, split over ranks.

    Padded by wrapping so every rank gets the same number of samples (each rank must run the
    same number of optimizer steps); `start` skips the samples a resumed run already saw."""

    def __init__(self, size, rank=0, world_size=1, shuffle=True, seed=0):
        self.size, self.rank, self.world_size, self.shuffle, self.seed = size, rank, world_size, shuffle, seed
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(size / world_size)

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __iter__(self):
        order = list(range(self.size))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        order += order[:self.per_rank * self.world_size - self.size]
        return iter(order[self.rank::self.world_size][self.start:])

    def __len__(self):
        return self.per_rank - self.start


class EvalSampler(torch.utils.data.Sampler):
    """Each sample exactly once over all ranks (no padding, so sums over ranks are exact)."""

    def __init__(self, size, rank=0, world_size=1):
        self.indices = list(range(rank, size, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
