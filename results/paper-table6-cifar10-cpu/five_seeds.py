"""What RESULTS.md draws from five-seeds/ beyond its table.md, with SciPy.

1. Whether seeds 1-3 of the five-seed runs reproduce run.sh's (results.csv and
   efficient-step/results.csv, 2026-12-07): the same final top-1 to the CSV's 4 decimals.
2. The efficient row with its step decay inside the 10 epochs (five-seeds/efficient-step/) and the
   comparisons across rows that are not "the row above", paired by seed (scipy.stats.ttest_rel),
   each with its 95 % interval and the verdict `tricks report` would give it.

Run from the repository root: .venv/bin/python results/paper-table6-cifar10-cpu/five_seeds.py
"""

import csv
import math
import sys
from pathlib import Path

from scipy import stats

HERE = Path(__file__).parent
FIVE = HERE / "five-seeds"
STEP = "efficient, step decay at 5 and 8"
SEEDS = [1, 2, 3, 4, 5]


def read(*paths):
    """{variant: {seed: final top-1}} over the finished runs of the given results.csv files."""
    top1 = {}
    for p in paths:
        for r in csv.DictReader(open(p)):
            if r["status"] == "done":
                top1.setdefault(r["variant"], {})[int(r["seed"])] = float(r["top1"])
    return top1


def values(top1, variant, seeds=SEEDS):
    got = top1.get(variant, {})
    missing = [s for s in seeds if s not in got]
    if missing:
        sys.exit(f"variant {variant!r} lacks seeds {missing}")
    return [got[s] for s in seeds]


def mean_ci(v):
    n = len(v)
    mean = sum(v) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    return mean, std, stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)


def paired(a, b):
    """Δ = mean(a - b) paired by seed, its 95 % half-width, p (ttest_rel) and verdict."""
    mean, _, half = mean_ci([x - y for x, y in zip(a, b)])
    p = stats.ttest_rel(a, b).pvalue
    verdict = "better" if mean - half > 0 else "worse" if mean + half < 0 else "no difference detected"
    return mean, half, p, verdict


def main():
    five = read(FIVE / "results.csv", FIVE / "efficient-step" / "results.csv")
    three = read(HERE / "results.csv", HERE / "efficient-step" / "results.csv")

    print("Seeds 1-3 against run.sh's runs (final top-1, %):")
    same = True
    for variant in three:
        a, b = values(five, variant, [1, 2, 3]), values(three, variant, [1, 2, 3])
        ok = all(abs(x - y) < 5e-5 for x, y in zip(a, b))
        same &= ok
        print(f"- {variant}: {' / '.join(f'{x:.2f}' for x in a)}"
              + (" (identical)" if ok else f" against {' / '.join(f'{y:.2f}' for y in b)}"))
    print("all identical" if same else "NOT all identical")
    print()

    mean, std, half = mean_ci(values(five, STEP))
    print(f"{STEP}: " + " / ".join(f"{x:.2f}" for x in values(five, STEP))
          + f"; {mean:.2f} ± {std:.2f}, 95 % CI {mean - half:.2f} – {mean + half:.2f}")
    print()
    print("Comparisons, paired by seed (seeds 1-5):")
    for a, b in [
        ("+cosine decay", STEP),
        ("+mixup, no distillation", "+label smoothing"),
        ("+mixup and distillation", "+distillation"),
    ]:
        d, dh, p, verdict = paired(values(five, a), values(five, b))
        print(f"- {a} against {b}: {d:+.2f} ± {dh:.2f} (p = {p:.3g}), {verdict}")


if __name__ == "__main__":
    main()
