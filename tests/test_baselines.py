"""The baselines beside the stages (common/baselines.py, evaluate.py --baselines): the U-Net learns,
is deterministic and resumes exactly; Frangi's fitted threshold is the evaluation threshold; the mask
grid keeps what fills its cells and widens a 1 px vessel; U-Net and
Sa2VA stage checkpoints cannot be swapped. Small sizes: the whole file runs in ~30 s on 2 shared CPU cores."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import evaluate
from common import baselines
from common.data import build_splits, frame_mask, read_image
from common.lora import read_stage_meta
from common.sa2va import CheckpointError
from common.synth import write_dataset

# A U-Net small enough for CPU tests: width 8, 48 px crops (the `small` preset's other values)
TINY_UNET = ["--preset", "small", "--width", "8", "--crop", "48", "--batch_size", "8", "--log_every", "1000"]
LEARN_STEPS = 60
# held-out Dice over the untrained network's at its best threshold; measured: 0.19 untrained -> 0.68 after 60 steps
MARGIN = 0.3
SWEEP = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These small convolutions run several times faster on one thread than on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """6 synthetic videos x 3 frames of 64 px: 15 train / 3 val frames by the default split."""
    return str(write_dataset(tmp_path_factory.mktemp("data") / "small", num_videos=6, frames_per_video=3, size=64, seed=0))


def train(data, out, *extra):
    return baselines.train_unet(baselines.parse_args(["--data", data, "--output", str(out)] + TINY_UNET + list(extra)))


def weights(run, sub="final"):
    return load_file(os.path.join(run, sub, baselines.UNET_FILE))


@pytest.fixture(scope="module")
def unet_run(small_data, tmp_path_factory):
    return train(small_data, tmp_path_factory.mktemp("unet"), "--steps", str(LEARN_STEPS), "--eval_every", "30")


def test_unet_learns_on_held_out_frames(unet_run, small_data):
    _, val = build_splits(small_data)
    torch.manual_seed(0)
    untrained_net = baselines.UNet(8)  # at 0.5 it marks no pixel (Dice 0): compare with its best threshold
    pairs = baselines.load_frames(val, torch.device("cpu"))
    untrained = max(baselines.validate_unet(untrained_net, pairs, t)["mean_dice"] for t in SWEEP)
    model, meta = baselines.load_unet(unet_run)
    trained = baselines.validate_unet(model, pairs, 0.5)["mean_dice"]
    assert trained > untrained + MARGIN, (untrained, trained)
    with open(os.path.join(unet_run, "training_info.json")) as f:
        info = json.load(f)
    train_frames, _ = build_splits(small_data)
    assert info["train_frames"] == meta["train_frames"] == [f.key for f in train_frames]  # the stages' split
    assert meta["parameters"] == sum(p.numel() for p in model.parameters())


def test_same_seed_same_weights_and_resume_is_exact(small_data, tmp_path):
    a = train(small_data, tmp_path / "a", "--steps", "4", "--eval_every", "2", "--max_val_samples", "2")
    b = train(small_data, tmp_path / "b", "--steps", "4", "--eval_every", "2", "--max_val_samples", "2")
    c = train(small_data, tmp_path / "c", "--steps", "4", "--eval_every", "2", "--max_val_samples", "2", "--seed", "1")
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    # a run killed after step 2: rewind a copy of run a to its step-2 resume point and continue it
    killed = str(tmp_path / "killed")
    shutil.copytree(a, killed)
    for name in ("training_info.json", "final"):
        shutil.rmtree(os.path.join(killed, name)) if name == "final" else os.remove(os.path.join(killed, name))
    with open(os.path.join(killed, "checkpoints", "latest"), "w") as f:
        f.write("step_0000002")
    resumed = train(small_data, tmp_path / "unused", "--steps", "4", "--eval_every", "2", "--max_val_samples", "2",
                    "--resume", killed)
    assert resumed == killed
    wr = weights(resumed)
    assert all(torch.equal(wa[k], wr[k]) for k in wa)  # BatchNorm running statistics included


def reference_batch(images, masks, crop, batch_size, seed, step, flips, rot90):
    """The first CropSampler.batch, per sample from uint8 frames: normalise the whole frame, crop
    (zero-padded to the crop size), flip, rotate; whole frames padded to a multiple of 16."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    rand = lambda n: int(torch.randint(n, (1,), generator=g))
    xs, ys = [], []
    for _ in range(batch_size):
        i = rand(len(images))
        x, y = baselines.normalise(images[i]), torch.from_numpy(masks[i]).float()[None]
        if crop:
            h, w = x.shape[-2:]
            top, left = rand(max(1, h - crop + 1)), rand(max(1, w - crop + 1))
            x, y = (F.pad(t[:, top:top + crop, left:left + crop], (0, max(0, crop - w), 0, max(0, crop - h)))
                    for t in (x, y))
        if flips and rand(2):
            x, y = x.flip(-1), y.flip(-1)
        if rot90 and (k := rand(4)):
            x, y = torch.rot90(x, k, (1, 2)), torch.rot90(y, k, (1, 2))
        xs.append(x)
        ys.append(y)
    if not crop:
        h = -(-max(t.shape[1] for t in xs) // 16) * 16
        w = -(-max(t.shape[2] for t in xs) // 16) * 16
        xs, ys = ([F.pad(t, (0, w - t.shape[2], 0, h - t.shape[1])) for t in ts] for ts in (xs, ys))
    return torch.stack(xs), torch.stack(ys)


def test_crop_sampler_gives_the_per_sample_reference_batches_bit_for_bit(tmp_path):
    """Frames normalised once and cropped where they are held: the same batches as normalising every
    sampled frame (crops inside the frame, crops larger than it, whole frames of several sizes)."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for n, (h, w) in enumerate([(40, 52), (64, 44), (33, 70), (50, 50)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "images" / f"f_{n:03d}.png")
        Image.fromarray((rng.random((h, w)) < 0.2).astype(np.uint8) * 255).save(tmp_path / "masks" / f"f_{n:03d}.png")
    train_frames, val_frames = build_splits(str(tmp_path), video_regex=None)
    frames = train_frames + val_frames
    images = [np.asarray(read_image(f.image_path)) for f in frames]
    masks = [frame_mask(f) for f in frames]
    settings = [(32, True, True), (48, True, True), (0, True, True), (32, False, False), (0, True, False)]
    for crop, flips, rot90 in settings:  # 48: larger than two frames' height or width (zero-padded)
        sampler = baselines.CropSampler(frames, crop, 5, 3, flips, rot90)
        for step in (7, 0, 1, 2, 3):
            x, y = sampler.batch(step)
            rx, ry = reference_batch(images, masks, crop, 5, 3, step, flips, rot90)
            assert x.dtype == rx.dtype == y.dtype == ry.dtype == torch.float32
            assert torch.equal(x, rx) and torch.equal(y, ry), (crop, flips, rot90, step)


def test_odd_frame_sizes_are_padded_and_cropped_back():
    model = baselines.UNet(4).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 45, 3), dtype=np.uint8))
    assert baselines.unet_probabilities(model, image).shape == (37, 45)
    small = Image.fromarray(np.zeros((5, 7, 3), np.uint8))  # smaller than the padding: constant padding
    assert baselines.unet_probabilities(model, small).shape == (5, 7)


def test_mask_grid_keeps_whole_grid_cells_and_widens_a_one_pixel_vessel():
    """SAM2 at 64 px has a 16 x 16 mask grid: 4 x 4 px cells."""
    block = torch.zeros(64, 64, dtype=torch.bool)
    block[8:24, 4:40] = True  # whole cells: the cut that best matches the mask gives it back, corners included
    for threshold in (0.5, 0.3):  # the row's mask is its best cut whatever the evaluation threshold
        assert torch.equal(baselines.mask_grid_probabilities(block, 64, threshold) > threshold, block)
    line = torch.zeros(64, 64, dtype=torch.bool)
    line[:, 30] = True  # a quarter of the cells it crosses: 0.219 on columns 29 and 30, 0.156 on 28 and 31, 0 beyond
    kept = baselines.mask_grid_probabilities(line, 64) > 0.5
    assert kept.any(dim=0).nonzero().flatten().tolist() == [29, 30] and kept[:, 29:31].all()  # Dice 2/3 at best
    probs = baselines.mask_grid_probabilities(np.ones((37, 45), bool), 64)  # frames of another size come back at theirs
    assert probs.shape == (37, 45) and bool((probs > 0.5).all())


def test_frangi_fits_on_train_frames_and_its_threshold_is_the_evaluation_threshold(small_data):
    train_frames, val = build_splits(small_data)
    params = baselines.fit_frangi(train_frames, max_frames=4, log=lambda *a: None)
    assert params["dark_vessels"]  # synthetic X-ray: dark contrast-filled vessels
    assert len(params["fit_frames"]) == 4 and set(params["fit_frames"]) <= {f.key for f in train_frames}
    image = read_image(val[0].image_path)
    v = baselines.vesselness(image, params["sigmas"], params["dark_vessels"])
    if params["dark_background"]:
        v[baselines.dark_background(image, params["sigmas"])] = 0
    for t in (0.5, 0.35):
        probs = baselines.frangi_probabilities(image, params, threshold=t)
        assert np.array_equal(probs > t, v > params["threshold"])
    pred, mask = v > params["threshold"], frame_mask(val[0])
    assert 2 * (pred & mask).sum() / (pred.sum() + mask.sum()) > 0.4  # a real, if weak, segmenter


def test_unet_folder_is_not_a_stage_checkpoint(unet_run, small_data, tmp_path):
    for path in (unet_run, os.path.join(unet_run, "best")):
        with pytest.raises(CheckpointError, match="U-Net baseline") as e:
            read_stage_meta(path)  # what load_stage (every --init, evaluate's --checkpoints) reads first
        assert path in str(e.value)
    with pytest.raises(SystemExit, match=f"--checkpoints unet={unet_run}/best: .*U-Net baseline"):
        evaluate.main(evaluate.parse_args(["--data", small_data, "--output", str(tmp_path),
                                           "--checkpoints", f"unet={unet_run}/best"]))


def test_stage_checkpoint_is_not_a_unet(sft_run_like, small_data, tmp_path):
    with pytest.raises(CheckpointError, match="Sa2VA stage checkpoint") as e:
        baselines.load_unet(sft_run_like)
    assert sft_run_like in str(e.value)
    with pytest.raises(SystemExit, match=f"--unet: {sft_run_like}: a Sa2VA stage checkpoint"):
        evaluate.main(evaluate.parse_args(["--data", small_data, "--output", str(tmp_path), "--unet", sft_run_like]))


@pytest.fixture
def sft_run_like(tmp_path):
    """A run folder whose best/ is a stage checkpoint (stage.json is what marks one)."""
    run = tmp_path / "sft_x"
    (run / "best").mkdir(parents=True)
    (run / "best" / "stage.json").write_text(json.dumps(dict(stage="sft", base_model="tiny")))
    return str(run)


def test_a_checkpoint_named_as_a_baseline_row_is_refused_first(small_data, tmp_path):
    with pytest.raises(SystemExit, match=r"\['grid'\] is the name of a baseline row"):  # before its (missing) folder
        evaluate.main(evaluate.parse_args(["--data", small_data, "--output", str(tmp_path), "--baselines", "grid",
                                           "--checkpoints", f"grid={tmp_path / 'missing'}"]))


def test_baselines_without_ground_truth_are_refused(small_data, tmp_path):
    with pytest.raises(SystemExit, match="--baselines are scored against ground truth: --predict_only segments"):
        evaluate.main(evaluate.parse_args(["--data", small_data, "--output", str(tmp_path), "--predict_only",
                                           "--baselines", "grid"]))


def test_stage_table_gives_each_row_its_gap_to_the_unet():
    row = lambda dice, **kw: dict(checkpoint=kw.pop("checkpoint", None), mean_dice=dice, mean_recall=0, mean_precision=0,
                                  mean_iou=0, **kw)
    table = evaluate.stage_table({"base": row(0.1), "sft": row(0.3, checkpoint="x/best"),
                                  "frangi": row(0.5, baseline="frangi", description="no learning"),
                                  "unet": row(0.8, baseline="unet", description="U-Net, 5 parameters")})
    lines = table.splitlines()
    assert lines[0].endswith("| Dice vs U-Net |")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c[0] for c in cells] == ["base", "sft", "frangi", "unet"]
    assert [c[6] for c in cells] == ["", "+0.2000", "", ""]  # baselines are no stage: no delta vs previous
    assert [c[8] for c in cells] == ["-0.7000", "-0.5000", "-0.3000", ""]  # after the degenerate-mask column
    assert cells[2][1] == "no learning" and cells[3][1] == "U-Net, 5 parameters"
