"""Stage gains over several seeds: each stage against its own start, mean and 95% interval.

A stage is worth its cost only if it beats the model it started from, on frames it did not
train on, by more than the run-to-run noise. One run per seed (`SEEDS=3 bash run.sh ...` writes
`<OUT>/seed_<k>/eval/summary.json`); for each stage the gain is paired per seed
(stage - its start, same seed, same frames), and its 95% interval is Student's t over seeds.

    python -m common.seeds outputs/full/seed_*/eval/summary.json --output outputs/full/gains.md
"""
import argparse
import json
import math

import numpy as np

# where each stage of run.sh starts (MISSION: SFT -> DPO -> hard; PPO from SFT)
STARTS = {"sft": "base", "dpo": "sft", "hard": "dpo", "ppo": "sft"}


def interval(values, confidence=0.95):
    """(mean, low, high) of the mean of `values` by Student's t; low = high = nan for one value."""
    from scipy import stats
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def verdict(mean, low, high):
    """'gain' when the interval lies above 0, 'regression' below, else 'no measurable gain'."""
    if math.isnan(low):
        return "one seed: no interval"
    if low > 0:
        return "gain"
    if high < 0:
        return "regression"
    return "no measurable gain"


def stage_gains(summaries, metric="mean_dice", starts=STARTS):
    """Rows dict(stage, start, values, mean, gain, low, high, verdict) for every stage of `starts`
    present with its start in every summary (evaluate.py's summary.json dicts, one per seed)."""
    rows = []
    for stage, start in starts.items():
        if not all(stage in s["checkpoints"] and start in s["checkpoints"] for s in summaries):
            continue
        values = [s["checkpoints"][stage][metric] for s in summaries]
        gains = [s["checkpoints"][stage][metric] - s["checkpoints"][start][metric] for s in summaries]
        mean, low, high = interval(gains)
        rows.append(dict(stage=stage, start=start, values=values, mean=float(np.mean(values)), gain=mean, low=low,
                         high=high, verdict=verdict(mean, low, high)))
    return rows


def gains_table(summaries, metric="mean_dice"):
    """A markdown table: every checkpoint's mean over seeds, each stage's gain over its start."""
    names = [n for n in summaries[0]["checkpoints"] if all(n in s["checkpoints"] for s in summaries)]
    by_stage = {r["stage"]: r for r in stage_gains(summaries, metric)}
    lines = [f"{len(summaries)} seeds; {metric} on {summaries[0].get('samples', '?')} {summaries[0].get('split', '')} "
             f"frames; gain = stage - its start, paired by seed, 95% interval (Student's t)",
             "", "| checkpoint | mean | per seed | start | gain over start [95% interval] | verdict |",
             "|---|---|---|---|---|---|"]
    for name in names:
        values = [s["checkpoints"][name][metric] for s in summaries]
        r = by_stage.get(name)
        gain = f"{r['gain']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]" if r else ""
        lines.append(f"| {name} | {np.mean(values):.4f} | {' '.join(f'{v:.4f}' for v in values)} | "
                     f"{r['start'] if r else ''} | {gain} | {r['verdict'] if r else ''} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("summaries", nargs="+", help="evaluate.py summary.json files, one per seed")
    p.add_argument("--metric", default="mean_dice", help="summary field compared")
    p.add_argument("--output", default=None, help="also write the table to this markdown file")
    args = p.parse_args()
    summaries = []
    for path in args.summaries:
        with open(path) as f:
            summaries.append(json.load(f))
    table = gains_table(summaries, args.metric)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
