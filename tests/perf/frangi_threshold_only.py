"""The Frangi row as issue #20 first described it: scikit-image's `frangi` with its default scales
(sigmas 1, 3, 5, 7, 9) on the green channel, dark ridges, only the threshold fitted on the train
split (by mean Dice, the grid of common.baselines). The project's `--baselines frangi` row also fits
polarity, scales and a dark-background mask on the train split, and scores 0.17-0.24 higher on
DRIVE (README, "Real images").

    python tests/perf/frangi_threshold_only.py --data DRIVE --still_images --seeds 0 1 2
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common import baselines  # noqa: E402
from common.data import frame_mask, read_image, splits_from_args  # noqa: E402
from common.rewards import dice  # noqa: E402

SKIMAGE_DEFAULT_SIGMAS = tuple(range(1, 10, 2))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--still_images", action="store_true", help="every image its own video (as the stages' flag)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the stages' --seed: one split each")
    args = p.parse_args()
    for seed in args.seeds:
        split_args = baselines.parse_args(["--data", args.data, "--seed", str(seed), "--output", "unused"]
                                          + ["--still_images"] * args.still_images)
        train, val = splits_from_args(split_args)
        vesselness = lambda f: baselines.vesselness(read_image(f.image_path), SKIMAGE_DEFAULT_SIGMAS, dark_vessels=True)
        train_dice = np.mean([baselines._dice_per_threshold(vesselness(f), frame_mask(f)) for f in train], axis=0)
        threshold = baselines.FRANGI_THRESHOLDS[int(train_dice.argmax())]
        val_dice = [float(dice(vesselness(f) > threshold, frame_mask(f))[0]) for f in val]
        print(f"seed {seed}: threshold {threshold:.3g} (train Dice {train_dice.max():.4f}), "
              f"val mean Dice {np.mean(val_dice):.4f} on {len(val)} frames")


if __name__ == "__main__":
    main()
