"""Synthetic X-ray angiography videos with exact vessel masks: the embedded default data.

Every video is one branching, tapering vessel tree (a main vessel entering from an
image edge, 2-3 levels of branches, smooth curved centerlines) drawn dark on a
bright textured background (smooth low-frequency structure, grain noise,
vignetting). The tree beats: a periodic contraction and warp plus a slight global
translation move it from frame to frame, so neighbouring frames are
near-duplicates. Any train/val split of this data must therefore be made by
video, never by frame, or validation frames leak into training.

Contrast washes in over the first frames, and every video has one or two
stretches of 2-4 consecutive frames where the vessel contrast drops to 15-30% of
normal (often with extra blur and noise). Those stretches are the temporal hard
clusters that hard-sample mining should find; `synth_meta.json` records the
per-frame contrast and the stretches, so tests and benchmarks know where they are.
The mask is always the full vessel geometry: a faint vessel is still a vessel.

`write_cines` (`--cine gif|tiff|dicom|mp4|avi`) writes whole injections instead, one cine file
per video and no masks: frames without contrast before the bolus arrives and after it has washed
out (`bolus_curve`), the input `python -m common.frames` samples training frames from.

Image and mask come from one distance field: the mask is exactly
distance-to-centerline < radius, the image darkens with the X-ray path length
through that same cylinder. Everything is drawn from one seed; the same
arguments give byte-identical files.

    python -m common.synth --out data/synth --videos 8 --frames 12 --size 128 --seed 0
    python -m common.synth --out cines --videos 2 --frames 48 --cine dicom --bits 12
"""

import argparse
import json
import os
import shutil
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import draw, measure

SYNTH_VERSION = 2  # bump when the generator's output changes, so old folders are not reused
BASE_SIZE = 128  # all lengths and widths below are for a 128 px image and scale with size
SAMPLE_STEP = 0.35  # px between centerline samples; < 0.5 so every pixel the curve crosses gets one
ROOT_RADIUS = (2.0, 3.0)  # px at the root: 4-6 px wide
TIP_RADIUS = (0.75, 1.0)  # px at the tips: 1.5-2 px wide
MIN_RADIUS = 0.7  # px, absolute: thinner than this the 0/1 mask breaks into dots
CHILDREN = ((2, 3), (2, 3), (1, 2))  # inclusive range of branches per vessel, by level
VESSEL_FRACTION = (0.05, 0.15)  # of the image; trees mostly outside the frame are redrawn
ATTENUATION = 0.3  # per px of vessel path at full contrast (for 128 px): thick ~80%, thin ~25% darker
HARD_CONTRAST = 0.35  # frames below this contrast belong to a washed-out stretch
PROMPT = "blood vessel"


# ----------------------------------------------------------------------------- geometry

def _grow_vessel(rng, start, heading, length, r_start, r_end, scale, curl=0.07):
    """Centerline samples (n, 2) as (x, y), radii (n,) and headings (n,) of one smooth vessel;
    curl: heading random-walk strength, radians per sqrt(px) of a 128 px image."""
    n = max(int(np.ceil(length / SAMPLE_STEP)), 2)
    # A random walk of the heading, smoothed over ~10 px, bends like a vessel instead of jittering.
    turns = rng.normal(0.0, curl * np.sqrt(SAMPLE_STEP / scale), n)
    headings = heading + ndimage.gaussian_filter1d(np.cumsum(turns), 10 * scale / SAMPLE_STEP)
    steps = SAMPLE_STEP * np.stack([np.cos(headings), np.sin(headings)], axis=1)
    points = start + np.concatenate([[[0.0, 0.0]], np.cumsum(steps[:-1], axis=0)])
    radii = r_start + (r_end - r_start) * np.linspace(0.0, 1.0, n) ** 0.8
    return points, np.maximum(radii, MIN_RADIUS), headings


def _vessel_tree(rng, size):
    """A list of (points, radii, level) for one tree; level 0 is the main vessel."""
    scale = size / BASE_SIZE
    edge = rng.integers(4)
    along = rng.uniform(0.2, 0.8) * size
    # Start just outside the frame so the vessel enters from the edge rather than appearing in it.
    start = [(along, -2.0), (size + 2.0, along), (along, size + 2.0), (-2.0, along)][edge]
    start = np.array(start)
    to_centre = np.arctan2(size / 2 - start[1], size / 2 - start[0])
    depth = int(rng.integers(2, 4))
    r_root = rng.uniform(*ROOT_RADIUS) * scale
    root = _grow_vessel(rng, start, to_centre + rng.normal(0, 0.3),
                        rng.uniform(0.85, 1.1) * size, r_root, 0.55 * r_root, scale,
                        curl=0.04)  # a straighter main vessel crosses the frame instead of leaving it

    tree = []
    todo = [(root, 0)]
    while todo:
        (points, radii, headings), level = todo.pop(0)
        tree.append((points, radii, level))
        if level == depth:
            continue
        n_children = int(rng.integers(CHILDREN[level][0], CHILDREN[level][1] + 1))
        where = np.sort(rng.uniform(0.12, 0.8, n_children))
        for fraction in where:
            i = int(fraction * (len(points) - 1))
            # Mostly branch towards the middle of the frame, or most of the tree leaves it.
            to_centre = np.arctan2(size / 2 - points[i, 1], size / 2 - points[i, 0])
            inward = 1 if np.sin(to_centre - headings[i]) > 0 else -1
            side = inward if rng.random() < 0.7 else -inward
            r_start = max(0.75 * radii[i], MIN_RADIUS)
            r_tip = rng.uniform(*TIP_RADIUS) * scale
            r_end = r_tip if level + 1 == depth else max(0.6 * r_start, r_tip)
            length = rng.uniform(0.35, 0.6) * size * 0.75 ** level
            heading = headings[i] + side * rng.uniform(0.5, 1.1)
            todo.append((_grow_vessel(rng, points[i], heading, length, r_start, r_end, scale),
                         level + 1))
    return tree


def _motion(rng, size):
    """Per-video parameters of the heartbeat deformation."""
    scale = size / BASE_SIZE
    return {
        "period": rng.uniform(8.0, 12.0),  # frames per beat
        "phase": rng.uniform(0, 2 * np.pi),
        "centre": size / 2 + rng.normal(0, 0.15 * size, 2),
        "contraction": rng.uniform(0.03, 0.05),  # fraction of the distance to the centre
        "warp": rng.uniform(0.8, 1.5) * scale,  # px
        "warp_freq": rng.uniform(0.5, 1.5, 2) * 2 * np.pi / size,
        "warp_phase": rng.uniform(0, 2 * np.pi, 2),
        "shake": rng.normal(0, 1.0 * scale, 2),  # px, periodic global translation
        "drift": rng.normal(0, 0.15 * scale, 2),  # px per frame, slow patient/table motion
    }


def _deform(points, frame, motion):
    """Move centerline points (n, 2) to where they are at `frame` of the heartbeat."""
    phase = 2 * np.pi * frame / motion["period"] + motion["phase"]
    beat = 0.5 * (1 - np.cos(phase))
    centre = motion["centre"]
    moved = centre + (points - centre) * (1 - motion["contraction"] * beat)
    fx, fy = motion["warp_freq"]
    px, py = motion["warp_phase"]
    moved[:, 0] += motion["warp"] * np.sin(phase + fy * points[:, 1] + px)
    moved[:, 1] += motion["warp"] * np.sin(phase + fx * points[:, 0] + py)
    return moved + motion["shake"] * np.sin(phase + 1.0) + motion["drift"] * frame


def _render(vessels, size):
    """Exact mask (bool) and X-ray path length in px (float) of (points, radii, level) vessels.
    Vessels of one level share a distance transform; levels are drawn separately so a thin
    branch never claims (and narrows) the pixels of the thicker vessel it leaves."""
    mask = np.zeros((size, size), bool)
    path = np.zeros((size, size), np.float32)
    rows, cols = np.mgrid[0:size, 0:size]
    for level in sorted({level for _, _, level in vessels}):
        group = [(p, r) for p, r, lvl in vessels if lvl == level]
        points = np.concatenate([p for p, _ in group])
        radii = np.concatenate([r for _, r in group])
        lengths = [len(p) for p, _ in group]
        first = np.repeat(np.cumsum([0] + lengths[:-1]), lengths)
        last = np.repeat(np.cumsum(lengths) - 1, lengths)

        # Rasterise samples on a padded canvas so vessels just outside the frame still count.
        pad = int(np.ceil(radii.max())) + 2
        shape = (size + 2 * pad, size + 2 * pad)
        ij = np.rint(points[:, ::-1]).astype(int) + pad
        keep = np.all((ij >= 0) & (ij < shape[0]), axis=1)
        if not keep.any():
            continue
        sample_at = np.full(shape, -1)
        sample_at[ij[keep, 0], ij[keep, 1]] = np.flatnonzero(keep)
        near_dist, (ni, nj) = ndimage.distance_transform_edt(sample_at < 0, return_indices=True)
        inner = (slice(pad, pad + size), slice(pad, pad + size))
        seed = sample_at[ni[inner], nj[inner]]

        # The nearest rasterised sample is off by up to ~1 px; refine against its neighbours
        # along the same vessel, only where a vessel can be.
        near = near_dist[inner] < radii.max() + 2
        seed = seed[near]
        best = np.full(seed.shape, np.inf)
        best_radius = np.zeros(seed.shape)
        reach = int(np.ceil(3.0 / SAMPLE_STEP))
        for offset in range(-reach, reach + 1):
            k = np.clip(seed + offset, first[seed], last[seed])
            d = np.hypot(cols[near] - points[k, 0], rows[near] - points[k, 1])
            better = d < best
            best = np.where(better, d, best)
            best_radius = np.where(better, radii[k], best_radius)
        mask[near] |= best < best_radius
        chord = 2 * np.sqrt(np.maximum(best_radius ** 2 - best ** 2, 0.0))
        path[near] = np.maximum(path[near], chord)
    return mask, path


# ----------------------------------------------------------------------------- appearance

def _smooth_noise(rng, size, sigma):
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return field / (field.std() + 1e-8)


def _background(rng, size):
    """Static per-video background in [0, 1]: soft anatomy, mottle and vignetting."""
    scale = size / BASE_SIZE
    yy, xx = np.mgrid[0:size, 0:size] / size
    level = rng.uniform(0.55, 0.7)
    texture = 0.06 * _smooth_noise(rng, size, 12 * scale) + 0.025 * _smooth_noise(rng, size, 3 * scale)
    # A soft edge across the frame, like the diaphragm or the heart's shadow.
    angle = rng.uniform(0, 2 * np.pi)
    across = (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle) - rng.uniform(-0.3, 0.3)
    shadow = -rng.uniform(0.05, 0.12) / (1 + np.exp(-across / 0.08))
    corner = np.hypot(xx - 0.5, yy - 0.5) / np.sqrt(0.5)
    vignette = 1 - rng.uniform(0.25, 0.4) * corner ** 2
    return (level + texture + shadow) * vignette


def _contrast_curve(rng, num_frames):
    """Per-frame vessel contrast: wash-in, then ~1 with one or two stretches near 0.15-0.3."""
    contrast = np.clip(1 + 0.05 * rng.standard_normal(num_frames), 0.85, 1.1)
    ramp = min(3, num_frames // 4)
    contrast[:ramp] = np.linspace(rng.uniform(0.45, 0.6), 1.0, ramp + 1)[:-1]
    hard = np.zeros(num_frames, bool)
    n_stretches = 0 if num_frames < 2 else 1 if num_frames < 10 else int(rng.integers(1, 3))
    for _ in range(n_stretches):
        # Leave a normal frame in short videos; two frames are the shortest stretch.
        length = min(int(rng.integers(2, 5)), max(num_frames - 1, 2))
        # Keep a normal frame between stretches so each one is a separate hard cluster.
        starts = [s for s in range(ramp, num_frames - length + 1)
                  if not hard[max(s - 1, 0):s + length + 1].any()]
        if not starts and not hard.any():
            starts = list(range(num_frames - length + 1))  # too short for the ramp: overlap it
        if not starts:
            break
        start = int(rng.choice(starts))
        hard[start:start + length] = True
    contrast[hard] = rng.uniform(0.15, 0.3, hard.sum())
    return contrast, hard


def bolus_curve(num_frames, arrival=0.2, peak=0.35, washout=0.6, gone=0.8):
    """Per-frame vessel contrast of one injection, as a whole cine run records it: 0 until
    `arrival`, a smooth (half-cosine) wash-in to 1 at `peak`, 1 until `washout`, a smooth wash-out
    to 0 at `gone`, 0 after; the four times are fractions of the run."""
    t = np.arange(num_frames) / max(num_frames - 1, 1)
    rise = np.clip((t - arrival) / (peak - arrival), 0, 1)
    fall = np.clip((gone - t) / (gone - washout), 0, 1)
    return 0.5 - 0.5 * np.cos(np.pi * np.minimum(rise, fall))


def make_video(rng: np.random.Generator, num_frames: int, size: int, contrast=None, info=None):
    """One synthetic angiography video: (images, masks, contrast), `num_frames` uint8 (size, size, 3)
    images, bool (size, size) masks and the per-frame vessel contrast (1 = normal, < HARD_CONTRAST =
    washed out). The mask is the full vessel geometry whatever the contrast.
    `contrast`: the per-frame contrast to draw with (e.g. `bolus_curve`: frames before the
    injection show no vessel) instead of the default wash-in with washed-out stretches.
    `info`: a dict that gets the heartbeat period in frames (`period`), to check measurements against."""
    scale = size / BASE_SIZE
    for _ in range(20):
        tree = _vessel_tree(rng, size)
        fraction = _render(tree, size)[0].mean()
        if VESSEL_FRACTION[0] <= fraction <= VESSEL_FRACTION[1]:
            break
    motion = _motion(rng, size)
    if info is not None:
        info["period"] = float(motion["period"])
    background = _background(rng, size)
    if contrast is None:
        contrast, hard = _contrast_curve(rng, num_frames)
    else:  # a given curve has no washed-out stretches to blur: its low frames are simply faint
        contrast, hard = np.asarray(contrast, dtype=float), np.zeros(num_frames, bool)
    grain = rng.uniform(0.015, 0.025)

    images, masks = [], []
    for frame in range(num_frames):
        moved = [(_deform(points, frame, motion), radii, level) for points, radii, level in tree]
        mask, path = _render(moved, size)
        # The detector's blur softens the vessel edges the mask keeps sharp.
        path = ndimage.gaussian_filter(path, 0.6 * scale)
        image = background * np.exp(-ATTENUATION / scale * contrast[frame] * path)

        blur, noise = 0.0, grain
        if hard[frame] and rng.random() < 0.5:
            blur, noise = rng.uniform(0.8, 1.5) * scale, grain * rng.uniform(1.5, 2.5)
        elif rng.random() < 0.12:
            blur = rng.uniform(0.6, 1.2) * scale
        elif rng.random() < 0.12:
            noise = grain * 2
        if blur:
            image = ndimage.gaussian_filter(image, blur)
        image = image + noise * rng.standard_normal((size, size))

        gray = np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)
        images.append(np.repeat(gray[:, :, None], 3, axis=2))
        masks.append(mask)
    return images, masks, [float(c) for c in contrast]


# ----------------------------------------------------------------------------- files

def _cut_loops_open(mask):
    """Copy of `mask` with a 1 px slit from every hole to the outside. Crossing vessels enclose
    background; an outline polygon of such a ring would fill the enclosed area. A slit turns every
    ring into a simple outline for a few pixels."""
    mask = mask.copy()
    for _ in range(mask.size):  # each pass opens at least one hole; the bound only guards
        filled = ndimage.binary_fill_holes(mask)
        holes, n_holes = ndimage.label(filled & ~mask)
        if n_holes == 0:
            return mask
        to_outside, (oi, oj) = ndimage.distance_transform_edt(filled, return_indices=True)
        for r0, c0 in ndimage.minimum_position(to_outside, holes, range(1, n_holes + 1)):
            rr, cc = draw.line(r0, c0, oi[r0, c0], oj[r0, c0])
            mask[rr, cc] = False
            # Also clear the corner of each diagonal step: the outside must reach the hole
            # through 4-connected background, or the 8-connected vessel ring stays closed.
            mask[rr[1:], cc[:-1]] = False
    raise AssertionError("holes did not open")


def mask_polygons(mask):
    """Outline polygons of the mask's connected components, each flat [x1, y1, x2, y2, ...]:
    an approximation of the raster mask, in the COCO / Sa2VA convention the official loader
    rasterises with pycocotools: pixel (row i, column j) covers [j, j+1) x [i, i+1), so its
    centre is at (j + 0.5, i + 0.5) and coordinates run from 0 to size. Vertices lie on the 0.5
    level between pixel centres and cut corners diagonally; loops where vessels cross are cut
    open by a 1 px slit so that no polygon encloses background."""
    # The pad gives every component an outside, also where the vessels reach the image border.
    outlined = _cut_loops_open(np.pad(mask, 1))
    contours = measure.find_contours(outlined.astype(float), 0.5, fully_connected="high")
    polygons = []
    for contour in contours:
        contour = contour[:-1] - 1 + 0.5  # closed contours repeat their first point; undo the pad; COCO centres
        if len(contour) >= 3:
            polygons.append(np.round(contour[:, ::-1], 2).ravel().tolist())
    return polygons


def _hard_stretches(contrast):
    """[first, last] frame index (inclusive) of each run of frames below HARD_CONTRAST."""
    low = np.concatenate([[False], np.asarray(contrast) < HARD_CONTRAST, [False]])
    edges = np.flatnonzero(np.diff(low.astype(int)))
    return [[int(a), int(b) - 1] for a, b in zip(edges[::2], edges[1::2])]


def _reuse_existing(out_dir, args, meta_name="synth_meta.json"):
    meta_file = out_dir / meta_name
    if not meta_file.is_file():
        raise FileExistsError(f"{out_dir} exists but has no {meta_name}; "
                              "it is not a finished synthetic dataset, remove it or pick another --out")
    found = json.loads(meta_file.read_text())["args"]
    if found != args:
        diff = ", ".join(f"{k}: {found.get(k)!r} there, {v!r} asked"
                         for k, v in args.items() if found.get(k) != v)
        raise ValueError(f"{out_dir} holds a synthetic dataset made with other arguments ({diff}); "
                         "remove it or pick another --out")
    return out_dir


def write_dataset(out_dir, num_videos=8, frames_per_video=12, size=128, seed=0, fmt="masks"):
    """Write the synthetic dataset to `out_dir` and return its path.
    fmt="masks": images/<video>_<frame:03d>.png (RGB) and masks/<same name> (0/255).
    fmt="annotations": images/ plus annotations.json, a list of
    {"image": name, "mask": [polygon, ...], "text": ["blood vessel"]} whose polygons are the
    outer contours of the mask (see mask_polygons: an approximation of the raster mask).
    Both write synth_meta.json: the arguments, and per video its frames, contrast and
    washed-out stretches.

    Everything is written to `<out_dir>.tmp` and renamed at the end, so a folder at `out_dir`
    is always complete. An existing `out_dir` made with the same arguments is returned as is;
    one made with other arguments raises ValueError. Not safe for concurrent writers to the
    same `out_dir`: call it on one rank and wait for it on the others."""
    if fmt not in ("masks", "annotations"):
        raise ValueError(f"fmt must be 'masks' or 'annotations', not {fmt!r}")
    if min(num_videos, frames_per_video, size) < 1:
        raise ValueError("num_videos, frames_per_video and size must be positive")
    out_dir = Path(out_dir)
    args = {"version": SYNTH_VERSION, "num_videos": int(num_videos),
            "frames_per_video": int(frames_per_video), "size": int(size), "seed": int(seed),
            "fmt": fmt}
    if out_dir.exists():
        return _reuse_existing(out_dir, args)

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    (tmp / "images").mkdir(parents=True)
    if fmt == "masks":
        (tmp / "masks").mkdir()

    # One child seed per video: video k is the same whatever num_videos is.
    video_rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(num_videos)]
    width = max(2, len(str(num_videos - 1)))
    videos, annotations = [], []
    for v, rng in enumerate(video_rngs):
        video = f"vid{v:0{width}d}"
        images, masks, contrast = make_video(rng, frames_per_video, size)
        names = [f"{video}_{f:03d}.png" for f in range(frames_per_video)]
        for name, image, mask in zip(names, images, masks):
            Image.fromarray(image).save(tmp / "images" / name)
            if fmt == "masks":
                Image.fromarray(mask.astype(np.uint8) * 255).save(tmp / "masks" / name)
            else:
                annotations.append({"image": name, "mask": mask_polygons(mask), "text": [PROMPT]})
        videos.append({"id": video, "frames": names,
                       "contrast": [round(c, 4) for c in contrast],
                       "hard_stretches": _hard_stretches(contrast),
                       "vessel_fraction": [round(float(m.mean()), 4) for m in masks]})

    if fmt == "annotations":
        (tmp / "annotations.json").write_text(json.dumps(annotations))
    meta = {"generator": "common.synth", "args": args, "hard_contrast": HARD_CONTRAST,
            "videos": videos}
    (tmp / "synth_meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not out_dir.exists():
            raise
        shutil.rmtree(tmp)  # another process finished first; use its copy if it matches
        return _reuse_existing(out_dir, args)
    return out_dir


# ----------------------------------------------------------------------------- cine loops

CINE_FORMATS = {"gif": ".gif", "tiff": ".tif", "dicom": ".dcm", "mp4": ".mp4", "avi": ".avi"}
CINE_FRAME_MS = 80  # 12.5 frames/s, a usual cine rate of X-ray angiography (and whole GIF centiseconds)
XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"  # DICOM X-Ray Angiographic Image Storage


def widen(frames, bits):
    """uint8 frames as `bits`-bit values: v * (2^bits - 1) / 255, rounded (uint16 above 8 bits). Scaling
    back by the bit depth (common.data.to_8bit) returns the 8-bit values exactly: the rounding error,
    at most 0.5 * 255 / (2^bits - 1) grey levels (0.03 for 12 bits), never reaches a rounding boundary."""
    if bits == 8:
        return np.asarray(frames, np.uint8)
    top = 2 ** bits - 1
    return np.rint(np.asarray(frames, np.float64) * top / 255).astype(np.uint16)


def write_cine(path, frames, fmt, bits=8, frame_ms=CINE_FRAME_MS, window=None):
    """Write grey uint8 frames (T, H, W) as one cine file: an animated GIF, a multi-page TIFF, a
    multi-frame DICOM (X-ray angiography, MONOCHROME2, `window` = (centre, width) in stored values
    when given; needs pydicom), or an MP4/AVI (MPEG-4 part 2; needs PyAV). `bits` > 8 (TIFF, DICOM)
    stores `widen(frames, bits)`."""
    frames = np.asarray(frames, np.uint8)
    if bits != 8 and fmt not in ("tiff", "dicom"):
        raise ValueError(f"{fmt} stores 8-bit frames, not {bits}-bit")
    values = widen(frames, bits)
    if fmt in ("gif", "tiff"):
        pages = [Image.fromarray(v) for v in values]  # uint8 -> L, uint16 -> I;16
        extra = dict(duration=frame_ms, loop=0, optimize=False) if fmt == "gif" else {}
        pages[0].save(path, save_all=True, append_images=pages[1:], **extra)
    elif fmt == "dicom":
        _write_dicom(path, values, bits, frame_ms, window)
    elif fmt in ("mp4", "avi"):
        import av  # noqa: PLC0415 (optional: requirements-extras.txt)
        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=Fraction(1000, frame_ms))
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            stream.bit_rate = 8_000_000  # ~20x a clinical export's: the grain survives (mean error ~2 grey levels)
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")))
            container.mux(stream.encode())
    else:
        raise ValueError(f"fmt must be one of {', '.join(CINE_FORMATS)}, not {fmt!r}")


def _write_dicom(path, values, bits, frame_ms, window):
    import pydicom  # noqa: PLC0415 (optional: requirements-extras.txt)
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = XA_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])  # same file, same UID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = XA_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.Modality = "XA"
    ds.PatientName = "Synthetic^Vessels"
    ds.NumberOfFrames, ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.FrameTime = f"{frame_ms:g}"
    if window:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    ds.PixelData = values.astype("<u2" if bits > 8 else np.uint8).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def write_cines(out_dir, num_videos=2, num_frames=48, size=128, seed=0, fmt="gif", bits=8):
    """Synthetic cine runs, one file per video (`run00.gif`, ...): the vessel trees of make_video
    beating as usual, under one injection each (`bolus_curve`: no contrast in the first fifth of the
    run, wash-in, plateau, wash-out, none in the last fifth). `cine_meta.json` records each file's
    contrast per frame and heartbeat period. Written to `<out_dir>.tmp` and renamed; an existing `out_dir` with the same
    arguments is returned as is, with other arguments ValueError (as write_dataset)."""
    if fmt not in CINE_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(CINE_FORMATS)}, not {fmt!r}")
    out_dir = Path(out_dir)
    args = {"version": SYNTH_VERSION, "num_videos": int(num_videos), "num_frames": int(num_frames),
            "size": int(size), "seed": int(seed), "fmt": fmt, "bits": int(bits)}
    if out_dir.exists():
        return _reuse_existing(out_dir, args, "cine_meta.json")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    tmp.mkdir(parents=True)
    contrast = bolus_curve(num_frames)
    videos = []
    for v, rng in enumerate(np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(num_videos)):
        truth = {}
        images, _, _ = make_video(rng, num_frames, size, contrast=contrast, info=truth)
        name = f"run{v:02d}{CINE_FORMATS[fmt]}"
        write_cine(tmp / name, np.stack([im[:, :, 0] for im in images]), fmt, bits)
        videos.append({"file": name, "frame_ms": CINE_FRAME_MS, "heartbeat_period_frames": round(truth["period"], 4),
                       "contrast": [round(float(c), 4) for c in contrast]})
    (tmp / "cine_meta.json").write_text(json.dumps({"generator": "common.synth", "args": args, "videos": videos},
                                                   indent=1))
    os.rename(tmp, out_dir)
    return out_dir


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Write synthetic angiography videos with vessel masks.")
    parser.add_argument("--out", required=True, help="output folder (must not exist, or hold the same dataset)")
    parser.add_argument("--videos", type=int, default=8, help="number of videos")
    parser.add_argument("--frames", type=int, default=12, help="frames per video")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (square images)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    parser.add_argument("--format", choices=["masks", "annotations"], default="masks",
                        help="masks: masks/ PNGs (0/255); annotations: annotations.json polygons")
    parser.add_argument("--cine", choices=list(CINE_FORMATS), default=None,
                        help="instead of a data folder, write one cine file per video (no masks): a whole injection, "
                             "frames without contrast before and after it (the input of python -m common.frames); "
                             "dicom needs pydicom, mp4/avi PyAV (requirements-extras.txt)")
    parser.add_argument("--bits", type=int, choices=[8, 10, 12, 14, 16], default=8,
                        help="with --cine tiff or dicom: store the frames as this many bits (v * (2^bits - 1) / 255)")
    return parser.parse_args(argv)


def main(args):
    start = time.time()
    if args.cine:
        out = write_cines(args.out, args.videos, args.frames, args.size, args.seed, args.cine, args.bits)
        print(f"{out}: {args.videos} cine runs of {args.frames} frames of {args.size} px ({args.cine}, {args.bits} bit), "
              f"seed {args.seed}, {time.time() - start:.2f} s")
        return
    out = write_dataset(args.out, args.videos, args.frames, args.size, args.seed, args.format)
    meta = json.loads((out / "synth_meta.json").read_text())
    n_frames = sum(len(v["frames"]) for v in meta["videos"])
    n_hard = sum(c < HARD_CONTRAST for v in meta["videos"] for c in v["contrast"])
    fraction = np.mean([f for v in meta["videos"] for f in v["vessel_fraction"]])
    print(f"{out}: {len(meta['videos'])} videos, {n_frames} frames of {args.size} px, "
          f"format {args.format}, seed {args.seed}, vessel fraction {fraction:.1%}, "
          f"{n_hard} washed-out frames, {time.time() - start:.2f} s")


if __name__ == "__main__":
    main(parse_args())
