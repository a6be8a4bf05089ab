"""The ripple science table from benchmark run directories: predictor x criterion x method,
Pearson and Spearman with 95% clustered bootstrap intervals, AUROC, edit success.

    python benchmarks/ripple_table.py runs/science/rippleedits-ft runs/science/rippleedits-rome ... > table.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from gradcouple.rundir import RunDir


def corr(c) -> str:
    if c.value is None:
        return "n/a"
    if c.ci_low is None:
        return f"{c.value:+.2f}"
    return f"{c.value:+.2f} [{c.ci_low:+.2f}, {c.ci_high:+.2f}]"


def main(paths: list[str]) -> None:
    print("| run | method | edits (successful) | tests counted | exact match before → after | unrelated Δ log P (nats) | seconds |")
    print("|---|---|---|---|---|---|---|")
    runs = []
    for p in paths:
        s, _ = RunDir(p).ripple.load()
        if s.mode != "benchmark":
            raise SystemExit(f"{p}: not a benchmark ripple run")
        runs.append((Path(p).name, s))
        em = s.exact_match["pooled"]
        print(f"| {Path(p).name} | {s.method} | {s.n_edits} ({s.n_successful}) | {s.n_tests_counted} | "
              f"{em.before:.3f} → {em.after:.3f} | {s.unrelated_change.mean:+.3f} ± {s.unrelated_change.std:.3f} | {s.seconds:.0f} |")
    print()
    print("| run | predictor | set | points / edits | Spearman's rho [95% CI] | Pearson r [95% CI] | AUROC | mean within-edit rho |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in runs:
        for pred, rep in s.predictors.items():
            sets = [("pooled", rep.pooled), ("pooled, condition known", rep.pooled_condition_known), *rep.criteria.items()]
            for label, sc in sets:
                w = sc.within_edit_spearman
                within = "n/a" if w.estimate is None else f"{w.estimate:+.2f}"
                auroc = "n/a" if sc.auroc is None else f"{sc.auroc:.3f}"
                print(f"| {name} | {pred} | {label} | {sc.spearman.n_points} / {sc.spearman.n_edits} | {corr(sc.spearman)} | "
                      f"{corr(sc.pearson)} | {auroc} | {within} |")


if __name__ == "__main__":
    main(sys.argv[1:])
