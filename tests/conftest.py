"""Shared fixtures: synthetic vessel videos, the tiny model as a folder, a quick SFT checkpoint.

Everything is built once per test session in a temporary folder; nothing is downloaded."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# the tiny model's SAM2 at 256 px, not the released 1024, so a CPU suite stays within minutes: the same
# pretrained weights on a coarser mask grid (every script a test launches inherits it)
os.environ.setdefault("SA2VA_TINY_SAM_SIZE", "256")

# A quick SFT run that learns on the tiny model in ~10 s of CPU (see README, "Tests").
QUICK_SFT = ["--epochs", "3", "--lr", "3e-3", "--batch_size", "4", "--num_workers", "0", "--lora_preset", "small",
             "--log_every", "100"]


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """10 videos x 12 frames of 128 px (8 train / 2 val videos by the default split)."""
    from common.synth import write_dataset
    return str(write_dataset(tmp_path_factory.mktemp("data") / "synth", num_videos=10, frames_per_video=12, size=128,
                             seed=0))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    from common.tiny import build_tiny_model
    model, tokenizer = build_tiny_model(0)
    out = str(tmp_path_factory.mktemp("tiny") / "tiny_sa2va")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sft_run(synth_data, tmp_path_factory):
    """Run folder of a quick SFT run on `synth_data` (best/ and final/ are stage checkpoints)."""
    import train_sft
    args = train_sft.parse_args(["--data", synth_data, "--output", str(tmp_path_factory.mktemp("runs"))] + QUICK_SFT)
    return train_sft.main(args)
