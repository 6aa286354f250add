"""Reliability, round two (issue #21): samplers that keep ranks in step, metrics reduced over ranks,
arguments refused at the start, one-line errors, truncated weights and mismatched --resume named,
16-bit frames, and runs that cannot overwrite each other. All fast: no tiny model is built here."""
import os

import numpy as np
import pytest
from PIL import Image

from common.data import EvalSampler, ShardedSampler, VesselDataset, read_image, scan_folder
from common.tiny import pil_to_normalized
from test_data import make_folder


# ---------------------------------------------------------------- item 2: samplers

@pytest.mark.parametrize("world_size", range(1, 9))
def test_sharded_sampler_gives_every_rank_the_same_count_and_covers_every_sample(world_size):
    for size in range(1, 9):
        for shuffle in (False, True):
            shards = [list(ShardedSampler(size, rank, world_size, shuffle=shuffle, seed=3)) for rank in range(world_size)]
            lengths = {len(ShardedSampler(size, rank, world_size)) for rank in range(world_size)}
            assert lengths == {len(s) for s in shards} and len(lengths) == 1, (size, world_size)
            assert set(i for s in shards for i in s) == set(range(size)), (size, world_size)
            assert all(0 <= i < size for s in shards for i in s)


@pytest.mark.parametrize("world_size", range(1, 9))
def test_eval_sampler_counts_each_sample_once(world_size):
    for size in range(0, 9):
        shards = [list(EvalSampler(size, rank, world_size)) for rank in range(world_size)]
        assert sorted(i for s in shards for i in s) == list(range(size)), (size, world_size)
        assert [len(EvalSampler(size, rank, world_size)) for rank in range(world_size)] == [len(s) for s in shards]


# ---------------------------------------------------------------- item 7: 16-bit frames

def test_16_bit_frame_gives_the_8_bit_input_tensor(tmp_path):
    root = make_folder(tmp_path / "8bit", stems=("v1_frame_1",))
    path8 = os.path.join(root, "images", "v1_frame_1.png")
    grey = np.asarray(Image.open(path8).convert("L"))
    Image.fromarray(grey).save(path8)
    root16 = make_folder(tmp_path / "16bit", stems=("v1_frame_1",))
    path16 = os.path.join(root16, "images", "v1_frame_1.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(path16)  # the same frame, 16 bits
    assert Image.open(path16).mode == "I;16"
    a, b = VesselDataset(scan_folder(root))[0]["image"], VesselDataset(scan_folder(root16))[0]["image"]
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    x, y = pil_to_normalized(a, 32), pil_to_normalized(b, 32)  # the encoder's input: ImageNet std < 1
    assert (x - y).abs().max() <= 1 / 255 / 0.225 + 1e-6


@pytest.mark.parametrize("bits", [10, 12, 14])
def test_frames_of_fewer_significant_bits_fill_the_8_bit_range_without_clipping(tmp_path, bits):
    ramp = np.linspace(0, 2 ** bits - 1, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "f.png")
    out = np.asarray(read_image(str(tmp_path / "f.png")).convert("L")).astype(int)
    assert out.min() == 0 and out.max() == 255 and (np.diff(out.ravel()) >= 0).all()  # monotone: nothing clipped
    assert np.abs(out - np.round(ramp / (2 ** bits - 1) * 255)).max() <= 1


def test_float_and_32_bit_frames_are_scaled_not_clipped(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "f.tif")
    Image.fromarray(grey.astype(np.int32) * 257).save(tmp_path / "i.tif")
    for name in ("f.tif", "i.tif"):
        out = np.asarray(read_image(str(tmp_path / name)).convert("L")).astype(int)
        assert np.abs(out - grey).max() <= 1, name
