"""The tables of the science campaign (benchmarks/science_campaign.sh) in docs/science.md, from its run
directories: per edit set and method, efficacy and every predictor's pooled and within-edit Spearman's
rho with their intervals; per relation of the edited fact, each predictor's within-edit rho.

    python benchmarks/campaign_table.py --out docs/science.md runs/science/campaign/rippleedits-ft ...

Every figure is the summary's own (``gradcouple.metrics``: Spearman's rho, the clustered bootstrap
interval of pooled figures, the bootstrap interval of the mean within-edit rho); the per-relation
table groups the successful edits' tests by the relation of the edit piece's triple and computes the
within-edit rho and its interval with the same functions. Writes the ``campaign`` section of
``--out`` (stdout without it).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from sections import put

from gradcouple.rundir import RunDir
from gradcouple.stages.benchmark import within_edit_spearman

#: the predictors of the per-relation table (the others are in the pooled one)
RELATION_PREDICTORS = ("gradsim", "first_order", "inner_product", "key_inner_product", "prior_logprob", "whitened_key")


def corr(c) -> str:
    if c is None or c.value is None:
        return "n/a"
    return f"{c.value:+.2f}" if c.ci_low is None else f"{c.value:+.2f} [{c.ci_low:+.2f}, {c.ci_high:+.2f}]"


def iv(i) -> str:
    if i is None or i.estimate is None:
        return "n/a"
    return f"{i.estimate:+.2f}" if i.low is None else f"{i.estimate:+.2f} [{i.low:+.2f}, {i.high:+.2f}]"


def num(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def label(path: Path) -> str:
    return path.name.rsplit("-", 1)[0]


def tables(paths: list[Path]) -> str:
    eff = ["| edits | method | blocks | edits made | efficacy (counted) | tests counted | specificity (nats) | locality | "
           "s / edit |", "|---|---|---|---:|---|---:|---:|---:|---:|"]
    pooled = ["| edits | method | predictor | Spearman's rho pooled [95% CI] | mean within-edit rho [95% CI] | AUROC |",
              "|---|---|---|---|---|---:|"]
    rel = [f"| method | relation of the edited fact | edits | tests | {' | '.join(RELATION_PREDICTORS)} |",
           "|---|---|---:|---:|" + "---|" * len(RELATION_PREDICTORS)]
    for path in paths:
        run = RunDir(path)
        pieces = {p.id: p for p in run.load_pieces()}
        for res in run.ripple.sets():
            if not res.exists():
                continue
            s, tests = res.load()
            if s.mode != "benchmark":
                continue
            m = s.metrics
            blocks = s.hparams.get("layers") or "all targets"
            secs = sum(e.seconds for e in s.edits) / max(1, len(s.edits))
            efficacy = f"{m.n_successful_counted}/{m.n_counted} ({100 * (m.efficacy or 0):.0f}%)" if m.n_counted else "n/a"
            eff.append(f"| {label(path)} | {s.method} | {blocks} | {s.n_edits} | {efficacy} | {s.n_tests_counted} | "
                       f"{num(m.specificity.mean, '+.3f')} | {num(m.locality.mean, '.3f')} | {secs:.1f} |")
            for name, p in s.predictors.items():
                pooled.append(f"| {label(path)} | {s.method} | {name} | {corr(p.pooled.spearman)} | "
                              f"{iv(p.pooled.within_edit_spearman)} | "
                              f"{'n/a' if p.pooled.auroc is None else f'{p.pooled.auroc:.3f}'} |")
            ok = [t for t in tests if t.edit_success]
            if label(path) != "rippleedits" or not ok:
                continue
            by_rel = defaultdict(list)
            for t in ok:
                e = pieces.get(t.edit_id)
                by_rel[e.triple.relation if e is not None and e.triple else "unknown"].append(t)
            rows = sorted(by_rel.items(), key=lambda kv: (-len({t.edit for t in kv[1]}), kv[0]))
            for relation, ts in [("all (pooled)", ok), *rows]:
                cells = " | ".join(iv(within_edit_spearman(ts, n)) for n in RELATION_PREDICTORS)
                rel.append(f"| {s.method} | {relation} | {len({t.edit for t in ts})} | {len(ts)} | {cells} |")
    return "\n".join(["### Efficacy and the field's metrics", "", *eff, "", "### Every predictor, pooled", "", *pooled,
                      "", "### Per relation of the edited fact (RippleEdits; mean within-edit Spearman's rho [95% "
                      "bootstrap interval]; edits: the successful ones, of which only those with three or more tests have a "
                      "rho; one such edit gives no interval)", "", *rel])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--wall", type=float, default=None, help="the campaign's wall time (s)")
    ap.add_argument("--n-ported", default=None, help="edits the ported methods made: RippleEdits/MQuAKE")
    ap.add_argument("--note", default="", help="a sentence added to the header (how the runs were made, if not in one go)")
    a = ap.parse_args()
    head = ["## At scale: the campaign", "",
            "`benchmarks/science_campaign.sh` (SmolLM2-135M, 2-core CPU): every record of the shared RippleEdits sample "
            "and of the MQuAKE-hard sample; ft on every edit (blocks 26-29, GradSim's layers), the ported methods on "
            f"the first {a.n_ported or 'N'} edits of the RippleEdits/MQuAKE sets (their blocks 4-8 extracted "
            "beside 26-29, GradSim over 26-29); ft's learning-rate sweep is drawn in the report "
            "(`runs/science/campaign/rippleedits-ft/report/index.html`, 'Sweep')."
            + (f" Wall time {a.wall / 60:.1f} min." if a.wall is not None else "") + (f" {a.note}" if a.note else ""), "", ""]
    text = "\n".join(head) + tables(a.paths) + "\n"
    if a.out:
        put(a.out, "campaign", text)
    print(text)


if __name__ == "__main__":
    main()
