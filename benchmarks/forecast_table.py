"""The 'forecast' section of docs/science.md from the results ``benchmarks/forecast_science.sh`` keeps.

    python benchmarks/forecast_table.py --out docs/science.md --wall SECONDS DIR [DIR ...]

Each DIR holds one forecast's ``summary.json`` and ``forecast.jsonl`` (copied from RUN/forecast/).
Every figure is read from those files; the statistics are those ``forecast --verify`` defines
(``summary.json``'s ``definitions``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sections  # noqa: E402


def fmt(x, spec="+.2f") -> str:
    return "n/a" if x is None else format(x, spec)


def ci(iv, spec="+.2f") -> str:
    if iv is None or iv.estimate is None:
        return "n/a"
    if iv.low is None:
        return fmt(iv.estimate, spec)
    return f"{fmt(iv.estimate, spec)} [{fmt(iv.low, spec)}, {fmt(iv.high, spec)}]"


def corr(c) -> str:
    if c is None or c.value is None:
        return "n/a"
    if c.ci_low is None:
        return fmt(c.value)
    return f"{fmt(c.value)} [{fmt(c.ci_low)}, {fmt(c.ci_high)}]"


def load(d: Path):
    from gradcouple.artifacts import ForecastRow, ForecastSummary

    s = ForecastSummary.model_validate_json((d / "summary.json").read_text(encoding="utf-8"))
    rows = [ForecastRow.model_validate_json(line) for line in (d / "forecast.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return s, rows


def section(dirs: list[Path], wall: float) -> str:
    loaded = [(d, *load(d)) for d in dirs]
    s0 = loaded[0][1]
    k = s0.verify.k if s0.verify else s0.top_k
    lines = [
        "## Forecast: which stored facts will an edit move?",
        "",
        f"`benchmarks/forecast_science.sh` ({wall / 60:.1f} min on this machine): `gradcouple run --datasets "
        "rippleedits:30,musique --no-ripple` (SmolLM2-135M, blocks 26-29, the `factors` store: "
        f"{s0.n_pieces} stored pieces), then the other 30 bundled RippleEdits records written as an EasyEdit / KnowEdit "
        "file and as a CounterFact file (`benchmarks/forecast_files.py`: portability = the compositional queries, "
        "locality = their condition facts; paraphrases from two templates per relation, neighbourhoods = other records' "
        f"prompts with the same relation and true target), each forecast with `--verify {k}` and the run's edit method "
        f"({s0.method}, its published settings for this model); ROME (its published block 4 for this model) forecast on the "
        "first 10 CounterFact edits from a second extraction of the same pieces with block 4 beside 26-29 (its GradSim "
        f"and inner product are over the five blocks). Per edit, every predictor's top {k} by |score|, an equal "
        "seeded sample of the other stored pieces and the edit's own tests are measured after the edit is made (weights "
        "restored after). Spearman's rho is pooled over every measured (edit, piece) pair with the clustered bootstrap "
        "interval over edits; the other columns are means over edits with their bootstrap intervals.",
        "",
        f"| edit file | edits (verified; edit success) | measured pairs | predictor | Spearman's rho | within-edit rho | "
        f"precision@{k} (random ranking) | own-test recall@{k} | locality tests in top {k} | mean \\|change\\| top {k} / sample (nats) |",
        "|---|---|---:|---|---|---|---|---|---|---|",
    ]
    for d, s, _ in loaded:
        v = s.verify
        ok = sum(1 for e in s.edits if e.success)
        for j, (name, c) in enumerate(v.predictors.items()):
            head = (f"{s.format} ({Path(s.edits_file).name}), {s.method}", f"{v.n_edits}; {ok}/{len(s.edits)}",
                    f"{v.n_measured:,}") if j == 0 \
                else ("", "", "")
            lines.append(f"| {head[0]} | {head[1]} | {head[2]} | {name} | {corr(c.spearman)} | {ci(c.within_edit_spearman)} | "
                         f"{ci(c.precision_at_k, '.2f')} ({fmt(v.precision_at_k_chance, '.2f')}) | {ci(c.recall_own_tests, '.2f')} | "
                         f"{ci(c.stable_tests_in_top_k, '.2f')} | {fmt(c.mean_abs_change_top_k, '.3f')} / "
                         f"{fmt(c.mean_abs_change_sample, '.3f')} |")
    d, s, rows = next((x for x in loaded if x[1].format == "counterfact"), loaded[-1])
    e = s.edits[0]
    top = sorted((r for r in rows if r.edit == e.id and r.predictor == "first_order" and r.rank <= 5), key=lambda r: r.rank)
    lines += ["", f"The first {s.format} edit ({s.method}), \"{e.rewrites[0].prompt} → {e.rewrites[0].target}\", its top 5 "
                  f"under first_order with the measured change:", "",
              "| rank | first order (nats) | piece | measured change (nats) |", "|---:|---:|---|---:|"]
    for r in top:
        where = f"own test, {r.criterion}" if r.own_test else "stored"
        lines.append(f"| {r.rank} | {r.score:+.3f} | {r.prompt} → {r.answer} ({where}) | {fmt(r.change, '+.3f')} |")
    parts = []
    for _, s, _ in loaded:
        secs = [x.seconds for x in s.edits]
        mean = {key: sum(x.get(key, 0.0) for x in secs) / len(secs) for key in ("gradient", "scores", "edit", "verify")}
        parts.append(f"{s.format} with {s.method}: " + ", ".join(f"{key} {v:.2f}" for key, v in mean.items()))
    lines += ["", "Seconds per edit (mean; scores: every predictor over every stored piece and the edit's own tests): "
              + "; ".join(parts) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--wall", type=float, default=0.0)
    args = ap.parse_args(argv)
    sections.put(args.out, "forecast", section(args.dirs, args.wall))
    print(f"wrote the forecast section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
