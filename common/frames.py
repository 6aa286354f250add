"""From angiography cine loops to training frames: the methodology's video-based frame sampling.

The methodology's 1,220 frames were sampled from continuous X-ray angiography runs so that they
cover the cardiac cycle, contrast wash-in and wash-out and the run's changes of angle and
exposure, instead of near-duplicate neighbours. This module makes that choice, measured on the
images of each run, and writes the frames as the loaders read them:

    python -m common.frames --videos cines/ --out data/ --per_video 20
    python -m common.frames --videos cines/ --out data/ --per_video 20 --init runs/sft_x/best   # + draft masks

Inputs (every file or sub-folder of --videos is one run): multi-frame DICOM (`.dcm`, `.dicom`, or
any file with the DICOM preamble; needs pydicom), MP4/AVI/MOV/MKV (needs PyAV, whose wheels ship
FFmpeg's decoders), animated GIF and multi-page TIFF (Pillow), a sub-folder of frame images (in
natural name order), and loose frame images named `<video>_<frame>.png` (grouped as the training
loaders group them, common.data.VIDEO_REGEX). pydicom and PyAV: `pip install -r requirements-extras.txt`.

Grey levels. Frames are converted to 8-bit grey once, for the whole run with one mapping (a
per-frame mapping would change the brightness from frame to frame):
- DICOM with a window (WindowCenter/WindowWidth, top level or the shared functional groups):
  that window, by the file's VOILUTFunction (LINEAR by default, DICOM PS3.3 C.11.2.1.2), after
  its RescaleSlope/Intercept: what the angiography system displayed. Values outside the window
  saturate, as they did on its screen; the share of saturated pixels is printed and recorded in
  manifest.json. MONOCHROME1 (bright = low values) is inverted so that vessels stay dark.
- anything else wider than 8 bits (DICOM without a window, 16-bit TIFF, 16-bit frame folders):
  by the run's bit depth (common.data.to_8bit: the smallest of 8-16 bits that holds the run's
  largest value maps to 255; negative values by the run's own range): nothing is clipped.
- 8-bit colour (GIF palettes, MP4, RGB DICOM): ITU-R 601 luma (Pillow's L).

The rule (thresholds are flags; manifest.json records the values used and every decision):
1. Vesselness. Each frame, resized to MEASURE_SIZE px on its long side, gets the mean over its
   pixels of the scale-normalised ridge strength sigma^2 * max(lambda_1, 0) (lambda_1 the larger
   Hessian eigenvalue, which is large across a dark tube), the larger of RIDGE_SIGMAS. Contrast
   agent in the vessels raises it; the same measure on a run's frames forms its contrast curve,
   smoothed by a 3-frame median (a single noisy frame is not a contrast event).
2. Contrast span. The curve is scaled to [0, 1] between its lowest and highest value; the span
   runs from the first to the last frame at or above --contrast_level (default 0.3). Frames
   before it (contrast not arrived) and after it (washed out) are skipped; frames inside it are
   candidates, faint dips included (a washed-out stretch inside a run is a hard moment worth
   labelling). A curve whose range is below FLAT_RANGE of its peak shows no wash-in or wash-out:
   every frame is a candidate.
3. Heartbeat. D(L), the mean thumbnail distance (4.) of candidate frames L apart, grows with L
   (drift, contrast changes) and dips at each multiple of the heartbeat period P. D is fitted as
   a + b L + c (1 - cos(2 pi L / P)), c > 0, P searched in steps of PERIOD_STEP frames; a heartbeat
   is measured when the wave explains at least PERIOD_FIT of what a straight line leaves and its
   dip lies inside the lags seen (up to half the span: two beats are needed). Each frame then has
   a cardiac phase (t / P mod 1). No heartbeat measured, no phase: the frame distance stands in for
   it in 5. On 10 synthetic runs of 60 frames the measured P was within 0.25 frames of the
   generator's in 9 and not measured in 1.
4. Frame distance: the mean absolute grey difference (0-1) of two frames' THUMBNAIL x THUMBNAIL
   area-averaged thumbnails. Two frames closer than --min_distance (default 0.01, 1% of the grey
   range) are near-duplicates. On 10 synthetic runs of 60 frames (5th-95th percentile): pixel
   noise alone (frames before the contrast) 0.005-0.010, neighbours in the contrast plateau
   0.008-0.016, frames one heartbeat apart 0.009-0.021, half a heartbeat apart 0.014-0.031; a
   frame repeated (a run exported at twice its frame rate) 0.
5. Choice. The candidates are cut into --per_video equal time segments (spread over the run);
   from each, one frame: the one whose cardiac phase is farthest from the phases kept so far
   (without a phase: the one farthest in frame distance from the frames kept so far); the first
   segment starts from a phase (or position) drawn from --seed and the run's name. A frame closer
   than --min_distance to a kept frame is passed over for the segment's next best; a segment with
   no such frame gives none. Same seed, same frames.

Writes --out (built in a temporary folder and renamed when complete; an existing non-empty --out
is refused unless --overwrite): images/<video>_<frame>.png (8-bit grey, the frame index of the
source file; the training loaders read them as videos), manifest.json (per run: source, frames,
measured curve, span, period, grey mapping; per chosen frame: source file, frame index, time in
s when the file has one, why chosen), strips/<video>.png with --strips (every frame of the run,
the chosen ones framed, the contrast curve under them), and with --init drafts/<stem>.png: masks
predicted by that checkpoint through the forward path (common.evaluation.predict_probabilities),
for annotators to correct. Drafts are never ground truth: they live in drafts/ (loaders read
masks/ only), carry a DRAFT note in each PNG and in drafts/README.txt. Label masks/<same name>.png,
then train on --out.
"""
import argparse
import os
import re
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageSequence, PngImagePlugin
from scipy import ndimage
from skimage.feature import hessian_matrix, hessian_matrix_eigvals
from tqdm import tqdm

from common import cli
from common.data import (IMAGE_EXTENSIONS, VIDEO_REGEX, WIDE_MODES, DataError, file_names, open_image, parse_video,
                         read_image, to_8bit)
from common.files import RunError, atomic_folder, write_json

MOVIE_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".wmv", ".mpg", ".mpeg")
DICOM_EXTENSIONS = (".dcm", ".dicom")
STACK_EXTENSIONS = (".gif", ".tif", ".tiff")  # a .tif of one page is a loose frame
EXTRAS = "pip install -r requirements-extras.txt"
MEASURE_SIZE = 128  # px: long side of the frames the vesselness is measured on (fast, and noise averaged)
RIDGE_SIGMAS = (1.5, 3.0)  # px at MEASURE_SIZE: thin and thick vessels (1-4 px wide at 128 px)
THUMBNAIL = 32  # px: side of the thumbnails the frame distance compares (averages away pixel noise)
CONTRAST_LEVEL = 0.3  # share of the curve's range a frame needs to be inside the contrast span
FLAT_RANGE = 0.25  # curve range below this share of its peak: no wash-in/out measured, all frames candidates
MIN_DISTANCE = 0.01  # frame distance below which two frames are near-duplicates (1% of the grey range)
PERIOD_FIT = 0.8  # a heartbeat: the periodic wave explains this share of the lag-distance curve beyond a line
PERIOD_STEP = 0.05  # frames: resolution of the period search
DRAFT_NOTE = ("DRAFT mask predicted by a model ({checkpoint}), NOT ground truth: correct it, then save it as "
              "masks/<same name>.png")


@dataclass
class Run:
    """One cine run: 8-bit grey frames (T, H, W), their times in s (or None) and how they were read."""
    name: str
    source: str
    frames: np.ndarray = field(repr=False)
    times: list = None
    info: dict = field(default_factory=dict)
    sources: list = None  # a folder or loose frames: the file of each frame


# ----------------------------------------------------------------------------- finding and reading runs

def natural_key(name):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def is_dicom(path):
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def find_runs(root, skip=()):
    """[(name, kind, path or [frame paths])] of the runs under `root` (a folder, or one file), in name
    order; names are unique and safe as file names (common.data.file_names)."""
    if os.path.isfile(root):
        entries, root = [os.path.basename(root)], os.path.dirname(root) or "."
    elif os.path.isdir(root):
        entries = sorted(os.listdir(root), key=natural_key)
    else:
        raise DataError(f"{root}: no such file or folder")
    found, loose = [], {}
    for entry in entries:
        path = os.path.join(root, entry)
        stem, ext = os.path.splitext(entry)
        ext = ext.lower()
        if os.path.abspath(path) in skip or entry.startswith("."):
            continue
        if os.path.isdir(path):
            images = [f for f in sorted(os.listdir(path), key=natural_key) if f.lower().endswith(IMAGE_EXTENSIONS)]
            if images:
                found.append((entry, "folder", [os.path.join(path, f) for f in images]))
        elif ext in DICOM_EXTENSIONS or (ext not in IMAGE_EXTENSIONS + MOVIE_EXTENSIONS and is_dicom(path)):
            found.append((stem, "dicom", path))
        elif ext in MOVIE_EXTENSIONS:
            found.append((stem, "movie", path))
        elif ext in STACK_EXTENSIONS and page_count(path) > 1:
            found.append((stem, "stack", path))
        elif ext in IMAGE_EXTENSIONS + STACK_EXTENSIONS:  # a still frame of a video named <video>_<frame>
            video, frame = parse_video(stem, VIDEO_REGEX)
            loose.setdefault(video, []).append((frame, path))
    found += [(video, "frames", [p for _, p in sorted(paths)]) for video, paths in loose.items()]
    if not found:
        raise DataError(f"{root}: no cine runs (DICOM, {', '.join(MOVIE_EXTENSIONS[:2])}, GIF or TIFF stacks, folders "
                        f"of frames, or frames named <video>_<frame>{IMAGE_EXTENSIONS[0]})")
    # two runs of one name (run.gif and run.dcm) keep both: the second gets its format in its name
    counts = Counter(name for name, _, _ in found)
    keys = [name if counts[name] == 1 else f"{name}-{kind}" for name, kind, _ in found]
    names = file_names(keys)
    return [(names[key], kind, where) for key, (_, kind, where) in zip(keys, found)]


def page_count(path):
    with open_image(path) as im:
        return getattr(im, "n_frames", 1)


def read_run(name, kind, where):
    """The Run of one entry of find_runs; DataError naming the file when it cannot be read."""
    read = dict(dicom=read_dicom, movie=read_movie, stack=read_stack, folder=read_frame_files, frames=read_frame_files)
    return read[kind](name, where)


def grey(array):
    """2-D grey values of a decoded frame: wide single-channel kept as is, colour as ITU-R 601 luma."""
    if array.ndim == 2:
        return array
    return np.asarray(Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8)).convert("L"))


def run_to_8bit(frames, path):
    """uint8 frames of a whole run: 8-bit frames as they are, wider ones by the run's bit depth
    (common.data.to_8bit over the whole run, so every frame gets the same mapping)."""
    if frames.dtype == np.uint8:
        return frames, {"grey": "8-bit"}
    try:
        return to_8bit(frames), {"grey": f"{frames.dtype} by the run's bit depth (common.data.to_8bit)",
                                 "max_value": float(frames.max())}
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None


def read_stack(name, path):
    """Animated GIF or multi-page TIFF. GIF durations (ms) give the frame times."""
    with open_image(path, "image stack") as im:
        pages, durations = [], []
        for page in ImageSequence.Iterator(im):
            page.load()
            pages.append(np.asarray(page) if page.mode in WIDE_MODES else np.asarray(page.convert("L")))
            durations.append(page.info.get("duration"))
    if len({p.shape for p in pages}) > 1:
        raise DataError(f"{path}: pages of different sizes ({pages[0].shape} and others); not one run")
    frames, info = run_to_8bit(np.stack(pages), path)
    times = [0.0] + list(np.cumsum(durations[:-1]) / 1000.0) if all(durations) else None
    return Run(name, path, frames, times, dict(info, format="gif" if path.lower().endswith(".gif") else "tiff"))


def read_frame_files(name, paths):
    """A folder of frames, or loose frames of one video: one file per frame, in order."""
    arrays = []
    for path in paths:
        with open_image(path) as im:
            im.load()
            arrays.append(np.asarray(im) if im.mode in WIDE_MODES else np.asarray(im.convert("L")))
    if len({a.shape for a in arrays}) > 1:
        other = next(p for p, a in zip(paths, arrays) if a.shape != arrays[0].shape)
        raise DataError(f"{other}: {arrays[0].shape[::-1]} expected (the size of {paths[0]}), frames of one run "
                        f"must have one size")
    if len({a.dtype for a in arrays}) > 1:
        raise DataError(f"{paths[0]}: the frames of {os.path.dirname(paths[0])} mix 8-bit and wider files")
    frames, info = run_to_8bit(np.stack(arrays), paths[0])
    return Run(name, os.path.dirname(paths[0]) if len(paths) > 1 else paths[0], frames, None,
               dict(info, format="frames"), sources=list(paths))


def read_movie(name, path):
    """MP4/AVI/... decoded by PyAV (FFmpeg's own decoders in its wheel): luma of every frame, frame times."""
    try:
        import av
    except ImportError:
        raise DataError(f"{path}: reading {os.path.splitext(path)[1]} needs PyAV ({EXTRAS})") from None
    frames, times = [], []
    try:
        with av.open(path) as container:
            for frame in container.decode(video=0):
                # "gray": FFmpeg converts the luma of any pixel format (10-bit ones too) to 8 bits, scaling
                frames.append(frame.to_ndarray(format="gray"))
                times.append(float(frame.time) if frame.time is not None else None)
    except (av.error.FFmpegError, IndexError, ValueError) as e:
        raise DataError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from None
    if not frames:
        raise DataError(f"{path}: no video frames")
    times = [t - times[0] for t in times] if None not in times else None
    return Run(name, path, np.stack(frames), times, {"format": "movie", "grey": "8-bit luma"})


def dicom_window(ds):
    """(centre, width, function) of the file's first VOI window, or None."""
    sources = [ds]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and "FrameVOILUTSequence" in shared[0]:
        sources.append(shared[0].FrameVOILUTSequence[0])
    for item in sources:
        if "WindowCenter" in item and "WindowWidth" in item:
            return (first_value(item.WindowCenter), first_value(item.WindowWidth),
                    str(item.get("VOILUTFunction", "LINEAR")).upper())
    return None


def first_value(value):
    """A DICOM number that may hold several values (several windows): the first."""
    return float(value[0]) if isinstance(value, Sequence) and not isinstance(value, str) else float(value)


def apply_window(values, centre, width, function="LINEAR"):
    """(uint8, share of pixels saturated) of stored values through a DICOM VOI window (PS3.3
    C.11.2.1.2): LINEAR y = ((x - (c - 0.5)) / (w - 1) + 0.5), LINEAR_EXACT y = (x - c) / w + 0.5,
    SIGMOID y = 1 / (1 + exp(-4 (x - c) / w)), each clipped to [0, 1] and scaled to 0-255."""
    x = values.astype(np.float64)
    if function == "SIGMOID":
        y = 1 / (1 + np.exp(-4 * (x - centre) / width))
    elif function == "LINEAR_EXACT":
        y = (x - centre) / width + 0.5
    else:
        y = (x - (centre - 0.5)) / max(width - 1, 1) + 0.5
    saturated = float(np.mean((y < 0) | (y > 1)))
    return np.round(np.clip(y, 0, 1) * 255).astype(np.uint8), saturated


def read_dicom(name, path):
    """Multi-frame (or single-frame) DICOM through pydicom; grey levels as the module docstring says."""
    try:
        import pydicom
    except ImportError:
        raise DataError(f"{path}: reading DICOM needs pydicom ({EXTRAS})") from None
    try:
        ds = pydicom.dcmread(path)
        values = ds.pixel_array
    except Exception as e:  # pydicom raises many types for bad or undecodable files
        raise DataError(f"{path}: cannot read DICOM pixel data ({type(e).__name__}: {e})") from None
    frames_in_file = int(ds.get("NumberOfFrames", 1) or 1)
    colour = int(ds.get("SamplesPerPixel", 1)) > 1
    if frames_in_file == 1:
        values = values[None]
    if colour:
        frames, info = np.stack([grey(v) for v in values]), {"grey": "RGB as ITU-R 601 luma"}
    else:
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        if (slope, intercept) != (1.0, 0.0):
            values = values * slope + intercept
        window = dicom_window(ds)
        if window:
            frames, saturated = apply_window(values, *window)
            info = {"grey": f"the file's window: centre {window[0]:g}, width {window[1]:g} ({window[2]})",
                    "saturated": round(saturated, 6)}
        else:
            frames, info = run_to_8bit(values, path)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            frames, info["inverted"] = 255 - frames, "MONOCHROME1: bright = low values"
    return Run(name, path, frames, dicom_times(ds, len(frames)), dict(info, format="dicom",
                                                                       bits_stored=ds.get("BitsStored")))


def dicom_times(ds, count):
    """Frame times in s from FrameTime (ms), FrameTimeVector (ms since the previous frame) or a
    frame rate; None when the file gives none."""
    if ds.get("FrameTimeVector"):
        steps = [float(v) for v in ds.FrameTimeVector][:count]
        return list(np.cumsum([0.0] + steps[1:]) / 1000.0) if len(steps) == count else None
    for tag, to_ms in (("FrameTime", 1.0), ("RecommendedDisplayFrameRate", None), ("CineRate", None)):
        value = ds.get(tag)
        if value:
            ms = float(value) if to_ms else 1000.0 / float(value)
            return [i * ms / 1000.0 for i in range(count)]
    return None


# ----------------------------------------------------------------------------- measures

def measure_size(frames):
    """Frames (T, H, W) uint8 -> float32 in [0, 1], long side at most MEASURE_SIZE (area average)."""
    height, width = frames.shape[1:]
    scale = MEASURE_SIZE / max(height, width)
    if scale >= 1:
        return frames.astype(np.float32) / 255
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BOX), np.float32) for f in frames]) / 255


def vesselness(frames):
    """(T,) mean scale-normalised dark-ridge strength of each frame (rule step 1)."""
    curve = []
    for frame in measure_size(frames):
        best = np.zeros_like(frame)
        for sigma in RIDGE_SIGMAS:
            larger = hessian_matrix_eigvals(hessian_matrix(frame, sigma=sigma, order="rc",
                                                           use_gaussian_derivatives=False))[0]
            best = np.maximum(best, sigma ** 2 * larger)
        curve.append(float(best.mean()))
    return np.array(curve)


def contrast_span(curve, level=CONTRAST_LEVEL):
    """(first, last, levels (T,), flat) of a vesselness curve (rule step 2): levels scaled to [0, 1]
    after a 3-frame median; first..last the frames of the contrast span (all when flat)."""
    smooth = ndimage.median_filter(curve, size=3, mode="nearest") if len(curve) >= 3 else np.asarray(curve)
    low, high = float(smooth.min()), float(smooth.max())
    flat = high - low < FLAT_RANGE * max(abs(high), 1e-12)
    levels = (smooth - low) / (high - low) if high > low else np.ones_like(smooth)
    if flat:
        return 0, len(curve) - 1, levels, True
    inside = np.flatnonzero(levels >= level)
    return int(inside[0]), int(inside[-1]), levels, False


def thumbnails(frames):
    """(T, THUMBNAIL, THUMBNAIL) float32 in [0, 1]: area-averaged thumbnails (rule step 4)."""
    return np.stack([np.asarray(Image.fromarray(f).resize((THUMBNAIL, THUMBNAIL), Image.BOX), np.float32)
                     for f in frames]) / 255


def frame_distance(a, b):
    """Mean absolute grey difference (0-1) of two thumbnails."""
    return float(np.abs(a - b).mean())


def heartbeat_period(thumbs):
    """Heartbeat period in frames of a run's candidate thumbnails (rule step 3), or None.

    D(L), the mean distance of frames L apart, grows with L (drift, contrast changes) and dips at
    every multiple of the period. Fitted as a + b L + c (1 - cos(2 pi L / P)), c > 0, for P on a
    PERIOD_STEP grid from 3 to the largest lag less half a frame (the dip must be seen):
    the period is the best P when the wave explains at least PERIOD_FIT of what the straight line
    leaves and P is not the grid's end (a slow trend fits as a wave longer than the lags seen)."""
    lags = np.arange(1, len(thumbs) // 2 + 1)
    if len(lags) < 5:
        return None
    dist = np.array([np.abs(thumbs[lag:] - thumbs[:-lag]).mean() for lag in lags])
    line = np.stack([np.ones_like(dist), lags], axis=1)
    left = np.sum((line @ np.linalg.lstsq(line, dist, rcond=None)[0] - dist) ** 2)
    best, grid = None, np.arange(3, lags[-1] - 0.5 + 1e-9, PERIOD_STEP)
    for period in grid:
        model = np.concatenate([line, 1 - np.cos(2 * np.pi * lags / period)[:, None]], axis=1)
        coef = np.linalg.lstsq(model, dist, rcond=None)[0]
        residual = np.sum((model @ coef - dist) ** 2)
        if coef[2] > 0 and (best is None or residual < best[0]):
            best = (residual, float(period))
    if best is None or left <= 0 or 1 - best[0] / left < PERIOD_FIT or best[1] >= grid[-1] - PERIOD_STEP / 2:
        return None  # no wave, or one that wants a period beyond the lags seen (a trend, not a beat)
    return best[1]


def circular(a, b):
    """Distance of two phases in [0, 1) on the circle."""
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


def choose_frames(thumbs, candidates, per_video, period, min_distance, rng):
    """(kept, passed_over) of one run (rule step 5). kept: [dict(frame, segment, phase, why)];
    passed_over: [dict(frame, near, distance)] for frames skipped as near-duplicates of a kept one."""
    segments = [s for s in np.array_split(np.asarray(candidates), min(per_video, len(candidates))) if len(s)]
    start = float(rng.random())  # the first segment's phase (or position): the seed's only say
    kept, passed_over = [], []
    for k, segment in enumerate(segments):
        span = f"segment {k + 1}/{len(segments)} (frames {segment[0]}-{segment[-1]})"
        if period:
            phases = {int(t): (t / period) % 1.0 for t in segment}
            score = {t: (-circular(p, start) if not kept else min(circular(p, q["phase"]) for q in kept))
                     for t, p in phases.items()}
        else:
            phases = {}
            score = {int(t): (-abs((t - segment[0]) / max(len(segment) - 1, 1) - start) if not kept else
                              min(frame_distance(thumbs[t], thumbs[q["frame"]]) for q in kept)) for t in segment}
        for t in sorted(score, key=lambda t: (-score[t], t)):
            near = [(frame_distance(thumbs[t], thumbs[q["frame"]]), q["frame"]) for q in kept]
            closest = min(near) if near else (np.inf, None)
            if closest[0] < min_distance:
                passed_over.append(dict(frame=t, near=closest[1], distance=round(closest[0], 5)))
                continue
            if period:
                why = (f"{span}: cardiac phase {phases[t]:.2f}, " +
                       ("the one nearest the seed's phase" if not kept else
                        f"{score[t]:.2f} of a beat from the nearest phase kept"))
            else:
                why = f"{span}: " + ("at the seed's position" if not kept else
                                     f"farthest from the frames kept (distance {score[t]:.4f})")
            kept.append(dict(frame=t, segment=k + 1, phase=round(phases[t], 4) if period else None, why=why))
            break
    return kept, passed_over


def sample_run(run, per_video, contrast_level, min_distance, seed):
    """The frames chosen in one run and every measurement behind the choice (a manifest entry)."""
    curve = vesselness(run.frames)
    first, last, levels, flat = contrast_span(curve, contrast_level)
    thumbs = thumbnails(run.frames)
    candidates = list(range(first, last + 1))
    period = heartbeat_period(thumbs[first:last + 1])
    rng = np.random.default_rng([seed, zlib.crc32(run.name.encode())])  # per run: independent of the other runs
    kept, passed_over = choose_frames(thumbs, candidates, per_video, period, min_distance, rng)
    kept.sort(key=lambda k: k["frame"])
    for k in kept:
        k["level"] = round(float(levels[k["frame"]]), 4)
        k["time"] = None if run.times is None else round(float(run.times[k["frame"]]), 4)
    frame_s = np.median(np.diff(run.times)) if run.times and len(run.times) > 1 else None
    return dict(
        video=run.name, source=run.source, frames=len(run.frames), size=list(run.frames.shape[1:][::-1]), **run.info,
        vesselness=[round(float(v), 6) for v in curve], contrast_level=[round(float(v), 4) for v in levels],
        flat=flat, span=[first, last], before_contrast=list(range(0, first)),
        washed_out=list(range(last + 1, len(run.frames))),
        period_frames=round(period, 3) if period else None,
        heart_rate_bpm=round(60 / (period * frame_s), 1) if period and frame_s else None,
        chosen=kept, near_duplicates=passed_over)


# ----------------------------------------------------------------------------- pictures and drafts

def contact_strip(run, entry, path, level, per_row=16, size=56, curve_height=44):
    """Every frame of the run as a thumbnail, PER_ROW a row, each row over its stretch of the measured
    contrast curve: frames outside the contrast span dimmed, chosen frames framed in yellow, frames
    passed over as near-duplicates in red, the --contrast_level line dashed."""
    count = len(run.frames)
    rows = -(-count // per_row)
    row_height = size + curve_height + 4
    strip = Image.new("RGB", (per_row * size, 16 + rows * row_height), (24, 24, 24))
    draw = ImageDraw.Draw(strip)
    first, last = entry["span"]
    period = f"heartbeat {entry['period_frames']:.1f} frames" if entry["period_frames"] else "no heartbeat measured"
    draw.text((4, 2), f"{entry['video']}: {count} frames, contrast span {first}-{last} (bright), {period}; chosen "
                      f"(yellow) {len(entry['chosen'])}, near-duplicates passed over (red) "
                      f"{len(entry['near_duplicates'])}", fill=(230, 230, 230))
    chosen = {k["frame"] for k in entry["chosen"]}
    passed = {k["frame"] for k in entry["near_duplicates"]} - chosen
    levels = entry["contrast_level"]

    def place(t):
        """(x, top of the tile, top and bottom of the curve) of frame t."""
        x, y0 = (t % per_row) * size, 16 + (t // per_row) * row_height
        return x, y0, y0 + size + 4, y0 + size + curve_height - 2

    for t, frame in enumerate(run.frames):  # tiles and the span's background first, lines over them
        x, y0, top, bottom = place(t)
        tile = Image.fromarray(frame).resize((size, size), Image.BOX).convert("RGB")
        strip.paste(tile if first <= t <= last else Image.eval(tile, lambda v: v // 3), (x, y0))
        if first <= t <= last:
            draw.rectangle([x, top - 2, x + size - 1, bottom + 1], fill=(40, 56, 40))
    for t in range(count):
        x, y0, top, bottom = place(t)
        y_of = lambda v: bottom - v * (bottom - top)  # noqa: E731
        draw.line([x, y_of(level), x + size // 2, y_of(level)], fill=(110, 110, 110))
        if t + 1 < count and (t + 1) % per_row:
            draw.line([x + size / 2, y_of(levels[t]), x + 1.5 * size, y_of(levels[t + 1])], fill=(90, 200, 255), width=2)
        if t in chosen or t in passed:
            draw.rectangle([x, y0, x + size - 1, y0 + size - 1], outline=(255, 215, 0) if t in chosen else (230, 60, 60),
                           width=3)
        if t in chosen:
            cx, cy = x + size / 2, y_of(levels[t])
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=(255, 215, 0))
        draw.text((x + 3, y0 + 2), str(t), fill=(255, 215, 0) if t in chosen else (200, 200, 200))
    strip.save(path, optimize=True)


def write_drafts(out, stems, args):
    """drafts/<stem>.png: masks of the frames predicted by --init through the forward path, each
    marked DRAFT (a PNG text chunk, and drafts/README.txt)."""
    import torch

    from common.evaluation import predict_probabilities
    from common.forward import move_batch
    from common.lora import read_stage_meta

    base = args.model or read_stage_meta(args.init).get("base_model") or "tiny"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # as evaluate.py --predict_only: the same masks
    model, processor, autocast = cli.load_for_inference(args, args.init, device, bf16_weights=args.bf16, base=base)
    os.makedirs(os.path.join(out, "drafts"))
    note = DRAFT_NOTE.format(checkpoint=args.init)
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", note)
    pixels = 0
    for start in tqdm(range(0, len(stems), args.batch_size), desc="draft masks", leave=False):
        batch = [dict(image=read_image(os.path.join(out, "images", f"{s}.png")), key=s)
                 for s in stems[start:start + args.batch_size]]
        probabilities = predict_probabilities(model, move_batch(processor(batch), device), autocast=autocast)
        for sample, probs in zip(batch, probabilities):
            mask = (probs.float().cpu().numpy() > args.threshold).astype(np.uint8) * 255
            pixels += int(mask.astype(bool).sum())
            Image.fromarray(mask).save(os.path.join(out, "drafts", f"{sample['key']}.png"), pnginfo=info)
    with open(os.path.join(out, "drafts", "README.txt"), "w") as f:
        f.write(f"{note}\nbase model: {base}\nthreshold: {args.threshold}\n"
                f"These files are predictions for annotators to start from. The training scripts read masks/ only.\n")
    return dict(checkpoint=args.init, base_model=base, threshold=args.threshold, frames=len(stems),
                vessel_pixels=pixels, note=note)


# ----------------------------------------------------------------------------- command line

def build_parser():
    p = argparse.ArgumentParser(prog="python -m common.frames", description=__doc__.split("\n")[0],
                                epilog="The rule, its thresholds and the outputs: README 'From videos to frames', or "
                                       "this module's docstring (common/frames.py).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--videos", required=True,
                   help="folder of cine runs (DICOM, MP4/AVI/MOV/MKV, GIF, multi-page TIFF, a sub-folder of frames "
                        "each, or frames named <video>_<frame>.png), or one such file")
    p.add_argument("--out", required=True, help="data folder to write (images/, manifest.json; drafts/ with --init); "
                                                "must not exist or be empty, unless --overwrite")
    p.add_argument("--per_video", type=int, default=20, help="at most this many frames per run")
    p.add_argument("--contrast_level", type=float, default=CONTRAST_LEVEL,
                   help="share of a run's vesselness range (0-1) a frame needs to be inside the contrast span; "
                        "frames before the span (no contrast yet) and after it (washed out) are skipped")
    p.add_argument("--min_distance", type=float, default=MIN_DISTANCE,
                   help=f"two kept frames differ by at least this mean absolute grey difference (0-1) of their "
                        f"{THUMBNAIL}x{THUMBNAIL} thumbnails; closer ones are near-duplicates")
    p.add_argument("--seed", type=int, default=0, help="seed of the first choice in each run; same seed, same frames")
    p.add_argument("--strips", action="store_true",
                   help="also write strips/<video>.png: every frame, the chosen ones framed, the contrast curve")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    g = p.add_argument_group("draft masks (for annotators; never ground truth)")
    g.add_argument("--init", default=None, help="stage checkpoint whose predicted masks are written to drafts/")
    g.add_argument("--model", default=None, help="base model of --init (default: the base_model its stage.json names)")
    g.add_argument("--threshold", type=float, default=0.5, help="probability threshold of a draft's vessel pixel")
    g.add_argument("--batch_size", type=int, default=8, help="frames per forward pass of the drafts")
    g.add_argument("--bf16", action="store_true",
                   help="drafts with bf16 weights (autocast on a GPU), as evaluate.py --predict_only --bf16")
    return p


def parse_args(argv=None):
    return cli.parse(build_parser(), argv)


def describe_run(entry):
    """One line on what was chosen in a run and why the others were not."""
    first, last = entry["span"]
    return (f"{entry['video']}: {len(entry['chosen'])} of {entry['frames']} frames (contrast span {first}-{last}"
            + (", flat: no wash-in/out measured" if entry["flat"] else "")
            + (f"; heartbeat {entry['period_frames']:.1f} frames" if entry["period_frames"] else "; no heartbeat measured")
            + f"; {len(entry['near_duplicates'])} near-duplicates passed over"
            + (f"; {entry['saturated']:.1%} of pixels outside the file's window" if entry.get("saturated") else "") + ")")


def check_out(out, overwrite, videos):
    """Refuse a non-empty --out without --overwrite, and an --out that holds the videos (--overwrite
    would delete them)."""
    out = os.path.abspath(out)
    if os.path.commonpath([out, os.path.abspath(videos)]) == out:
        raise RunError(f"{out}: holds the videos (--videos {videos}); write the frames somewhere else")
    if os.path.isfile(out):
        raise RunError(f"{out}: is a file; --out must be a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise RunError(f"{out}: exists and is not empty; pass --overwrite to replace it, or pick another --out")
    return out


def main(args):
    start = time.time()
    if args.init:  # before any work: a wrong checkpoint is named now, not after every run is sampled
        from common.lora import read_stage_meta
        read_stage_meta(args.init)
    runs = find_runs(args.videos, skip={os.path.abspath(args.out)})
    out = check_out(args.out, args.overwrite, args.videos)
    with atomic_folder(out, overwrite=args.overwrite) as tmp:  # a race lost keeps tmp, and says where it is
        os.makedirs(os.path.join(tmp, "images"))
        if args.strips:
            os.makedirs(os.path.join(tmp, "strips"))
        rule = dict(per_video=args.per_video, contrast_level=args.contrast_level, min_distance=args.min_distance,
                    seed=args.seed, measure_size=MEASURE_SIZE, ridge_sigmas=list(RIDGE_SIGMAS), thumbnail=THUMBNAIL,
                    flat_range=FLAT_RANGE, period_fit=PERIOD_FIT)
        entries, frames = [], []
        for name, kind, where in tqdm(runs, desc="sampling runs", disable=len(runs) < 2):
            run = read_run(name, kind, where)
            entry = sample_run(run, args.per_video, args.contrast_level, args.min_distance, args.seed)
            width = max(4, len(str(len(run.frames) - 1)))
            for k in entry["chosen"]:
                image = f"images/{name}_{k['frame']:0{width}d}.png"
                Image.fromarray(run.frames[k["frame"]]).save(os.path.join(tmp, image))
                source = run.sources[k["frame"]] if run.sources else run.source
                frames.append(dict(image=image, video=name, source=source, frame=k["frame"], time=k["time"],
                                   why=k["why"]))
            if args.strips:
                contact_strip(run, entry, os.path.join(tmp, "strips", f"{name}.png"), args.contrast_level)
            entries.append(entry)
            tqdm.write(describe_run(entry))
        drafts = write_drafts(tmp, [os.path.splitext(os.path.basename(f["image"]))[0] for f in frames], args) \
            if args.init else None
        write_json(os.path.join(tmp, "manifest.json"), dict(
            generator="common.frames", videos_folder=os.path.abspath(args.videos), rule=rule, drafts=drafts,
            frames=frames, runs=entries))
        if os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)  # an empty --out holds no one's result
    print(f"wrote {len(frames)} frames of {len(entries)} runs to {out} (images/, manifest.json"
          f"{', strips/' if args.strips else ''}{', drafts/ (DRAFT masks, not ground truth)' if drafts else ''}) in "
          f"{time.time() - start:.1f} s; label masks/<same name>.png, then train on {out}")
    return out


if __name__ == "__main__":
    cli.run_main(main, parse_args)
