"""Vessel frames from videos: the two data layouts, video grouping, video-level splits.

A data folder comes in one of two layouts (`data_format`: `auto` picks the one the folder
has; a folder holding both is refused until the layout is named):

`masks`: `<data>/images/` + `<data>/masks/` with the same file stem (the DESIGN.md layout).
Mask rule (`MaskRule`, --mask_rule / --vessel_values; `auto` by default). A rule must never turn
a labelled mask into an empty one without a word (every mask empty would score Dice 1.0 against
empty predictions), so `auto` decides only what it can tell and refuses the rest:
- at most two distinct values (0/255, 0/1, 16-bit 0/65535, palette indices): vessel = value > 0;
- maximum <= SMALL_LABEL_MAX (a label map 0 = background, 1 = artery, 2 = vein; a 0/1 mask saved
  as JPEG, whose values become 0, 1, 2...): vessel = value > 0. No 0-255 mask is that dark;
- a few distinct values above that (<= LABEL_MAP_MAX_VALUES: VOC-style 0, 1 = vessel, 255 = void;
  0/128/255 artery/vein): a label map whose vessel value cannot be told: refused, naming the file
  and its values; say which values are vessel with --vessel_values (e.g. 1; others are background);
- many distinct values (a 0/255 mask saved as JPEG, anti-aliased edges): vessel = value > half
  the type's range (127.5 for 8 bit); refused when that leaves no vessel in a non-zero mask.
`nonzero` (value > 0), `half` (value > half the range) and `values` (value in --vessel_values)
apply one rule to every mask; an explicit rule that empties a non-zero mask is counted in the
folder's mask summary (a warning), since the user chose it. RGB(A) masks are read as grey
(L = 0.299 R + 0.587 G + 0.114 B), palette masks by their indices. Masks that are empty in the
file are allowed (frames without vessel), but a split whose masks are ALL empty is refused
(`check_masks`). The folder's decision is summarised in one warning when it was not plain binary.

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
VIDEO, never by frame. `still_images` (--still_images) makes every image its own video (folders
of independent stills such as drive_01.png ... drive_20.png, which the default regex would read
as 20 frames of one video `drive`). A split that leaves no validation frame is refused with the
fix (`one_video_error`), never trained on. The video of a frame comes from its stem with `VIDEO_REGEX`:
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
import contextlib
import json
import math
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common.files import atomic_folder

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VIDEO_REGEX = r"^(?P<video>.+?)_(?:frame_?)?(?P<frame>\d+)$"
SPLITS_FILE = "splits.json"
ANNOTATIONS_FILE = "annotations.json"
DATA_FORMATS = ("auto", "masks", "annotations")
MASK_RULES = ("auto", "nonzero", "half", "values")
SMALL_LABEL_MAX = 15  # auto: a mask with values in 0..15 is a label map or a noisy 0/1 mask (> 0 is vessel)
LABEL_MAP_MAX_VALUES = 8  # auto: this few distinct values, some above SMALL_LABEL_MAX = discrete labels
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
    rule: "MaskRule" = None  # masks layout: how the mask file's values become vessel (None = auto)
    vessel_pixels: int = None  # set when the folder is checked (scan_folder)


@dataclass(frozen=True)
class MaskRule:
    """How a mask file's values become vessel pixels (module docstring): name in MASK_RULES;
    vessel_values for `values`."""
    name: str = "auto"
    vessel_values: tuple = ()

    @classmethod
    def from_args(cls, args):
        """The rule of the shared data flags (--mask_rule, --vessel_values); DataError when they disagree."""
        name, values = getattr(args, "mask_rule", "auto"), getattr(args, "vessel_values", None)
        if values:
            try:
                values = tuple(sorted({int(v) for v in str(values).split(",") if v.strip()}))
            except ValueError:
                raise DataError(f"--vessel_values {args.vessel_values!r}: expected integers like 1 or 1,2") from None
            if name not in ("auto", "values"):
                raise DataError(f"--vessel_values goes with --mask_rule values, not --mask_rule {name}")
            return cls("values", values)
        if name == "values":
            raise DataError("--mask_rule values needs --vessel_values (e.g. --vessel_values 1)")
        if name not in MASK_RULES:
            raise DataError(f"--mask_rule must be one of {', '.join(MASK_RULES)}, not {name!r}")
        return cls(name)


AUTO = MaskRule()


def parse_video(stem, video_regex=VIDEO_REGEX):
    """(video id, frame index) of a stem; a stem that does not match, or any stem when
    video_regex is None (still images), is a one-frame video."""
    m = re.match(video_regex, stem) if video_regex else None
    if not m:
        return stem, 0
    return m.group("video"), int(m.group("frame"))


def check_video_regex(video_regex):
    """The compiled regex, or DataError when it is not one with the groups `video` and `frame`
    (checked up front: a missing group would otherwise surface as IndexError mid-run)."""
    if video_regex is None:
        return None
    try:
        compiled = re.compile(video_regex)
    except re.error as e:
        raise DataError(f"--video_regex {video_regex!r}: not a valid regex ({e})") from None
    missing = [g for g in ("video", "frame") if g not in compiled.groupindex]
    if missing:
        raise DataError(f"--video_regex {video_regex!r}: no group {' or '.join(missing)}; it needs (?P<video>...) "
                        f"and (?P<frame>\\d+), e.g. the default {VIDEO_REGEX!r} (or --still_images: every image "
                        f"its own video)")
    return compiled


LAYOUTS_HINT = ("supported layouts: <data>/images/<video>_<frame>.png + <data>/masks/<same name>, or "
                "<data>/images/ + annotations.json; for still images <data>/images/<name>.png with --still_images")


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


@contextlib.contextmanager
def open_image(path, what="image"):
    """`with open_image(path) as im:` a PIL image; a failure to open or read it (PIL raises many
    types for bad files) becomes a DataError naming the file."""
    try:
        with Image.open(path) as im:
            yield im
    except Exception as e:
        raise DataError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None


def read_image(path):
    """RGB PIL image, fully decoded; DataError on a missing or corrupt file. Frames of more than
    8 bits (16-bit PNG, 32-bit or float TIFF) are scaled to 8 bits by `to_8bit`, never clipped."""
    with open_image(path) as im:
        im.load()
        if im.mode in WIDE_MODES:
            return Image.fromarray(to_8bit(np.asarray(im)), "L").convert("RGB")
        return im.convert("RGB")


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


def no_images_error(folder):
    """DataError for a folder without image files, saying what it holds instead (nested video
    folders are the usual case) and the layouts that are read."""
    subdirs = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))) \
        if os.path.isdir(folder) else []
    nested = (f"; it holds {len(subdirs)} folder(s), e.g. {os.path.join(folder, subdirs[0])}/: nested "
              f"<video>/<frame> folders are not read, name the files <video>_<frame>.png in one folder instead"
              if subdirs else "")
    return DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}){nested}. {LAYOUTS_HINT}")


def _values_text(array, limit=8):
    values, counts = np.unique(array, return_counts=True)
    shown = ", ".join(f"{v:g} ({c} px)" for v, c in zip(values[:limit].tolist(), counts[:limit].tolist()))
    return f"{len(values)} values: {shown}" + (" ..." if len(values) > limit else "")


def apply_mask_rule(array, rule=AUTO, path="mask"):
    """(bool vessel mask, how) of a mask array under a MaskRule (module docstring); how names the
    branch taken: binary, small, grey, nonzero, half, values. DataError naming `path` and its
    values for what `auto` cannot decide, or when auto's threshold would empty a non-zero mask."""
    rule = rule or AUTO
    top = np.iinfo(array.dtype).max if np.issubdtype(array.dtype, np.integer) else 1.0
    if rule.name == "nonzero":
        return array > 0, "nonzero"
    if rule.name == "half":
        return array > top / 2, "half"
    if rule.name == "values":
        return np.isin(array, rule.vessel_values), "values"
    values = np.unique(array)
    if len(values) <= 2:
        return array > 0, "binary"
    if values[-1] <= SMALL_LABEL_MAX:
        return array > 0, "small"
    fix = "--vessel_values V[,V...] (the vessel values; all others are background) or --mask_rule nonzero|half"
    if len(values) <= LABEL_MAP_MAX_VALUES:
        raise DataError(f"{path}: mask holds {_values_text(array)}: a label map whose vessel value cannot be told "
                        f"(0/1/255 with 255 = void? 0/128/255 artery/vein?); say which with {fix}")
    mask = array > top / 2
    if array.any() and not mask.any():
        raise DataError(f"{path}: no pixel is above half the range ({top / 2:g}), so the mask would read as empty "
                        f"although it has non-zero pixels ({_values_text(array)}); say which values are vessel with "
                        f"{fix}")
    return mask, "grey"


def read_mask_array(path):
    """The mask file's values as a 2-D array (RGB read as grey, palette as indices); DataError if unreadable."""
    with open_image(path, "mask") as im:
        im.load()
        array = np.asarray(im.convert("L") if im.mode in ("RGB", "RGBA", "LA") else im)
    if array.ndim != 2:
        raise DataError(f"{path}: mask must be single-channel, got shape {array.shape}")
    return array


def read_mask(path, rule=AUTO):
    """Bool (H, W) vessel mask under the mask rule (module docstring; scan_folder summarises a
    folder's decisions)."""
    return apply_mask_rule(read_mask_array(path), rule, path)[0]


def frame_mask(frame):
    """Bool (H, W) target of a frame of either layout (use this, not read_mask(frame.mask_path))."""
    if frame.bits is not None:
        height, width = frame.shape
        return np.unpackbits(frame.bits, count=height * width).reshape(height, width).astype(bool)
    return read_mask(frame.mask_path, rule=frame.rule)


def image_size(path):
    with open_image(path) as im:
        return im.size[::-1]


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


def scan_folder(root, video_regex=VIDEO_REGEX, resize_masks=False, data_format="auto", allow_empty_annotations=False,
                mask_rule=None):
    """All labelled frames of a data folder (either layout), sorted by (video, frame), checked (every
    file decoded, `vessel_pixels` set, the mask rule's decisions summarised). video_regex None =
    still images (every image its own video)."""
    check_video_regex(video_regex)
    layout = detect_format(root, data_format)
    images = list_images(os.path.join(root, "images"))
    if not images:
        raise no_images_error(os.path.join(root, "images"))
    if layout == "masks":
        frames = _mask_frames(root, images, video_regex, mask_rule or AUTO)
    else:
        frames = _annotation_frames(root, images, video_regex, allow_empty_annotations)
    frames.sort(key=lambda f: (f.video, f.frame, f.key))
    decisions = {}
    for f in tqdm(frames, desc=f"checking {root}", leave=False, disable=len(frames) < 200):
        decisions.setdefault(check_frame(f, resize_masks), []).append(f)
    summary = mask_summary(decisions, mask_rule or AUTO)
    if summary:
        warnings.warn(f"{os.path.join(root, 'masks')}: {summary}")
    return frames


def mask_summary(decisions, rule):
    """One line on how the mask rule read a folder's masks, or None when every mask was plain
    binary. decisions: {how (apply_mask_rule's, + ' emptied'): [frames]}."""
    if set(decisions) <= {"binary", "annotations"}:
        return None
    said = {"binary": "two values, vessel = value > 0",
            "small": "small values (label map, or 0/1 saved as JPEG), vessel = value > 0",
            "grey": "many grey values (JPEG or anti-aliased 0-255), vessel = value > half the range",
            "nonzero": "vessel = value > 0 (--mask_rule nonzero)",
            "half": "vessel = value > half the range (--mask_rule half)",
            "values": f"vessel = values {', '.join(map(str, rule.vessel_values))} (--vessel_values)"}
    parts = []
    for how, frames in sorted(decisions.items(), key=lambda kv: -len(kv[1])):
        base, _, emptied = how.partition(" ")
        text = f"{len(frames)} mask(s) read with {said.get(base, base)}"
        if emptied:
            text += (f" LEFT EMPTY although the file has non-zero values (the rule you chose reads them as "
                     f"background)")
        parts.append(text + f", e.g. {os.path.basename(frames[0].mask_path)}")
    return "; ".join(parts)


def _mask_frames(root, images, video_regex, rule):
    mask_dir = os.path.join(root, "masks")
    masks = list_images(mask_dir)
    missing = sorted(set(images) - set(masks))
    if missing:
        nested = "" if masks else f" ({no_images_error(mask_dir)})"
        raise DataError(f"{mask_dir}: no mask for {len(missing)} image(s), e.g. "
                        f"{images[missing[0]]} (masks must have the image's file stem){nested}")
    return [Frame(stem, path, masks[stem], *parse_video(stem, video_regex), rule=rule) for stem, path in images.items()]


# ----------------------------------------------------------------------------- annotations.json

def _pycocotools():
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise ImportError("the annotations.json layout needs pycocotools (`pip install pycocotools`): Sa2VA's own "
                          "polygon rasteriser, so that masks match the released models' training data") from None
    return mask_utils


def rasterise(polygons, height, width):
    """Bool (H, W) union of flat polygons [x1, y1, x2, y2, ...], exactly as Sa2VA's loader: pycocotools'
    scan conversion, a pixel inside when its centre is (the module docstring's square). Polygons must
    hold >= 3 points (pycocotools reads a 4-number list as a box); check them with `entry_polygons` first."""
    mask = np.zeros((height, width), bool)
    if polygons:
        mask_utils = _pycocotools()
        rles = mask_utils.frPyObjects([[float(v) for v in p] for p in polygons], height, width)
        with warnings.catch_warnings():  # pycocotools' decode trips a numpy-2 DeprecationWarning per call
            warnings.simplefilter("ignore", DeprecationWarning)
            mask = mask_utils.decode(rles).any(axis=2)  # the loader adds each polygon's mask: > 0 is the union
    return mask


def read_json(path, what="file"):
    """The content of a JSON file, or DataError naming it (`what` not found, or not valid JSON)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: {what} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


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
    entries = read_json(path)
    if not isinstance(entries, list):
        raise DataError(f"{path}: must be a JSON list of entries [{{\"image\": ..., \"mask\": ..., \"text\": ...}}, "
                        f"...] (Sa2VA's format), got a JSON {type(entries).__name__}")
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
    """Decode the frame's image and mask, set frame.vessel_pixels; returns how the mask was read
    (apply_mask_rule's branch, + " emptied" when a non-zero file became an empty mask)."""
    image = read_image(frame.image_path)
    if frame.bits is not None:  # rasterised at the size of the image's header
        if frame.shape != image.size[::-1]:
            raise DataError(f"{frame.image_path}: decodes to {image.size[0]}x{image.size[1]}, its header said "
                            f"{frame.shape[1]}x{frame.shape[0]}")
        frame.vessel_pixels = int(np.unpackbits(frame.bits).sum())
        return "annotations"
    array = read_mask_array(frame.mask_path)
    mask, how = apply_mask_rule(array, frame.rule, frame.mask_path)
    frame.vessel_pixels = int(mask.sum())
    if array.any() and not frame.vessel_pixels:
        how += " emptied"  # only an explicit rule gets here: auto refuses (apply_mask_rule)
    if mask.shape != image.size[::-1] and not resize_masks:
        raise DataError(f"{frame.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but image "
                        f"{frame.image_path} is {image.size[0]}x{image.size[1]} (pass --resize_masks to resize "
                        f"masks with nearest neighbour)")
    return how


def split_by_video(frames, val_fraction=0.2, seed=0):
    """{'train': [...], 'val': [...]} with whole videos on each side (seeded shuffle of videos).
    With one video there is nothing to hold out: val is empty (load_splits refuses that)."""
    videos = sorted({f.video for f in frames})
    random.Random(seed).shuffle(videos)
    n_val = max(1, round(val_fraction * len(videos))) if len(videos) > 1 else 0
    val = set(videos[:n_val])
    return {"train": [f for f in frames if f.video not in val], "val": [f for f in frames if f.video in val]}


def one_video_error(root, frames):
    """DataError for a folder whose frames form one video: a split by video has no validation side.
    Folders of still images named <name>_NN land here (drive_01 ... drive_20 = video 'drive')."""
    video, first, last = frames[0].video, min(f.frame for f in frames), max(f.frame for f in frames)
    return DataError(f"{root}: all {len(frames)} frame(s) are ONE video {video!r} by --video_regex (frames {first} to "
                     f"{last}), so a split by video leaves no validation frame. Still images (independent pictures "
                     f"named like {frames[0].key}): pass --still_images (run.sh: STILL_IMAGES=1), each image is then "
                     f"its own video. One real video: list the stems of each split in {os.path.join(root, SPLITS_FILE)}")


def describe_split(frames):
    """'N frames of V videos' (the start-up lines say this for every split)."""
    return f"{len(frames)} frames of {len({f.video for f in frames})} videos"


def check_masks(frames, what, root):
    """DataError when a split is empty or every checked mask of it is empty: scores would compare
    empty with empty (Dice 1.0) and training would learn to predict nothing."""
    if not frames:
        raise DataError(f"{root}: the {what} split has no frames")
    counted = [f.vessel_pixels for f in frames if f.vessel_pixels is not None]
    if counted and len(counted) == len(frames) and not any(counted):
        raise DataError(f"{root}: every mask of the {what} split ({len(frames)} frames, e.g. "
                        f"{frames[0].mask_path or frames[0].image_path}) is empty: no vessel pixel to learn or score "
                        f"(an empty prediction would score Dice 1.0). Check the masks and the mask rule "
                        f"(--mask_rule, --vessel_values), or raise the caps (--max_train_samples, --max_val_samples)")


def load_splits(root, frames, val_fraction=0.2, seed=0):
    """The folder's splits.json if present (validated), else a split by video (refused when the
    folder is one video: see one_video_error)."""
    path = os.path.join(root, SPLITS_FILE)
    if not os.path.exists(path):
        splits = split_by_video(frames, val_fraction, seed)
        if not splits["val"] and frames:
            raise one_video_error(root, frames)
        return splits
    spec = read_json(path)
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


def select_split(args, split, with_total=False):
    """The frames of one split (`all` = every frame) from the shared data flags, capped as the
    training scripts cap them, so a list mined or scored here names the frames they train on.
    Refused when empty or all its masks are empty (check_masks). with_total: (frames, frames in
    the folder)."""
    frames = everything = scan_folder(args.data, args.video_regex, resize_masks=args.resize_masks,
                                      data_format=args.data_format, allow_empty_annotations=args.allow_empty_annotations,
                                      mask_rule=MaskRule.from_args(args))
    if split != "all":
        splits = load_splits(args.data, frames, args.val_fraction, args.seed)
        if split not in splits:
            raise DataError(f"{args.data}: no split {split!r}; it has {sorted(splits)} (or use all)")
        frames = cap_frames(splits[split], args.max_train_samples if split == "train" else args.max_val_samples)
    check_masks(frames, split, args.data)
    return (frames, len(everything)) if with_total else frames


def file_names(ids):
    """{id: file-name stem unique among ids}: characters outside [A-Za-z0-9._-] become _, and ids
    that then collide ("left eye" / "left_eye"; also by case, for macOS and Windows disks) get
    -2, -3, ... so no per-video output overwrites another."""
    out, taken = {}, set()
    for i in sorted(ids):
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", i) or "video"
        name, n = base, 1
        while name.lower() in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name.lower())
        out[i] = name
    return out


class VesselDataset(torch.utils.data.Dataset):
    """Samples: dict(image=PIL RGB, mask=bool (H, W), key, video, frame, index), + prompt (see text_prompt).

    text_prompt: None, or a template with {text} (TEXT_PROMPT): a frame with an annotation text
    then gets sample["prompt"] = text_prompt.format(text=frame.text), used instead of --prompt."""

    def __init__(self, frames, resize_masks=False, text_prompt=None):
        self.frames, self.resize_masks, self.text_prompt = list(frames), resize_masks, text_prompt

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
        return sample


VIEWS = 8  # the dihedral views of a frame: 4 quarter turns, each with or without a left-right flip


def dihedral(array, view):
    """View 0-7 of an (H, W[, C]) array: `view % 4` quarter turns, then a left-right flip for view >= 4."""
    if view == 0:
        return array
    array = np.rot90(array, view % 4)
    return np.ascontiguousarray(array[:, ::-1] if view >= 4 else array)


def view_key(key, view):
    # view 0 keeps the plain stem, so its features are shared with mining and evaluation
    return key if view == 0 else f"{key}@view{view}"


class AugmentedViews(torch.utils.data.Dataset):
    """A VesselDataset whose every sample is shown under a random dihedral view (flip / quarter
    turn, image and mask together), drawn from (seed, epoch, index): the same epoch redraws the
    same views (a resumed run too), and each view has its own cache key."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def set_epoch(self, epoch):
        self.epoch = epoch  # read by the DataLoader workers each epoch starts (they are not persistent)

    def __getitem__(self, index):
        sample = self.dataset[index]
        view = random.Random(f"{self.seed}-{self.epoch}-{index}").randrange(VIEWS)
        return dict(sample, image=Image.fromarray(dihedral(np.asarray(sample["image"]), view)),
                    mask=dihedral(sample["mask"], view), key=view_key(sample["key"], view))


def build_splits(root, val_fraction=0.2, seed=0, max_train_samples=0, max_val_samples=0, video_regex=VIDEO_REGEX,
                 resize_masks=False, data_format="auto", allow_empty_annotations=False, mask_rule=None):
    """(train frames, val frames) of a data folder of either layout, checked and capped. Neither
    may be empty nor have only empty masks (check_masks): a training run validates on val."""
    frames = scan_folder(root, video_regex, resize_masks=resize_masks, data_format=data_format,
                         allow_empty_annotations=allow_empty_annotations, mask_rule=mask_rule)
    splits = load_splits(root, frames, val_fraction, seed)
    train = cap_frames(splits.get("train", []), max_train_samples)
    val = cap_frames(splits.get("val", []), max_val_samples)
    where = os.path.join(root, SPLITS_FILE) if os.path.exists(os.path.join(root, SPLITS_FILE)) else root
    check_masks(train, "train", where)
    check_masks(val, "val", where)
    return train, val


def splits_from_args(args):
    """build_splits of --data with the shared data flags (common.cli.add_data_args): the training scripts'
    (train frames, val frames)."""
    return build_splits(args.data, args.val_fraction, args.seed, args.max_train_samples, args.max_val_samples,
                        args.video_regex, args.resize_masks, data_format=args.data_format,
                        allow_empty_annotations=args.allow_empty_annotations, mask_rule=MaskRule.from_args(args))


class ShardedSampler(torch.utils.data.Sampler):
    """Training order: a seeded permutation per epoch, split over ranks; with a `curriculum`
    (AreaCurriculum), that epoch's frames in its order instead.

    Padded by wrapping so every rank gets the same number of samples (each rank must run the
    same number of optimizer steps); `start` skips the samples a resumed run already saw."""

    def __init__(self, size, rank=0, world_size=1, shuffle=True, seed=0, curriculum=None):
        self.size, self.rank, self.world_size, self.shuffle, self.seed = size, rank, world_size, shuffle, seed
        self.curriculum = curriculum
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(size / world_size)

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def epoch_order(self, epoch):
        """Every rank's samples of `epoch` before sharding (without padding)."""
        if self.curriculum is not None:
            return self.curriculum.arrange(range(self.size), epoch, random.Random(f"{self.seed}-{epoch}"))
        order = list(range(self.size))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        return order

    def per_rank_at(self, epoch):
        """Samples each rank gets in `epoch` (a curriculum's epochs differ in size)."""
        if self.curriculum is None:
            return self.per_rank
        return math.ceil(len(self.epoch_order(epoch)) / self.world_size)

    def __iter__(self):
        order = self.epoch_order(self.epoch)
        per_rank = math.ceil(len(order) / self.world_size)
        order += padding(order, per_rank * self.world_size - len(order))
        return iter(order[self.rank::self.world_size][self.start:])

    def __len__(self):
        return self.per_rank_at(self.epoch) - self.start


CURRICULA = ("off", "area")


def vessel_area(frame):
    """Share of the frame's pixels that are vessel (its target as the folder check read it)."""
    pixels = frame.vessel_pixels if frame.vessel_pixels is not None else int(frame_mask(frame).sum())
    height, width = frame.shape or image_size(frame.mask_path or frame.image_path)
    return pixels / (height * width)


class AreaCurriculum:
    """Large vessels first, then medium, then thin ones (the methodology's PPO notes).

    The frames (`areas`: {index: vessel area}) are ranked by vessel area, largest first, and cut into
    `phases` groups of equal count. The epochs are spread evenly over the phases: epoch e of
    `epochs` trains on the first min(phases, e * phases // epochs + 1) groups (growing subsets),
    and the last epoch on all of them. Within an epoch the groups come in order, largest vessels
    first, each shuffled by the epoch's generator. Items whose index the curriculum does not rank
    (e.g. replayed easy frames) are in every phase, after the ranked ones."""

    def __init__(self, areas, phases, epochs):
        ranked = sorted(areas, key=lambda i: (-areas[i], i))
        self.group = {int(i): g for g, part in enumerate(np.array_split(np.asarray(ranked, dtype=int), phases))
                      for i in part}
        self.phases, self.epochs = phases, epochs

    def phase(self, epoch):
        """How many groups `epoch` trains on (1 ... phases)."""
        if epoch >= self.epochs - 1:
            return self.phases
        return min(self.phases, epoch * self.phases // self.epochs + 1)

    def select(self, items, epoch, index=int):
        """The items of `epoch`'s groups, in their given order (index(item): the frame index)."""
        phase = self.phase(epoch)
        return [item for item in items if self.group.get(index(item), -1) < phase]

    def arrange(self, items, epoch, rng, index=int):
        """The items of `epoch`'s groups, group by group (largest vessels first, unranked items
        last), shuffled within a group by `rng` (a random.Random)."""
        chosen = self.select(items, epoch, index)
        order = []
        for g in list(range(self.phase(epoch))) + [-1]:
            part = [item for item in chosen if self.group.get(index(item), -1) == g]
            rng.shuffle(part)
            order += part
        return order

    def describe(self):
        """'3 phases: 6 / 11 / 16 frames' (the frames each phase trains on)."""
        sizes = [sum(g < k for g in self.group.values()) for k in range(1, self.phases + 1)]
        return f"{self.phases} phases over {self.epochs} epochs, largest vessels first: " + " / ".join(map(str, sizes)) \
            + " frames"


def area_curriculum(frames, args, indices=None):
    """The AreaCurriculum of --curriculum area (None for off) over `indices` of `frames` (default all)."""
    if getattr(args, "curriculum", "off") == "off":
        return None
    indices = range(len(frames)) if indices is None else indices
    return AreaCurriculum({i: vessel_area(frames[i]) for i in indices}, args.curriculum_phases, args.epochs)


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
    with atomic_folder(out) as tmp:
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
