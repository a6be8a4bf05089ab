"""The edit-method tables of docs/science.md, from run directories: efficacy and the field's other
metrics per method and edit set, the layer sweeps, and every predictor's pooled figures per method.

    python benchmarks/methods_table.py --out docs/science.md runs/science/methods/shared runs/science/methods/heldback

Each run directory contributes every result set in it (one per method and settings); sets are
labelled by the run directory's name; the predictor table leaves out sets of fewer than ``--min-edits``
edits (10), whose correlations would rest on a handful of points. Writes the sections ``edit-methods``, ``layer-sweeps`` and
``method-predictors`` of ``--out`` (stdout without it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sections import put

from gradcouple.rundir import RunDir


def pct(n: int, d: int) -> str:
    return f"{n}/{d} ({100 * n / d:.0f}%)" if d else "n/a"


def f(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def corr(c) -> str:
    if c.value is None:
        return "n/a"
    return f"{c.value:+.2f}" if c.ci_low is None else f"{c.value:+.2f} [{c.ci_low:+.2f}, {c.ci_high:+.2f}]"


def tables(paths: list[Path], min_edits: int = 10) -> dict[str, str]:
    eff = ["| edits | method | layers | settings from | edits made | already satisfied | same target | efficacy "
           "| log P(new) rise, median (nats) | specificity, mean Δ log P (nats) | locality | portability | exact match "
           "after | s / edit |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    sweep = ["| edits | method | layers | efficacy | already satisfied | log P(new) rise, median (nats) | specificity, "
             "mean Δ log P (nats) | locality |", "|---|---|---|---|---|---|---|---|"]
    pred = ["| edits | method | predictor | Spearman's rho [95% CI] | Pearson r [95% CI] | AUROC |", "|---|---|---|---|---|---|"]
    for path in paths:
        label = path.name
        for res in RunDir(path).ripple.sets():
            if res.layer_sweep_path.is_file():
                sw = res.load_layer_sweep()
                for p in sw.points:
                    what = f"{sw.method} (C⁻¹ keys)" if sw.hparams.get("mom2_adjustment") else sw.method
                    sweep.append(f"| {label} | {what} | {','.join(map(str, p.layers))} | "
                                 f"{pct(p.n_successful_counted, p.n_counted)} | {p.n_already_satisfied} | "
                                 f"{f(p.efficacy_magnitude.median, '+.1f')} | {f(p.specificity.mean, '+.3f')} | "
                                 f"{f(p.locality.mean, '.3f')} |")
            if res.sweep_path.is_file():
                sw = res.load_sweep()
                for p in sw.points:
                    m = p.metrics
                    if m is not None:
                        sweep.append(f"| {label} | {sw.method} ({sw.knob} = {p.strength:g}) | default | "
                                     f"{pct(m.n_successful_counted, m.n_counted)} | {m.n_already_satisfied} | "
                                     f"{f(m.efficacy_magnitude.median, '+.1f')} | {f(m.specificity.mean, '+.3f')} | "
                                     f"{f(m.locality.mean, '.3f')} |")
            if not res.exists():
                continue
            s, _ = res.load()
            if s.mode != "benchmark" or s.metrics is None:
                continue
            m, layers = s.metrics, s.hparams.get("layers")
            where = "all target layers" if layers is None else ",".join(map(str, layers))
            source = (s.method_source or "").replace("the method's defaults", "defaults")
            eff.append(f"| {label} | {s.method} | {where} | {source} | {m.n_edits} | {m.n_already_satisfied} | "
                       f"{m.n_same_target} | {pct(m.n_successful_counted, m.n_counted)} | "
                       f"{f(m.efficacy_magnitude.median, '+.1f')} | {f(m.specificity.mean, '+.3f')} | "
                       f"{f(m.locality.mean, '.3f')} | {f(m.portability.get('pooled'), '.3f')} | "
                       f"{f(m.exact_match_after.get('pooled'), '.3f')} | {s.seconds / max(1, s.n_edits):.0f} |")
            if s.n_edits < min_edits:
                continue
            for name, rep in s.predictors.items():
                p = rep.pooled
                pred.append(f"| {label} | {s.method} | {name} | {corr(p.spearman)} | {corr(p.pearson)} | "
                            f"{f(p.auroc, '.3f')} |")
    return {"edit-methods": "\n".join(eff), "layer-sweeps": "\n".join(sweep), "method-predictors": "\n".join(pred)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--min-edits", type=int, default=10, help="leave sets of fewer edits out of the predictor table")
    args = ap.parse_args()
    for name, text in tables(args.runs, args.min_edits).items():
        if args.out:
            put(args.out, name, text)
        else:
            print(f"{text}\n")


if __name__ == "__main__":
    main()
