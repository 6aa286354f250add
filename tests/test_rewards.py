"""Metrics and PPO rewards of common/rewards.py against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from common import rewards as R


def _block(shape, rows, cols):
    m = np.zeros(shape, dtype=bool)
    m[rows, cols] = True
    return m


def _pair(key, pred, gt):
    """One skeleton metric of one 2-D pair, through the batched `skeleton_metrics`."""
    return float(R.skeleton_metrics(pred, gt)[key][0])


def _vessel(gaps=()):
    """A 3-pixel-thick horizontal vessel, 30 long, in a 16x40 frame; `gaps` = column slices cut out."""
    m = _block((16, 40), slice(6, 9), slice(5, 35))
    for g in gaps:
        m[:, g] = False
    return m


# ---------------------------------------------------------------- overlap metrics

# 4x4 hand case: gt = left two columns (8 px), pred = top two rows (8 px).
# tp = 4 (top-left 2x2), fp = 4, fn = 4, tn = 4.
GT44 = _block((4, 4), slice(None), slice(0, 2))
PRED44 = _block((4, 4), slice(0, 2), slice(None))


def test_overlap_counts_hand_case():
    c = R.overlap_counts(torch.from_numpy(PRED44), torch.from_numpy(GT44))
    assert {k: v.tolist() for k, v in c.items()} == {"tp": [4], "fp": [4], "fn": [4], "tn": [4]}


def test_metrics_hand_case():
    p, g = torch.from_numpy(PRED44), torch.from_numpy(GT44)
    assert R.dice(p, g).tolist() == pytest.approx([8 / 16])
    m = R.overlap_metrics(p, g)
    assert m["iou"].tolist() == pytest.approx([4 / 12])
    assert m["precision"].tolist() == pytest.approx([4 / 8])
    assert m["recall"].tolist() == pytest.approx([4 / 8])


def test_asymmetric_hand_case():
    # gt 6 px, pred 3 px inside gt plus 1 px outside: tp 3, fp 1, fn 3.
    g = _block((4, 4), slice(0, 2), slice(0, 3))
    p = _block((4, 4), slice(0, 1), slice(0, 3))
    p[3, 3] = True
    m = R.overlap_metrics(p, g)
    assert m["dice"].item() == pytest.approx(6 / 10)
    assert m["iou"].item() == pytest.approx(3 / 7)
    assert m["precision"].item() == pytest.approx(3 / 4)
    assert m["recall"].item() == pytest.approx(3 / 6)


def test_zero_denominator_conventions():
    empty = torch.zeros(4, 4, dtype=torch.bool)
    full = torch.ones(4, 4, dtype=torch.bool)
    pred = torch.stack([empty, empty, full])
    gt = torch.stack([empty, full, empty])
    m = R.overlap_metrics(pred, gt)
    for v in m.values():
        assert not torch.isnan(v).any()
    # empty/empty: perfect; empty pred on vessel: all 0; vessel pred on empty frame: all 0.
    assert m["dice"].tolist() == [1, 0, 0]
    assert m["iou"].tolist() == [1, 0, 0]
    assert m["precision"].tolist() == [1, 0, 0]
    assert m["recall"].tolist() == [1, 0, 0]


def test_batched_shapes_and_int_inputs():
    pred = torch.randint(0, 2, (5, 8, 8))
    gt = torch.randint(0, 2, (5, 8, 8))
    for out in R.overlap_metrics(pred, gt).values():
        assert out.shape == (5,) and out.dtype == torch.float32
    assert R.dice(pred[0], gt[0]).shape == (1,)
    assert R.dice(pred, gt)[2] == R.dice(pred[2], gt[2])[0]
    with pytest.raises(ValueError):
        R.dice(pred, gt[:, :4])


def test_global_dice_from_summed_counts():
    g = torch.rand(6, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.6
    p = torch.rand(6, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5
    c = R.overlap_counts(p, g)
    # Two "ranks" with 2 and 4 samples, summed like an all-reduce.
    summed = {k: c[k][:2].sum() + c[k][2:].sum() for k in ("tp", "fp", "fn")}
    glob = R.metrics_from_counts(summed["tp"], summed["fp"], summed["fn"])
    whole = R.overlap_metrics(p.reshape(1, 6 * 16, 16), g.reshape(1, 6 * 16, 16))
    for k in ("dice", "iou", "precision", "recall"):
        assert glob[k].shape == ()
        assert glob[k].item() == pytest.approx(whole[k].item())
    assert R.metrics_from_counts(0, 0, 0)["dice"].item() == 1.0


# ---------------------------------------------------------------- skeleton metrics

def test_cldice_identical_disjoint_empty():
    v = _vessel()
    other = _block((16, 40), slice(12, 15), slice(5, 35))
    empty = np.zeros_like(v)
    assert R.cldice(v, v) == 1.0
    assert R.cldice(v, other) == 0.0
    assert R.cldice(empty, empty) == 1.0
    assert R.cldice(empty, v) == 0.0 and R.cldice(v, empty) == 0.0
    with pytest.raises(ValueError, match="one pair"):
        R.cldice(np.stack([v, v]), np.stack([v, other]))


def test_cldice_hand_case():
    # 1-px lines are their own skeletons. gt: 10 px in row 2; pred: the first 5 of them.
    g = _block((5, 20), 2, slice(2, 12))
    p = _block((5, 20), 2, slice(2, 7))
    tprec, tsens = 1.0, 5 / 10
    assert R.cldice(p, g) == pytest.approx(2 * tprec * tsens / (tprec + tsens))


def test_broken_vessel_scores_lower_topology_but_keeps_dice():
    intact, one_break = _vessel(), _vessel([slice(19, 21)])
    two_breaks = _vessel([slice(12, 14), slice(25, 27)])
    d = R.dice(torch.from_numpy(one_break), torch.from_numpy(intact)).item()
    assert d > 0.9
    assert _pair("connectivity", intact, intact) == 1.0 and _pair("topology", intact, intact) == 1.0
    assert _pair("connectivity", two_breaks, intact) < _pair("connectivity", one_break, intact) < 1.0
    assert _pair("topology", two_breaks, intact) < _pair("topology", one_break, intact) < 1.0
    # Components: 2 vs 1 -> ratio 1/2, times the GT centreline share still covered.
    assert _pair("connectivity", one_break, intact) < 0.5


def test_betti0_error_counts_pieces():
    intact = _vessel()
    assert _pair("betti0_error", intact, intact) == 0
    assert _pair("betti0_error", _vessel([slice(19, 21)]), intact) == 1
    assert _pair("betti0_error", _vessel([slice(12, 14), slice(25, 27)]), intact) == 2
    island = intact.copy()
    island[1:3, 1:3] = True  # a spurious blob away from the vessel
    assert _pair("betti0_error", island, intact) == 1 and _pair("betti0_error", intact, island) == 1
    empty = np.zeros_like(intact)
    assert _pair("betti0_error", empty, empty) == 0 and _pair("betti0_error", empty, intact) == 1


def test_topology_ranking_prefers_fewer_pieces_at_equal_iou():
    """A vessel cut in the middle vs the same vessel shortened by the same 2 columns: equal pixel
    counts, so equal IoU and Dice; dice_topology ranks the one-piece mask above the broken one."""
    gt = _vessel()
    broken, shortened = _vessel([slice(19, 21)]), _vessel([slice(33, 35)])
    pred = np.stack([broken, shortened])
    s = R.preference_scores(pred, np.stack([gt, gt]), "dice_topology")
    assert s["iou"][0] == s["iou"][1] == pytest.approx(84 / 90)  # exact integer counts: 28 of 30 columns
    assert s["dice"][0] == s["dice"][1]
    assert s["betti0_error"].tolist() == [1.0, 0.0]
    assert s["score"][1] > s["score"][0] + 0.1  # the connectivity term halves for two pieces vs one
    iou_only = R.preference_scores(pred, np.stack([gt, gt]), "iou")
    assert set(iou_only) == {"score", "iou", "dice"} and iou_only["score"][0] == iou_only["score"][1]
    for rank_by in R.RANK_BY:  # the ground truth itself scores 1 on every score
        assert R.preference_scores(gt, gt, rank_by)["score"].tolist() == [1.0]
    with pytest.raises(ValueError, match="rank_by"):
        R.preference_scores(gt, gt, "betti")


def test_mean_pairwise_disagreement_hand_case():
    a = _block((4, 4), slice(0, 2), slice(None))  # top half, 8 px
    b = _block((4, 4), slice(1, 3), slice(None))  # rows 1-2: IoU(a, b) = 4 / 12
    assert R.mean_pairwise_disagreement(np.stack([a, a, a])) == 0.0
    # pairs (a, a), (a, b), (a, b): (0 + 2 (1 - 1/3)) / 3
    assert R.mean_pairwise_disagreement(np.stack([a, a, b])) == pytest.approx(4 / 9)
    empty = np.zeros_like(a)
    assert R.mean_pairwise_disagreement(np.stack([empty, empty])) == 0.0
    assert R.mean_pairwise_disagreement(np.stack([empty, a])) == 1.0
    with pytest.raises(ValueError):
        R.mean_pairwise_disagreement(a[None])


def test_skeleton_length_agreement():
    g = _block((5, 30), 2, slice(2, 22))   # 20-px line
    p = _block((5, 30), 2, slice(2, 12))   # 10-px line
    assert _pair("length", p, g) == pytest.approx(1 - 10 / 20)  # skeleton lengths 10 and 20 px
    assert _pair("length", g, p) == pytest.approx(0.5)
    empty = np.zeros_like(g)
    assert _pair("length", empty, empty) == 1.0
    assert _pair("length", empty, g) == 0.0


def test_skeleton_metrics_batched():
    v = _vessel()
    pred = torch.from_numpy(np.stack([v, _vessel([slice(19, 21)]), np.zeros_like(v)]))
    gt = torch.from_numpy(np.stack([v, v, np.zeros_like(v)]))
    s = R.skeleton_metrics(pred, gt)
    assert set(s) == {"cldice", "connectivity", "topology", "betti0_error", "length"}
    for k, arr in s.items():
        assert isinstance(arr, np.ndarray) and arr.shape == (3,)
        assert not np.isnan(arr).any()
    assert s["topology"][1] == pytest.approx(_pair("topology", pred[1], gt[1]))
    assert s["cldice"][[0, 2]].tolist() == [1.0, 1.0]
    assert set(R.skeleton_metrics(v, v, topology=False)) == {"length"}


# ---------------------------------------------------------------- rewards

KEYS = {"reward", "dice", "recall", "precision", "topology", "cldice", "length"}


@pytest.mark.parametrize("name", ["multi_objective", "simple_dice", "recall_focused"])
def test_perfect_and_empty_predictions(name):
    reward = R.make_reward(name)
    v = _vessel()
    pred = np.stack([v, np.zeros_like(v)])
    gt = np.stack([v, v])
    out = reward(pred, gt)
    assert KEYS <= set(out)
    assert all(isinstance(a, np.ndarray) and a.shape == (2,) for a in out.values())
    assert out["reward"][0] == pytest.approx(1.0)
    assert out["reward"][1] == pytest.approx(0.0)


def test_multi_objective_hand_case():
    # 1-px horizontal lines: gt 20 px, pred its first 10 (no fp).
    g = _block((5, 30), 2, slice(2, 22))
    p = _block((5, 30), 2, slice(2, 12))
    out = R.MultiObjectiveReward()(torch.from_numpy(p), torch.from_numpy(g))
    dice, rec = 20 / 30, 0.5
    cl = 2 * 1.0 * 0.5 / 1.5
    conn = 1.0 * 0.5  # one component each, half the GT centreline covered
    topo = (cl + conn) / 2
    expected = 0.5 * dice + 0.2 * (rec / 0.85) + 0.2 * topo + 0.1 * 0.5
    assert out["topology"][0] == pytest.approx(topo)
    assert out["length"][0] == pytest.approx(0.5)
    assert out["reward"][0] == pytest.approx(expected)


def test_recall_bonus_saturates_at_target():
    g = _block((4, 5), slice(0, 4), slice(0, 5))   # 20 px
    p = g.copy()
    p[0, :3] = False                               # recall 17/20 = 0.85
    out = R.MultiObjectiveReward()(p, g)
    assert out["recall_bonus"][0] == pytest.approx(1.0)


def test_recall_focused_prefers_over_segmentation():
    # gt 12 px; over = gt + 4 fp, under = 9 of 12: both Dice 6/7.
    g = _block((8, 8), slice(2, 5), slice(2, 6))
    over = g.copy()
    over[5, 2:6] = True
    under = g.copy()
    under[4, 3:6] = False
    pred, gt = np.stack([over, under]), np.stack([g, g])
    rf = R.make_reward("recall_focused")(pred, gt)
    sd = R.make_reward("simple_dice")(pred, gt)
    assert rf["dice"] == pytest.approx([6 / 7, 6 / 7])
    gap_rf = rf["reward"][0] - rf["reward"][1]
    gap_sd = sd["reward"][0] - sd["reward"][1]
    assert gap_sd == pytest.approx(0.0)
    assert gap_rf == pytest.approx(0.7 * (1 - 0.75)) and gap_rf > gap_sd


def test_skipped_terms_when_weight_zero(monkeypatch):
    calls = []
    monkeypatch.setattr(R, "skeleton_metrics", lambda *a, **k: calls.append(1))
    out = R.SimpleDiceReward()(_vessel()[None], _vessel()[None])
    assert calls == [] and math.isnan(out["topology"][0]) and math.isnan(out["length"][0])


def test_dynamic_recall_switch():
    r = R.MultiObjectiveReward(dynamic_recall=True)
    assert r.weights() == R.MultiObjectiveReward().weights()  # no recall known yet
    below = r.weights(running_recall=0.79)
    assert below["recall"] == 0.4
    assert sum(below.values()) == pytest.approx(1.0)
    assert below["dice"] == pytest.approx(0.5 * 0.75)
    assert r.weights(running_recall=0.80)["recall"] == 0.2
    r.update_running_recall(0.79)
    assert r.running_recall == pytest.approx(0.79) and r.weights()["recall"] == 0.4
    r.update_running_recall(0.99)  # EMA: 0.9 * 0.79 + 0.1 * 0.99 = 0.81
    assert r.running_recall == pytest.approx(0.81) and r.weights()["recall"] == 0.2
    # Without dynamic_recall the weights never move.
    assert R.MultiObjectiveReward().weights(running_recall=0.1)["recall"] == 0.2
    # The switch shows up in the reward: a recall error costs more while recall is low.
    g = _block((4, 5), slice(0, 4), slice(0, 5))
    p = g.copy()
    p[:2] = False
    lo = r(p, g, running_recall=0.5)["reward"][0]
    hi = r(p, g, running_recall=0.9)["reward"][0]
    assert lo < hi


def test_make_reward_factory():
    r = R.make_reward("multi_objective", dice_weight=0.6, recall_weight=None, recall_target=0.9)
    assert r.weights()["dice"] == 0.6 and r.weights()["recall"] == 0.2 and r.recall_target == 0.9
    assert isinstance(R.make_reward("simple_dice", dice_weight=None), R.SimpleDiceReward)
    assert R.make_reward("recall_focused").weights()["recall"] == 0.7
    with pytest.raises(ValueError):
        R.make_reward("ppo_magic")
    with pytest.raises(TypeError):
        R.make_reward("simple_dice", dice_weight=0.5)
