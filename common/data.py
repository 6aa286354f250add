"""Vessel frames from videos: the two data layouts, video grouping, video-level splits.

A data folder comes in one of two layouts (`data_format`: `auto` picks the one the folder
has; a folder holding both is refused until the layout is named):

`masks`: `<data>/images/` + `<data>/masks/` with the same file stem (the DESIGN.md layout).
Mask rule: a mask with at most two distinct values is read as "> 0 is vessel" (0/255, 0/1,
16-bit 0/65535, palette indices). A mask with more values (a JPEG-compressed mask, say) is
thresholded at half its type's range, with a warning naming the file. Empty masks are
allowed (metrics define empty vs empty as a perfect match).

`annotations`: `<data>/images/` + `<data>/annotations.json`, Sa2VA's own fine-tuning format
(bytedance/Sa2VA docs/finetune.md): a list of {"image": "<file name in images/>", "mask": ...,
"text": [...]}. `mask` is a list of objects, each a list of polygons
`[[[x1, y1, x2, y2, ...], ...], ...]` (official), or directly a list of polygons
`[[x1, y1, ...], ...]`; flat pixel coordinates, origin at the image's top-left corner. The
target is the union of all polygons of the image, rasterised exactly as the official loader
does (pycocotools `frPyObjects` + `decode`), so the masks are pixel-identical to the ones the
released models were trained on. That is not Pillow's fill: the square (2,2)-(8,8) covers 36
pixels in pycocotools (pixels whose centre lies inside) and 49 with ImageDraw.polygon (edges
included). Each image is rasterised once, when the folder is scanned, and kept bit-packed in
memory (H*W/8 bytes: 40 MB for 1220 frames of 512 px); samples unpack it. Decisions:
- an entry with no polygon at all is an error: an unlabelled frame must never become a silent
  all-background target. `allow_empty_annotations` (--allow_empty_annotations) makes such
  entries all-background targets, with a warning counting them;
- an image in images/ that no entry names is unlabelled: skipped, with one warning counting
  them, never used as background;
- an image named by several entries gets the union of all their polygons (one warning);
- a polygon reaching at most EDGE_TOLERANCE px outside the image (annotation tools snap to
  the border) is kept as is, with one warning counting them: the rasteriser crops it to the
  image, the same pixels as clipping and as the official loader. Further out is an error
  (polygons drawn on an image of another resolution, or x and y swapped);
- `image` must be a plain file name inside images/ (no folders), as in docs/finetune.md;
- `text` is lowercased and loses a final '.' (as in the official loader); the distinct phrases
  of an image, joined by " and ", are the frame's `text`. A VesselDataset built with
  `text_prompt=TEXT_PROMPT` gives each sample with a text its own "prompt" ("<image>\\nPlease
  segment the blood vessel."), which Sa2VAProcessor uses instead of --prompt; off by default.
pycocotools is imported only for this layout. `python -m common.data --to_masks DIR` writes
the masks layout of an annotations folder (to look at the masks, or to train without it).

Frames of one video are near-duplicates, so without a split file the split is made by
VIDEO, never by frame. The video of a frame comes from its stem with `VIDEO_REGEX`:
`<video>_frame_<n>`, `<video>_frame<n>` or `<video>_<n>`, the frame index being the LAST
such suffix, so video ids may hold spaces, brackets, carets, dashes and more `_<digits>`
groups (`An Cong Xue(0000932433)_1-3_1_051C3E6A_frame_000011` is frame 11 of video
`An Cong Xue(0000932433)_1-3_1_051C3E6A`). A stem that does not match is a one-frame video.
Optional `<data>/splits.json` = {"train": [stems], "val": [...], "test": [...]} (either layout).

Every problem is a `DataError` naming the file (and the entry of annotations.json); the whole
folder is checked when the dataset is built (every image and mask decoded once), so a corrupt
frame stops a run before the first step, not in the middle of epoch 3.
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VIDEO_REGEX = r"^(?P<video>.+?)_(?:frame_?)?(?P<frame>\d+)$"
SPLITS_FILE = "splits.json"
ANNOTATIONS_FILE = "annotations.json"
DATA_FORMATS = ("auto", "masks", "annotations")
TEXT_PROMPT = "<image>\nPlease segment the {text}."  # the default prompt with an entry's text as the object
EDGE_TOLERANCE = 1.0  # px a polygon may reach outside its image before it is refused


class DataError(ValueError):
    """Bad input data; the message names the file and what is wrong."""


@dataclass
class Frame:
    key: str  # file stem, unique in the folder
    image_path: str
    mask_path: str  # masks layout: the mask file; annotations layout: None (the target is `bits`)
    video: str
    frame: int
    text: str = None  # annotations layout: the entry's object name(s), e.g. "blood vessel"
    bits: np.ndarray = field(default=None, repr=False, compare=False)  # annotations: np.packbits(target)
    shape: tuple = None  # (H, W) of the target in `bits`


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
    """RGB PIL image, fully decoded; DataError on a missing or corrupt file. Frames of more than
    8 bits (16-bit PNG, 32-bit or float TIFF) are scaled to 8 bits by `to_8bit`, never clipped."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in WIDE_MODES:
                return Image.fromarray(to_8bit(np.asarray(im)), "L").convert("RGB")
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for bad files
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


# Pillow's single-channel modes wider than 8 bits; its own convert("RGB") clips them at 255, which
# turns a 16-bit frame white (a 16-bit frame folder trained to val Dice 0.000)
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
BIT_DEPTHS = (8, 10, 12, 14, 16)


def to_8bit(array):
    """uint8 grey levels of a wide single-channel frame, by its bit depth: values / (2^b - 1) * 255,
    b the smallest of 8, 10, 12, 14, 16 that holds the frame's largest value (X-ray detectors write
    10-14-bit values into 16-bit files; dividing those by 65535 would leave 16 grey levels). Float
    frames within [0, 1] are taken as fractions. Anything else (negative values, beyond 16 bits) is
    scaled by its own range, min -> 0 and max -> 255."""
    values = array.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("non-finite pixel values")
    if array.dtype.kind == "f" and low >= 0 and high <= 1:
        scaled = values
    elif low >= 0 and high <= 2 ** BIT_DEPTHS[-1] - 1:
        top = next(2 ** b - 1 for b in BIT_DEPTHS if high <= 2 ** b - 1)
        scaled = values / top
    else:
        scaled = (values - low) / max(high - low, 1e-12)
    return np.round(scaled * 255).astype(np.uint8)


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


def frame_mask(frame, warn=False):
    """Bool (H, W) target of a frame of either layout (use this, not read_mask(frame.mask_path))."""
    if frame.bits is not None:
        height, width = frame.shape
        return np.unpackbits(frame.bits, count=height * width).reshape(height, width).astype(bool)
    return read_mask(frame.mask_path, warn)


def image_size(path):
    try:
        with Image.open(path) as im:
            return im.size[::-1]
    except Exception as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def detect_format(root, data_format="auto"):
    """'masks' or 'annotations': the layout of a data folder, or `data_format` when it names one."""
    if data_format not in DATA_FORMATS:
        raise DataError(f"data_format must be one of {', '.join(DATA_FORMATS)}, not {data_format!r}")
    if data_format != "auto":
        return data_format  # the scan then says what is missing
    if not os.path.isdir(root):
        raise DataError(f"{root}: folder not found")
    has_masks = os.path.isdir(os.path.join(root, "masks"))
    has_json = os.path.isfile(os.path.join(root, ANNOTATIONS_FILE))
    if has_masks and has_json:
        raise DataError(f"{root}: holds both masks/ and {ANNOTATIONS_FILE}; say which to use with "
                        f"--data_format masks or --data_format annotations")
    if not (has_masks or has_json):
        raise DataError(f"{root}: neither masks/ nor {ANNOTATIONS_FILE} (a data folder is images/ + masks/, "
                        f"or images/ + {ANNOTATIONS_FILE})")
    return "masks" if has_masks else "annotations"


def scan_folder(root, video_regex=VIDEO_REGEX, check=True, resize_masks=False, data_format="auto",
                allow_empty_annotations=False):
    """All labelled frames of a data folder (either layout), sorted by (video, frame); checked when `check`."""
    layout = detect_format(root, data_format)
    images = list_images(os.path.join(root, "images"))
    if not images:
        raise DataError(f"{os.path.join(root, 'images')}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    if layout == "masks":
        frames = _mask_frames(root, images, video_regex)
    else:
        frames = _annotation_frames(root, images, video_regex, allow_empty_annotations)
    frames.sort(key=lambda f: (f.video, f.frame, f.key))
    if check:
        for f in tqdm(frames, desc=f"checking {root}", leave=False, disable=len(frames) < 200):
            check_frame(f, resize_masks)
    return frames


def _mask_frames(root, images, video_regex):
    masks = list_images(os.path.join(root, "masks"))
    missing = sorted(set(images) - set(masks))
    if missing:
        raise DataError(f"{os.path.join(root, 'masks')}: no mask for {len(missing)} image(s), e.g. "
                        f"{images[missing[0]]} (masks must have the image's file stem)")
    return [Frame(stem, path, masks[stem], *parse_video(stem, video_regex)) for stem, path in images.items()]


# ----------------------------------------------------------------------------- annotations.json

def _pycocotools():
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise ImportError("the annotations.json layout needs pycocotools (`pip install pycocotools`): Sa2VA's own "
                          "polygon rasteriser, so that masks match the released models' training data") from None
    return mask_utils


def rasterise(polygons, height, width):
    """Bool (H, W) union of flat polygons [x1, y1, x2, y2, ...], exactly as Sa2VA's loader (pycocotools).

    A pixel is inside when its centre is (pycocotools' scan conversion): the square (2,2)-(8,8)
    covers rows and columns 2..7, 36 pixels. Polygons must hold >= 3 points (pycocotools reads a
    4-number list as a box); check them with `entry_polygons` first."""
    mask = np.zeros((height, width), bool)
    if polygons:
        mask_utils = _pycocotools()
        rles = mask_utils.frPyObjects([[float(v) for v in p] for p in polygons], height, width)
        with warnings.catch_warnings():  # pycocotools' decode trips a numpy-2 DeprecationWarning per call
            warnings.simplefilter("ignore", DeprecationWarning)
            mask = mask_utils.decode(rles).any(axis=2)  # the loader adds each polygon's mask: > 0 is the union
    return mask


def read_annotations(path):
    """The entries of an annotations.json: a JSON list, or DataError."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(entries, list):
        raise DataError(f"{path}: must be a JSON list of entries [{{\"image\": ..., \"mask\": ..., \"text\": ...}}, "
                        f"...] (Sa2VA's format), got a JSON {type(entries).__name__}")
    return entries


def _check_polygon(polygon, where, width, height):
    """(polygon as floats, reaches slightly outside the image); DataError when it is not a polygon."""
    if not isinstance(polygon, list):
        raise DataError(f"{where}: expected a polygon [x1, y1, x2, y2, ...], got {type(polygon).__name__} "
                        f"{repr(polygon)[:60]}")
    for k, v in enumerate(polygon):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DataError(f"{where}: coordinate {k} is {v!r}, not a finite number")
    if len(polygon) % 2:
        raise DataError(f"{where}: odd number of coordinates ({len(polygon)}); a polygon is [x1, y1, x2, y2, ...]")
    if len(polygon) < 6:
        raise DataError(f"{where}: {len(polygon) // 2} point(s); a polygon needs at least 3")
    for x, y in zip(polygon[0::2], polygon[1::2]):
        if not (-EDGE_TOLERANCE <= x <= width + EDGE_TOLERANCE and -EDGE_TOLERANCE <= y <= height + EDGE_TOLERANCE):
            raise DataError(f"{where}: point ({x:g}, {y:g}) lies more than {EDGE_TOLERANCE:g} px outside the "
                            f"{width}x{height} image (polygons of another image size? x and y swapped?)")
    xs, ys = polygon[0::2], polygon[1::2]
    outside = min(xs) < 0 or min(ys) < 0 or max(xs) > width or max(ys) > height
    return [float(v) for v in polygon], outside


def entry_polygons(mask, where, width, height):
    """(polygons, how many reach slightly outside) of an entry's `mask`, in either nesting, checked."""
    if not isinstance(mask, list):
        raise DataError(f"{where}: 'mask' must be a list of polygons, or of lists of polygons; "
                        f"got {type(mask).__name__}")
    # [[]] is one object without polygons (official nesting: an empty target), [SQUARE, []] an empty polygon
    nested = any(isinstance(m, list) and m and isinstance(m[0], list) for m in mask) or (
        mask != [] and all(m == [] for m in mask))
    named = []
    for i, item in enumerate(mask):
        if not nested:
            named.append((f"mask[{i}]", item))
        elif not isinstance(item, list) or (item and not isinstance(item[0], list)):
            raise DataError(f"{where}: mask[{i}] is not a list of polygons while other items are: one entry "
                            f"must use one nesting, [[[x1, y1, ...], ...], ...] or [[x1, y1, ...], ...]")
        else:
            named += [(f"mask[{i}][{j}]", polygon) for j, polygon in enumerate(item)]
    checked = [_check_polygon(polygon, f"{where}: {name}", width, height) for name, polygon in named]
    return [p for p, _ in checked], sum(outside for _, outside in checked)


def entry_text(text, where):
    """The object name of an entry's `text` (a string or list of strings), normalised as Sa2VA's loader."""
    if text is None:
        return None
    if isinstance(text, str):
        text = [text]
    if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
        raise DataError(f"{where}: 'text' must be a string or a list of strings, got {text!r}")
    phrases = []
    for t in text:
        t = t.strip().lower()
        t = t[:-1].strip() if t.endswith(".") else t
        if t and t not in phrases:
            phrases.append(t)
    return " and ".join(phrases) or None


def _annotation_frames(root, images, video_regex, allow_empty):
    path = os.path.join(root, ANNOTATIONS_FILE)
    image_dir = os.path.join(root, "images")
    entries = read_annotations(path)
    labelled, stems = {}, {}  # image name -> what its entries say; stem -> image name
    outside = repeated = 0
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: must be an object {{\"image\", \"mask\", \"text\"}}, got {type(entry).__name__}")
        if "image" not in entry:
            raise DataError(f"{where}: no 'image' (keys: {', '.join(map(str, entry)) or 'none'})")
        name = entry["image"]
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: 'image' must be a file name, got {name!r}")
        where = f"{path}: entry {i} (image {name!r})"
        if os.path.basename(name) != name or "\\" in name:
            raise DataError(f"{where}: 'image' must be a file name inside {image_dir}, without folders")
        image_path = os.path.join(image_dir, name)
        if not os.path.isfile(image_path):
            stem = os.path.splitext(name)[0]
            hint = f" (there is {os.path.basename(images[stem])})" if stem in images else ""
            raise DataError(f"{where}: image file {image_path} not found{hint}")
        if "mask" not in entry:
            raise DataError(f"{where}: no 'mask'")
        height, width = image_size(image_path)
        polygons, n_outside = entry_polygons(entry["mask"], where, width, height)
        text = entry_text(entry.get("text"), where)
        outside += n_outside
        stem = os.path.splitext(name)[0]
        if stems.setdefault(stem, name) != name:
            raise DataError(f"{where}: same file stem as image {stems[stem]!r}; stems name frames and must be unique")
        if name in labelled:
            repeated += 1
            seen = labelled[name]
            seen["polygons"] += polygons
            seen["text"] = entry_text([t for t in (seen["text"], text) if t], where)
        else:
            labelled[name] = dict(index=i, path=image_path, size=(height, width), polygons=polygons, text=text)
    if not labelled:
        raise DataError(f"{path}: no entries")

    empty = [name for name, seen in labelled.items() if not seen["polygons"]]
    if empty and not allow_empty:
        raise DataError(f"{path}: {len(empty)} image(s) have no polygon, e.g. "
                        f"entry {labelled[empty[0]]['index']} (image {empty[0]!r}); an unlabelled frame must not "
                        f"become an all-background target: remove such entries, or pass --allow_empty_annotations "
                        f"if those frames truly show no vessel")
    if empty:
        warnings.warn(f"{path}: {len(empty)} image(s) with no polygon are all-background targets "
                      f"(--allow_empty_annotations), e.g. {empty[0]!r}")
    if outside:
        warnings.warn(f"{path}: {outside} polygon(s) reach up to {EDGE_TOLERANCE:g} px outside their image; "
                      f"rasterising crops them to the image (as Sa2VA's loader does)")
    if repeated:
        warnings.warn(f"{path}: {repeated} entr(y/ies) name an image already named; the target of such an image "
                      f"is the union of the polygons of all its entries")
    unlabelled = sorted({os.path.basename(p) for p in images.values()} - set(labelled))
    if unlabelled:
        warnings.warn(f"{image_dir}: {len(unlabelled)} image(s) have no entry in {ANNOTATIONS_FILE}: unlabelled, "
                      f"skipped (never used as background), e.g. {unlabelled[0]!r}")

    frames = []
    for name, seen in tqdm(labelled.items(), desc=f"rasterising {path}", leave=False, disable=len(labelled) < 200):
        stem = os.path.splitext(name)[0]
        target = rasterise(seen["polygons"], *seen["size"])
        frames.append(Frame(stem, seen["path"], None, *parse_video(stem, video_regex), text=seen["text"],
                            bits=np.packbits(target), shape=seen["size"]))
    return frames


# ----------------------------------------------------------------------------- checks, splits, dataset

def check_frame(frame, resize_masks=False):
    image = read_image(frame.image_path)
    if frame.bits is not None:  # rasterised at the size of the image's header
        if frame.shape != image.size[::-1]:
            raise DataError(f"{frame.image_path}: decodes to {image.size[0]}x{image.size[1]}, its header said "
                            f"{frame.shape[1]}x{frame.shape[0]}")
        return
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
            raise DataError(f"{path}: split {name!r} names {len(unknown)} stem(s) that are no labelled frame of "
                            f"the folder (no image, or no mask/annotation), e.g. {unknown[0]!r}")
        splits[name] = [by_key[s] for s in stems]
    return splits


def cap_frames(frames, limit):
    """The first `limit` frames in (video, frame) order: a cap never splits the video-level split."""
    return frames if not limit or limit <= 0 else frames[:limit]


def select_split(args, split):
    """The frames of one split (`all` = every frame) from the shared data flags, capped as the
    training scripts cap them, so a list mined or scored here names the frames they train on."""
    frames = scan_folder(args.data, args.video_regex, resize_masks=args.resize_masks, data_format=args.data_format,
                         allow_empty_annotations=args.allow_empty_annotations)
    if split == "all":
        return frames
    splits = load_splits(args.data, frames, args.val_fraction, args.seed)
    if split not in splits:
        raise DataError(f"{args.data}: no split {split!r}; it has {sorted(splits)} (or use all)")
    return cap_frames(splits[split], args.max_train_samples if split == "train" else args.max_val_samples)


class VesselDataset(torch.utils.data.Dataset):
    """Samples: dict(image=PIL RGB, mask=bool (H, W), key, video, frame, index), + prompt (see text_prompt).

    text_prompt: None, or a template with {text} (TEXT_PROMPT): a frame with an annotation text
    then gets sample["prompt"] = text_prompt.format(text=frame.text), used instead of --prompt."""

    def __init__(self, frames, resize_masks=False, transform=None, text_prompt=None):
        self.frames = list(frames)
        self.resize_masks = resize_masks
        self.transform = transform
        self.text_prompt = text_prompt

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, index):
        f = self.frames[index]
        image = read_image(f.image_path)
        mask = frame_mask(f)
        if mask.shape != image.size[::-1]:
            if not self.resize_masks:
                raise DataError(f"{f.mask_path or f.image_path}: mask size {mask.shape} differs from image "
                                f"{image.size[::-1]}")
            mask = np.asarray(Image.fromarray(mask).resize(image.size, Image.NEAREST))
        sample = dict(image=image, mask=mask, key=f.key, video=f.video, frame=f.frame, index=index)
        if self.text_prompt and f.text:
            sample["prompt"] = self.text_prompt.format(text=f.text)
        return self.transform(sample) if self.transform else sample


def build_splits(root, val_fraction=0.2, seed=0, max_train_samples=0, max_val_samples=0, video_regex=VIDEO_REGEX,
                 resize_masks=False, data_format="auto", allow_empty_annotations=False):
    """(train frames, val frames) of a data folder of either layout, checked and capped."""
    frames = scan_folder(root, video_regex, resize_masks=resize_masks, data_format=data_format,
                         allow_empty_annotations=allow_empty_annotations)
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
        order += padding(order, self.per_rank * self.world_size - self.size)
        return iter(order[self.rank::self.world_size][self.start:])

    def __len__(self):
        return self.per_rank - self.start


def padding(order, count):
    """`count` items repeating `order` from its start, as torch's DistributedSampler pads: with
    fewer samples than ranks (3 on 8) `order[:count]` is too short, some ranks got nothing while
    `len()` promised one each, and the others waited in a collective for ever."""
    return (order * math.ceil(count / len(order)))[:count] if order and count > 0 else []


class EvalSampler(torch.utils.data.Sampler):
    """Each sample exactly once over all ranks (no padding, so sums over ranks are exact). Ranks
    may get one sample more than others, or none: scoring runs no collective per batch, only one
    gather of the records at the end, which every rank reaches."""

    def __init__(self, size, rank=0, world_size=1):
        self.indices = list(range(rank, size, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# ----------------------------------------------------------------------------- converter

def to_masks(root, out=None, allow_empty_annotations=False):
    """Write the masks layout of an annotations folder; returns (out folder, frames written).

    out (default `<root>_masks`) must not exist. It gets images/ (hard links to the originals,
    copies across file systems), masks/<stem>.png (0/255, the same rasterisation as training)
    for every labelled frame, and root's splits.json. Written to a temporary folder beside
    `out` and renamed at the end, so `out` is complete or absent."""
    out = os.path.abspath(out or root.rstrip("/\\") + "_masks")
    if os.path.exists(out):
        raise DataError(f"{out}: already exists; remove it or pick another --out")
    frames = scan_folder(root, data_format="annotations", allow_empty_annotations=allow_empty_annotations)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp", dir=os.path.dirname(out))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
        os.makedirs(os.path.join(tmp, "images"))
        os.makedirs(os.path.join(tmp, "masks"))
        for f in tqdm(frames, desc=f"writing {out}", leave=False, disable=len(frames) < 200):
            link = os.path.join(tmp, "images", os.path.basename(f.image_path))
            try:
                os.link(f.image_path, link)
            except OSError:
                shutil.copy2(f.image_path, link)
            Image.fromarray(frame_mask(f).astype(np.uint8) * 255).save(os.path.join(tmp, "masks", f.key + ".png"))
        if os.path.isfile(os.path.join(root, SPLITS_FILE)):
            shutil.copy2(os.path.join(root, SPLITS_FILE), os.path.join(tmp, SPLITS_FILE))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, len(frames)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m common.data",
                                description="Write the images/ + masks/ layout of an images/ + annotations.json "
                                            "folder (Sa2VA polygons), e.g. to look at the masks.")
    p.add_argument("--to_masks", metavar="DATA_DIR", required=True, help="folder with images/ and annotations.json")
    p.add_argument("--out", default=None, help="folder to write, must not exist (default: DATA_DIR_masks)")
    p.add_argument("--allow_empty_annotations", action="store_true",
                   help="write entries with no polygon as empty masks instead of stopping")
    args = p.parse_args(argv)
    try:
        out, n = to_masks(args.to_masks, args.out, args.allow_empty_annotations)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {n} frames to {out} (images/ + masks/)")


if __name__ == "__main__":
    main()
