"""Stage 2 (DPO): the loss and its metrics against hand-computed values, the mask
log-likelihood against its formula, the three pair modes and the pairs validator, and a short
DPO run on synthetic data that raises held-out preference accuracy without losing val Dice,
moves the trained heads only and leaves the reference as it was."""
import contextlib
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import make_dpo_pairs
import train_dpo
from common.data import DataError, Frame, build_splits
from common.forward import sample_masks
from common.lora import load_stage
from common.losses import dpo_loss, dpo_metrics, mask_log_likelihood
from common.pairs import PAIR_KEYS, SCORE_KEYS, PairDataset, load_pairs
from common.sa2va import Sa2VAProcessor, describe, load_model
from conftest import ROOT

# DPO on the tiny model. beta: the mission's log-likelihood is a per-pixel MEAN, so h =
# (logp_w - ref_w) - (logp_l - ref_l) moves by ~1e-2 when the masks change a lot; beta 0.1 keeps
# beta * h ~ 1e-3, the sigmoid never saturates, the reference never binds, and the heads drift
# (README, "DPO"). beta 100 lets the reference term act at h ~ 0.01-0.05. lr: CPU-sized for the
# tiny model (the mission's 5e-6 is for the real one). 1 epoch, grad accumulation 4: the mission's.
QUICK_DPO = ["--beta", "100", "--lr", "3e-4", "--epochs", "1", "--batch_size", "4", "--num_workers", "0",
             "--log_every", "1", "--patience", "0", "--val_pair_fraction", "0.25"]
DICE_NOISE = 0.02  # val Dice of 24 frames moves this much between neighbouring checkpoints of a flat run


# ---------------------------------------------------------------- loss and metrics (hand-computed)

PC, PR = torch.tensor([-0.1, -0.5]), torch.tensor([-0.3, -0.2])  # policy log-likelihoods: chosen, rejected
RC, RR = torch.tensor([-0.2, -0.4]), torch.tensor([-0.1, -0.6])  # reference
# h = (pc - rc) - (pr - rr) = [0.1 - (-0.2), -0.1 - 0.4] = [0.3, -0.5]


def softplus(x):
    return math.log1p(math.exp(x))  # -log sigmoid(-x)


def test_dpo_loss_hand_values():
    beta = 0.5
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=beta)
    # -log sigmoid(beta h) = log(1 + exp(-beta h))
    assert losses.tolist() == pytest.approx([softplus(-0.15), softplus(0.25)], abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.05, -0.05], abs=1e-6)  # beta (pc - rc)
    assert rejected.tolist() == pytest.approx([-0.1, 0.2], abs=1e-6)  # beta (pr - rr)
    assert not chosen.requires_grad and not rejected.requires_grad
    m = dpo_metrics(chosen, rejected)
    assert m["accuracy"] == pytest.approx(0.5)  # pair 0 prefers chosen, pair 1 does not
    assert m["margin"] == pytest.approx((0.15 - 0.25) / 2, abs=1e-6)
    assert m["chosen_rewards"] == pytest.approx(0.0, abs=1e-6)
    assert m["rejected_rewards"] == pytest.approx(0.05, abs=1e-6)


def test_dpo_label_smoothing_and_reference_free():
    beta, eps = 0.5, 0.2
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=eps)
    expected = [(1 - eps) * softplus(-beta * h) + eps * softplus(beta * h) for h in (0.3, -0.5)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    # reference-free: h = pc - pr = [0.2, -0.3]; rewards beta * logp; the ref tensors are ignored
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=beta, reference_free=True)
    assert losses.tolist() == pytest.approx([softplus(-0.1), softplus(0.15)], abs=1e-6)
    assert chosen.tolist() == pytest.approx([-0.05, -0.25], abs=1e-6)
    assert dpo_loss(PC, PR, beta=beta, reference_free=True)[0].tolist() == pytest.approx(losses.tolist())
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(PC, PR, beta=beta)


def test_dpo_gradient_and_step_zero():
    pc = PC.clone().requires_grad_(True)
    losses, _, _ = dpo_loss(pc, PR, RC, RR, beta=0.5)
    losses.sum().backward()
    # d/d pc of -log sigmoid(beta h) = -beta sigmoid(-beta h)
    assert pc.grad.tolist() == pytest.approx([-0.5 / (1 + math.exp(0.15)), -0.5 / (1 + math.exp(-0.25))], abs=1e-6)
    # policy == reference: every loss is log 2, margin 0, and a tie is no accuracy
    losses, chosen, rejected = dpo_loss(PC, PR, PC, PR, beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7)
    m = dpo_metrics(chosen, rejected)
    assert m["margin"] == 0 and m["accuracy"] == 0


def test_saturation_diagnostic_on_constructed_logps():
    """beta * h = [0, 2, 4.5, 4.7, -6] by construction (beta 100, h in per-pixel-mean units):
    sigmoid(beta h) is outside [0.01, 0.99] exactly for |beta h| > log 99 = 4.595, so 2 of 5."""
    h = torch.tensor([0.0, 0.02, 0.045, 0.047, -0.06])
    losses, chosen, rejected = dpo_loss(h, torch.zeros(5), torch.zeros(5), torch.zeros(5), beta=100.0)
    m = dpo_metrics(chosen, rejected)
    assert m["saturated"] == pytest.approx(2 / 5)
    assert m["abs_margin"] == pytest.approx((0 + 2 + 4.5 + 4.7 + 6) / 5, abs=1e-5)
    # policy == reference (step 0): nothing saturated, |beta h| = 0
    m0 = dpo_metrics(*dpo_loss(PC, PR, PC, PR, beta=100.0)[1:])
    assert m0["saturated"] == 0.0 and m0["abs_margin"] == 0.0
    # the end-of-run line says which way beta is off
    line = train_dpo.beta_check_line
    assert "too small" in line([dict(step=4, saturated=0.0, abs_margin=0.01)], 0.1)
    assert "too large" in line([dict(step=4, saturated=0.9, abs_margin=8.0)], 1000)
    assert "in range" in line([dict(step=4, saturated=0.1, abs_margin=1.5)], 100)


def test_mask_log_likelihood_is_the_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g) * 4
    mask = torch.rand(2, 5, 7, generator=g) > 0.5
    p = torch.sigmoid(logits.double())
    y = mask.double()
    expected = (y * p.log() + (1 - y) * (1 - p).log()).mean(dim=(-2, -1))
    assert mask_log_likelihood(logits, mask).tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    # bf16 logits far out in the tails: float32 inside, finite, = -|logit| / pixels for wrong pixels
    big = torch.tensor([[60.0, -60.0]], dtype=torch.bfloat16)
    value = mask_log_likelihood(big, torch.tensor([[False, True]]))
    assert value.dtype == torch.float32 and value.item() == pytest.approx(-60.0)


# ---------------------------------------------------------------- the pairs file and its validator

def _png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


@pytest.fixture()
def pair_folder(tmp_path):
    """A valid two-pair file on 12x10 images."""
    img = np.zeros((10, 12, 3), dtype=np.uint8)
    mask = np.zeros((10, 12), dtype=np.uint8)
    mask[3:6] = 255
    entries = []
    for i in range(2):
        _png(str(tmp_path / "data" / "images" / f"v_{i}.png"), img)
        _png(str(tmp_path / "data" / "masks" / f"v_{i}.png"), mask)
        _png(str(tmp_path / "pairs" / "masks" / f"v_{i}__s1.png"), mask[::-1])
        entries.append(dict(image=f"../data/images/v_{i}.png", chosen_mask=f"../data/masks/v_{i}.png",
                            rejected_mask=f"masks/v_{i}__s1.png", chosen_iou=1.0, rejected_iou=0.25, iou_gap=0.75,
                            prompt="<image>\nPlease segment the blood vessel."))
    with open(tmp_path / "pairs" / "dpo_annotations.json", "w") as f:
        json.dump(entries, f)
    return tmp_path / "pairs", entries


def _rewrite(folder, entries):
    with open(folder / "dpo_annotations.json", "w") as f:
        json.dump(entries, f)
    return str(folder / "dpo_annotations.json")


def test_load_pairs_accepts_a_good_file(pair_folder):
    folder, _ = pair_folder
    pairs = load_pairs(str(folder))  # the folder or the file
    assert len(pairs) == 2 and pairs[0]["video"] == "v" and pairs[1]["frame"] == 1
    sample = PairDataset(pairs)[1]
    assert sample["chosen_mask"].shape == (10, 12) and sample["chosen_mask"].dtype == bool
    assert sample["rejected_mask"].sum() == sample["chosen_mask"].sum() == 36 and sample["index"] == 1
    assert load_pairs(str(folder / "dpo_annotations.json"), min_iou_gap=0.5)


@pytest.mark.parametrize("case, match", [
    ("missing_key", r"entry 1: missing key\(s\) iou_gap"),
    ("missing_file", r"entry 1: rejected_mask file .*nothere\.png not found"),
    ("wrong_size", r"entry 1: chosen_mask .*small\.png is 5x4 but the image .*v_1\.png is 12x10"),
    ("gap_below", r"entry 1: iou_gap 0.6 is below the threshold 0.7"),
    ("gap_inconsistent", r"entry 1: iou_gap 0.5 != chosen_iou - rejected_iou = 0.750000"),
    ("bad_prompt", r"entry 1: prompt must be a string containing <image>"),
    ("not_a_list", r"must be a JSON list"),
])
def test_load_pairs_names_the_entry_and_file(pair_folder, case, match):
    folder, entries = pair_folder
    bad = [dict(e) for e in entries]
    min_gap = None
    if case == "missing_key":
        del bad[1]["iou_gap"]
    elif case == "missing_file":
        bad[1]["rejected_mask"] = "masks/nothere.png"
    elif case == "wrong_size":
        _png(str(folder / "masks" / "small.png"), np.zeros((4, 5)))
        bad[1]["chosen_mask"] = "masks/small.png"
    elif case == "gap_below":
        bad[1].update(rejected_iou=0.4, iou_gap=0.6)
        min_gap = 0.7
    elif case == "gap_inconsistent":
        bad[1]["iou_gap"] = 0.5
    elif case == "bad_prompt":
        bad[1]["prompt"] = "segment the vessel"
    elif case == "not_a_list":
        bad = {"pairs": bad}
    path = _rewrite(folder, bad)
    with pytest.raises(DataError, match=match) as err:
        load_pairs(path, min_iou_gap=min_gap)
    assert "dpo_annotations.json" in str(err.value)


def test_load_pairs_ranked_by_another_score(pair_folder):
    """With score_gap the ordering and min-gap checks use the ranking score: the chosen mask may have the
    lower IoU; a negative or inconsistent score_gap is refused."""
    folder, entries = pair_folder
    ranked = [dict(e, chosen_iou=0.25, rejected_iou=0.3, iou_gap=-0.05, rank_by="dice_topology", chosen_score=0.8,
                   rejected_score=0.6, score_gap=0.2) for e in entries]
    assert len(load_pairs(_rewrite(folder, ranked), min_iou_gap=0.1)) == 2
    with pytest.raises(DataError, match=r"entry 0: score_gap 0.2 is below the threshold 0.3"):
        load_pairs(_rewrite(folder, ranked), min_iou_gap=0.3)
    bad = [dict(ranked[0], chosen_score=0.6, rejected_score=0.8, score_gap=-0.2)]
    with pytest.raises(DataError, match=r"entry 0: score_gap -0.2 < 0"):
        load_pairs(_rewrite(folder, bad))
    bad = [dict(ranked[0], score_gap=0.5)]
    with pytest.raises(DataError, match=r"entry 0: score_gap 0.5 != chosen_score - rejected_score"):
        load_pairs(_rewrite(folder, bad))
    bad = [{k: v for k, v in ranked[0].items() if k != "chosen_score"}]
    with pytest.raises(DataError, match=r"entry 0: chosen_score must be a finite number"):
        load_pairs(_rewrite(folder, bad))


def test_topology_ranking_chooses_the_unbroken_mask(tmp_path):
    """Two candidates of equal IoU (a vessel cut in two vs the same vessel 2 columns shorter): by IoU no
    pair (gap 0); by dice_topology the one-piece mask is chosen, with its score and parts recorded."""
    gt = np.zeros((16, 40), bool)
    gt[6:9, 5:35] = True
    broken, shortened = gt.copy(), gt.copy()
    broken[:, 19:21] = False
    shortened[:, 33:35] = False
    _png(str(tmp_path / "v_0.png"), gt * 255)
    frame = Frame(key="v_0", image_path=str(tmp_path / "v_0.png"), mask_path=str(tmp_path / "v_0.png"), video="v",
                  frame=0)
    cands = [("broken", torch.from_numpy(broken)), ("shortened", torch.from_numpy(shortened))]
    args = SimpleNamespace(mode="generate", pairing="best_worst", include_gt=True, min_iou_gap=0.02,
                           max_pairs_per_image=0, max_dice=0.75, rank_by="iou")
    pairs, _ = make_dpo_pairs.select_pairs(args, frame, cands)
    assert [(a["tag"], b["tag"]) for a, b in pairs] == [("gt", "broken")]  # only GT vs the first of the tie
    args.rank_by = "dice_topology"
    pairs, _ = make_dpo_pairs.select_pairs(args, frame, cands)
    assert [(a["tag"], b["tag"]) for a, b in pairs] == [("shortened", "broken"), ("gt", "shortened")]
    chosen, rejected = pairs[0]
    assert chosen["iou"] == rejected["iou"] and chosen["score"] > rejected["score"] + 0.1
    assert (chosen["betti0_error"], rejected["betti0_error"]) == (0, 1)
    assert pairs[1][0]["score"] == 1.0 and pairs[1][0]["betti0_error"] == 0


# ---------------------------------------------------------------- the three modes, then DPO

@pytest.fixture(scope="session")
def sft_best(sft_run):
    return os.path.join(sft_run, "best")


def make_pairs(synth_data, tiny_folder, sft_best, out, mode, *extra):
    args = make_dpo_pairs.parse_args(["--mode", mode, "--data", synth_data, "--output", str(out), "--num_workers", "0",
                                      "--model", tiny_folder, *([] if mode == "from_predictions" else
                                                                ["--init", sft_best]), *extra])
    summary = make_dpo_pairs.main(args)
    pairs = load_pairs(str(out), min_iou_gap=args.min_iou_gap)
    with open(out / "dpo_annotations.json") as f:
        raw = json.load(f)
    ranked = args.rank_by != "iou"  # the MISSION.md format exactly, plus the ranking when not by IoU
    extra = ("rank_by",) + SCORE_KEYS + tuple(f"{side}_{k}" for side in ("chosen", "rejected")
                                             for k in make_dpo_pairs.SCORE_PARTS)
    assert all(sorted(e) == sorted(PAIR_KEYS + (extra if ranked else ())) for e in raw)
    assert all(not os.path.isabs(e[k]) for e in raw for k in ("image", "chosen_mask", "rejected_mask"))
    assert summary["pairs"] == len(pairs) > 0
    return pairs, summary


def test_sampled_masks_follow_the_model_distribution():
    """Each low-res pixel is Bernoulli(sigmoid(logit / T)), with or without spatial correlation;
    correlation makes neighbours agree more often; a seed gives the same masks."""
    model = SimpleNamespace(grounding_encoder=SimpleNamespace(sam2_model=SimpleNamespace(image_size=16)))
    logits = torch.linspace(-3, 3, 16).repeat(16, 1)[None, None]  # (1, 1, 16, 16): columns from -3 to 3
    expected = torch.sigmoid(logits[0, 0, 0] / 2.0)  # T = 2
    agree = {}
    for sigma in (0.0, 2.0):
        masks = sample_masks(model, logits, (16, 16), 400, 2.0, sigma, torch.Generator().manual_seed(0)).float()
        assert masks.shape == (400, 16, 16)
        # per column: 6400 draws (correlated ones count for fewer), so 0.05 is several standard errors
        assert torch.allclose(masks.mean(dim=(0, 1)), expected, atol=0.05), sigma
        agree[sigma] = (masks[:, :, 1:] == masks[:, :, :-1]).float().mean().item()
        again = sample_masks(model, logits, (16, 16), 400, 2.0, sigma, torch.Generator().manual_seed(0)).float()
        assert torch.equal(masks, again)
    assert agree[2.0] > agree[0.0] + 0.1


def test_generate_mode(synth_data, tiny_folder, sft_best, tmp_path):
    pairs, summary = make_pairs(synth_data, tiny_folder, sft_best, tmp_path / "gen", "generate", "--num_samples", "3",
                                "--max_train_samples", "16", "--include_gt")
    print(f"\ngenerate: {summary['pairs']} pairs of {summary['images']} images, gaps {summary['iou_gap_quantiles']}")
    assert all(p["iou_gap"] >= 0.05 for p in pairs)
    # generated masks live in masks/ and name their image; the ground truth is referenced, not copied
    names = {os.path.basename(p[k]) for p in pairs for k in ("chosen_mask", "rejected_mask") if p[k].startswith("masks")}
    assert names and all(n.split("__")[0] in {p["stem"] for p in pairs} for n in names)
    gt_pairs = [p for p in pairs if p["chosen_iou"] == 1.0]
    assert gt_pairs and all(p["chosen_mask"].startswith("../") for p in gt_pairs)


def test_from_predictions_mode(synth_data, tmp_path):
    """Two 'methods': the ground truth thinned by one pixel, and shifted by three."""
    train, _ = build_splits(synth_data)
    for f in train[:8]:
        gt = np.asarray(Image.open(f.mask_path)) > 0
        thin = gt & np.roll(gt, 1, axis=1)
        _png(str(tmp_path / "thin" / f"{f.key}.png"), thin * 255)
        _png(str(tmp_path / "shifted" / f"{f.key}.png"), np.roll(gt, 3, axis=0) * 255)
    pairs, summary = make_pairs(synth_data, None, None, tmp_path / "fp", "from_predictions", "--predictions",
                                f"thin={tmp_path / 'thin'}", f"shifted={tmp_path / 'shifted'}")
    assert summary["skipped"] == {"no candidate": len(train) - 8}
    assert summary["chosen_tags"] == {"thin": 8} and summary["rejected_tags"] == {"shifted": 8}
    assert all(p["chosen_mask_path"].startswith(str(tmp_path / "thin")) for p in pairs)  # referenced, not copied


def test_no_pair_passing_leaves_a_summary_that_says_why(synth_data, tmp_path):
    """Two methods that agree give no pair: the run fails loudly, and the folder holds summary.json
    alone (pairs 0 and the reasons), which run.sh reads to skip DPO instead of stopping."""
    train, _ = build_splits(synth_data)
    for f in train[:4]:
        for method in ("a", "b"):
            _png(str(tmp_path / method / f"{f.key}.png"), (np.asarray(Image.open(f.mask_path)) > 0) * 255)
    out = tmp_path / "pairs"
    args = make_dpo_pairs.parse_args(["--mode", "from_predictions", "--data", synth_data, "--output", str(out),
                                      "--predictions", f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"])
    with pytest.raises(SystemExit, match="no pair passed"):
        make_dpo_pairs.main(args)
    assert sorted(os.listdir(out)) == ["masks", "summary.json"]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["pairs"] == 0 and summary["skipped"]["iou gap below --min_iou_gap"] == 4


def test_from_predictions_ranked_by_topology(synth_data, tmp_path):
    """The same two 'methods', one of them also cut into pieces: ranked by dice_topology the file records
    each side's score, Dice, clDice and Betti-0 error, and its gaps are the differences of its scores."""
    train, _ = build_splits(synth_data)
    for f in train[:6]:
        gt = np.asarray(Image.open(f.mask_path)) > 0
        cut = gt.copy()
        cut[:, ::8] = False  # a vertical cut every 8 columns: many pieces, most pixels kept
        _png(str(tmp_path / "cut" / f"{f.key}.png"), cut * 255)
        _png(str(tmp_path / "shifted" / f"{f.key}.png"), np.roll(gt, 3, axis=0) * 255)
    pairs, summary = make_pairs(synth_data, None, None, tmp_path / "fp", "from_predictions", "--predictions",
                                f"cut={tmp_path / 'cut'}", f"shifted={tmp_path / 'shifted'}", "--rank_by",
                                "dice_topology", "--include_gt")
    assert summary["rank_by"] == "dice_topology" and "score_gap_quantiles" in summary
    for p in pairs:
        assert p["rank_by"] == "dice_topology" and p["score_gap"] >= 0.05
        assert p["score_gap"] == pytest.approx(p["chosen_score"] - p["rejected_score"], abs=1e-6)
        assert 0 <= p["rejected_cldice"] <= 1 and p["rejected_betti0_error"] >= 0
    gt_side = [p for p in pairs if "synth/masks/" in p["chosen_mask"]]  # the ground truth, referenced
    assert gt_side and all(p["chosen_score"] == 1.0 and p["chosen_betti0_error"] == 0 for p in gt_side)


@pytest.fixture(scope="session")
def gt_pairs(synth_data, tiny_folder, sft_best, tmp_path_factory):
    """GT-vs-prediction pairs of every video (the data's val videos included: train_dpo must hold
    them out): the methodology's stage-2 pairs, and the data of the DPO run below."""
    out = tmp_path_factory.mktemp("dpo")
    return make_pairs(synth_data, tiny_folder, sft_best, out / "pairs", "gt", "--split", "all"), out


def test_gt_mode(gt_pairs):
    (pairs, summary), _ = gt_pairs
    assert all(p["chosen_iou"] == 1.0 and p["chosen_mask"].startswith("../") for p in pairs)
    skipped = summary["skipped"].get("dice above --max_dice", 0) + summary["skipped"].get("iou gap below --min_iou_gap", 0)
    assert summary["pairs"] + skipped == summary["images"] == 120
    assert all(1.0 - p["rejected_iou"] >= 0.05 for p in pairs)
    assert os.path.basename(pairs[0]["rejected_mask"]) == f"{pairs[0]['stem']}__pred.png"


@pytest.fixture(scope="session")
def dpo_run(gt_pairs, synth_data, tiny_folder, sft_best):
    _, out = gt_pairs
    args = train_dpo.parse_args(["--data", synth_data, "--model", tiny_folder, "--init", sft_best, "--pairs",
                                 str(out / "pairs"), "--output", str(out / "runs")] + QUICK_DPO)
    return train_dpo.main(args), str(out / "pairs")


def test_dpo_raises_held_out_accuracy_and_keeps_val_dice(dpo_run):
    run, _ = dpo_run
    with open(os.path.join(run, "training_info.json")) as f:
        info = json.load(f)
    start, end = info["initial_val"], info["final"]
    print(f"\nheld-out pairs ({info['pairs']['held_out']}): accuracy {start['held_accuracy']:.3f} -> "
          f"{end['held_accuracy']:.3f}, margin {end['held_margin']:.4f}, logp accuracy "
          f"{start['held_logp_accuracy']:.3f} -> {end['held_logp_accuracy']:.3f}; val Dice {start['mean_dice']:.4f} -> "
          f"{end['mean_dice']:.4f} (recall {start['mean_recall']:.3f} -> {end['mean_recall']:.3f}, precision "
          f"{start['mean_precision']:.3f} -> {end['mean_precision']:.3f})")
    # policy == reference: the same forward, up to float32 summation order between batched and cached passes
    assert start["held_dpo_loss"] == pytest.approx(math.log(2), abs=1e-6) and abs(start["held_margin"]) < 1e-5
    assert end["held_accuracy"] >= 0.8 and end["held_margin"] > 0
    assert end["mean_dice"] > start["mean_dice"] - DICE_NOISE
    # the first logged window is the first grad_accum micro-steps, all before any update: policy == reference
    with open(os.path.join(run, "metrics.jsonl")) as f:
        first = next(json.loads(line) for line in f if "train/dpo_loss" in line)
    assert first["train/dpo_loss"] == pytest.approx(math.log(2), abs=1e-6) and abs(first["train/margin"]) < 1e-5
    # the beta check: one record per log window (log_every 1), nothing saturated at the start
    assert first["train/saturated"] == 0.0 and first["train/abs_margin"] < 1e-3
    assert len(info["beta_check"]) == info["history"][-1]["step"] and info["beta_check"][0]["saturated"] == 0.0
    assert {"held_saturated", "held_abs_margin"} <= set(end)


def test_dpo_moves_trained_heads_only_and_keeps_the_reference(dpo_run, tiny_folder, sft_best, synth_data):
    run, pairs_dir = dpo_run
    start, _ = load_model(tiny_folder)
    load_stage(start, sft_best)
    end, tokenizer = load_model(tiny_folder)
    load_stage(end, os.path.join(run, "final"))
    trained = ("text_hidden_fcs.", "grounding_encoder.sam2_model.sam_mask_decoder.")
    start_params = dict(start.named_parameters())
    changed = {n for n, p in end.named_parameters() if not torch.equal(p, start_params[n])}
    assert changed and all(n.startswith(trained) for n in changed)
    assert all(n in changed for n in start_params if n.startswith("text_hidden_fcs."))
    assert any("lora_" in n for n in start_params)  # the SFT adapter is there, and unchanged
    assert load_file(os.path.join(run, "final", "adapter_model.safetensors")).keys() == \
        load_file(os.path.join(sft_best, "adapter_model.safetensors")).keys()

    # the stored reference is the starting policy: recomputed from --init, it is what training used
    with open(os.path.join(run, "reference_logps.json")) as f:
        stored = torch.tensor(json.load(f)["train"])
    args = train_dpo.parse_args(["--data", synth_data, "--pairs", pairs_dir] + QUICK_DPO)
    _, val_frames = build_splits(synth_data)
    train_pairs, held_pairs = train_dpo.split_pairs(args, load_pairs(pairs_dir), val_frames)
    val_videos = {f.video for f in val_frames}
    assert val_videos <= {e["video"] for e in held_pairs} and not val_videos & {e["video"] for e in train_pairs}
    dataset = PairDataset(train_pairs[:8])
    processor = Sa2VAProcessor(describe(start, tokenizer), tokenizer)
    loader = torch.utils.data.DataLoader(dataset, 4, collate_fn=processor)
    train_dpo.disable_dropout(start)
    fresh = train_dpo.score_pairs(start.eval(), loader, torch.device("cpu"), None, contextlib.nullcontext)
    assert torch.allclose(fresh, stored[:8], atol=1e-6)
    # and the trained policy has moved away from it
    train_dpo.disable_dropout(end)
    moved = train_dpo.score_pairs(end.eval(), loader, torch.device("cpu"), None, contextlib.nullcontext)
    assert not torch.allclose(moved, stored[:8], atol=1e-4)


def test_dpo_on_the_deepspeed_engine_reference_free(dpo_run, synth_data, tiny_folder, sft_best, tmp_path):
    """The same loop under a real DeepSpeed engine (ZeRO-2, gloo on CPU), reference-free with
    label smoothing: runs, moves the heads, and writes no reference file."""
    pytest.importorskip("deepspeed")
    _, pairs_dir = dpo_run
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29633")
    cmd = [sys.executable, os.path.join(ROOT, "train_dpo.py"), "--engine", "deepspeed", "--zero_stage", "2",
           "--model", tiny_folder, "--data", synth_data, "--init", sft_best, "--pairs", pairs_dir, "--output",
           str(tmp_path)] + QUICK_DPO + ["--max_train_samples", "8", "--max_val_samples", "4", "--grad_accum", "2",
                                         "--reference_free", "--label_smoothing", "0.1"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = os.path.join(str(tmp_path), os.listdir(str(tmp_path))[0])
    assert not os.path.exists(os.path.join(run, train_dpo.REFERENCE_FILE))
    end = load_file(os.path.join(run, "final", "trained_parts.safetensors"))
    start = load_file(os.path.join(sft_best, "trained_parts.safetensors"))
    assert end.keys() == start.keys()
    assert all(not torch.equal(end[k], start[k]) for k in start if k.startswith("text_hidden_fcs."))


def test_disputed_share_is_the_median_differing_share(tmp_path):
    from common.pairs import disputed_share
    entries = []
    for i, differing in enumerate((10, 30, 50)):  # of 100 pixels
        chosen = np.zeros((10, 10), np.uint8)
        rejected = chosen.copy()
        rejected.flat[:differing] = 255
        paths = {}
        for name, mask in (("chosen", chosen), ("rejected", rejected)):
            paths[f"{name}_mask_path"] = str(tmp_path / f"{name}{i}.png")
            Image.fromarray(mask).save(paths[f"{name}_mask_path"])
        entries.append(paths)
    assert disputed_share(entries) == pytest.approx(0.30)
    assert disputed_share(entries, limit=1) == pytest.approx(0.10)
