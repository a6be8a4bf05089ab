"""``gradcouple ripple``: real edits, measured ripple effects, and how well coupling predicts them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import ConfigError
from ..rundir import RunDir
from .options import (
    ConfigOpt,
    DeviceOpt,
    RunDirOpt,
    ThreadsOpt,
    build_config,
    console,
    correlation,
    interval,
    num,
    print_notes,
    print_path,
    summary_table,
)

EPILOG = """Examples:

  gradcouple ripple --run runs/rippleedits                      # the benchmark's own edits and test queries

  gradcouple ripple --run runs/rippleedits --method rome --n-edits 40

  gradcouple ripple --run runs/musique --edits pieces --n-edits 20 --steps 5 --lr 5e-4

  gradcouple ripple --run runs/rippleedits --sweep 1e-4,3e-4,1e-3        # one set of edits at three strengths
"""


def benchmark_table(s):
    """Every predictor's pooled Spearman and Pearson (95% CI), AUROC, and the edits' success and exact match."""
    t = Table(title=f"ripple ({s.method}): {s.n_successful}/{s.n_edits} edits succeeded, {s.n_tests_counted} test queries "
                    f"counted; exact match {num(s.exact_match['pooled'].before, '.2f')} -> {num(s.exact_match['pooled'].after, '.2f')}",
              title_justify="left")
    for col in ("predictor", "Spearman's rho [95% CI]", "Pearson r [95% CI]", "AUROC"):
        t.add_column(col)
    for name, rep in s.predictors.items():
        p = rep.pooled
        t.add_row(name, correlation(p.spearman), correlation(p.pearson), num(p.auroc, ".3f"))
    if "shuffled" in s.predictors and all(e.n_tests <= 1 for e in s.edits if e.success):
        t.caption = ("shuffled reads as gradsim here: every edit has one test query, so permuting scores within an edit "
                     "changes nothing (only its AUROC, across edits, differs).")
        t.caption_justify = "left"
    return t


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=flag) from None


def sweep_table(sw):
    """Per strength: successful edits, own-test rise, unrelated change, GradSim and first-order Spearman (95% CI)."""
    t = Table(title=f"ripple sweep ({sw.method}, {sw.knob})", title_justify="left")
    for col in (sw.knob, "successful", "own tests rise (nats)", "unrelated change (nats)", "GradSim rho [95% CI]",
                "first-order rho [95% CI]"):
        t.add_column(col)
    for p in sw.points:
        t.add_row(f"{p.strength:g}", f"{p.n_successful}/{p.n_edits}", num(p.mean_rise_own_tests.mean, "+.3f"),
                  num(p.unrelated_change.mean, "+.3f"), correlation(p.spearman["gradsim"]), correlation(p.spearman["first_order"]))
    return t


#: ripple's flags that set one edit method's knobs: flag -> the method that uses it
METHOD_FLAGS = {"--steps": "ft", "--lr": "ft", "--max-delta": "ft", "--rome-clamp": "rome"}
#: the knob each method's --sweep varies
SWEPT = {"ft": "--lr", "rome": "--rome-clamp"}


def refuse_unused_flags(cfg, run: Path, given: dict[str, object]) -> None:
    """Refuse ripple flags the edits would ignore: another method's knobs, the knob --sweep varies,
    and --sweep itself outside benchmark mode.

    Raises:
        ConfigError: the first such flag, with the way to make it count.
    """
    method = cfg.ripple.method
    for flag, value in given.items():
        if METHOD_FLAGS.get(flag, method) != method:
            knobs = ", ".join(f for f, m in METHOD_FLAGS.items() if m == method)
            raise ConfigError(f"{flag} {value}: applies to --method {METHOD_FLAGS[flag]}, and these edits are {method} "
                              f"(whose knobs are {knobs}); drop {flag} or pass --method {METHOD_FLAGS[flag]}.")
    if "--sweep" not in given:
        return
    knob = SWEPT[method]
    if knob in given:
        raise ConfigError(f"{knob} {given[knob]}: --sweep {given['--sweep']} sets {knob} of every {method} edit, one "
                          f"strength after another; drop {knob} or --sweep.")
    from ..stages.ripple import edit_mode  # deferred: torch and transformers (the stage), so `--help` stays fast

    if edit_mode(cfg, RunDir(run).load_pieces()) != "benchmark":
        why = "--edits pieces was given" if given.get("--edits") == "pieces" else f"the pieces in {run} carry no benchmark edit"
        raise ConfigError(f"--sweep {given['--sweep']}: a sweep repeats the benchmark's edits (RippleEdits, MQuAKE) at "
                          f"each strength, but {why}; drop --sweep, or run ripple on benchmark pieces.")


def ripple(
    run: RunDirOpt = Path("runs/default"),
    edits: Annotated[Optional[str], typer.Option("--edits", help="benchmark (the edits the pieces carry), pieces (edit pieces "
                                                  "toward counterfactuals, measure every other piece) or auto (default).")] = None,
    n_edits: Annotated[Optional[int], typer.Option("--n-edits", "-n", help="How many edits to make, one at a time (default 10).")] = None,
    method: Annotated[Optional[str], typer.Option(help="ft (fine-tuning: Adam on all target layers; FT-L with --max-delta) or rome (rank-one update of one layer).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Adam steps per ft edit (at most: it stops once the new target is greedy).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate of an ft edit.")] = None,
    max_delta: Annotated[Optional[float], typer.Option("--max-delta", help="FT-L bound on each weight's change (L-infinity).")] = None,
    rome_clamp: Annotated[Optional[float], typer.Option("--rome-clamp", help="Max |delta| of a rome value as a multiple of |W k*|.")] = None,
    sweep: Annotated[Optional[str], typer.Option("--sweep", help="Benchmark edits at several strengths, e.g. 1e-4,1e-3 (ft: "
                                                  "learning rates; rome: value clamps) -> RUN/ripple/sweep.json.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for the choice of edited pieces.")] = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Make real edits (the benchmark's own, or pieces toward counterfactuals) and score how well each predictor foresees the ripple.

    The model, layers, prompt template, max length and batch size are those of the extraction
    in RUN; only the device can differ. Flags the edits would ignore are refused: --steps, --lr
    and --max-delta with --method rome, --rome-clamp with ft, the knob --sweep varies, and
    --sweep outside benchmark mode. Every finished edit is journalled, so an interrupted
    ripple resumes: rerun the same command and only the missing edits are made.
    """
    from ..stages import ripple as stage  # deferred: torch and transformers (the stage), so `--help` stays fast

    cfg = build_config(config, run, {"ripple.edits": edits, "ripple.n_edits": n_edits, "ripple.method": method,
                                     "ripple.steps": steps, "ripple.lr": lr, "ripple.max_delta": max_delta,
                                     "ripple.rome_clamp": rome_clamp, "ripple.seed": seed, "model.device": device,
                                     "model.threads": threads, "ripple.sweep": _floats(sweep, "--sweep") if sweep else None})
    refuse_unused_flags(cfg, run, {k: v for k, v in (("--steps", steps), ("--lr", lr), ("--max-delta", max_delta),
                                                      ("--rome-clamp", rome_clamp), ("--sweep", sweep), ("--edits", edits))
                                   if v is not None})
    res = stage.ripple(cfg, run)
    done = res.summary or res.sweep
    if getattr(done, "resumed_edits", 0):
        n = done.resumed_edits
        console.print(f"resumed: {n} edit{'s' if n != 1 else ''} read back from the journal of an interrupted run, the rest made now.")
    if res.summary is not None:
        print_notes(res.summary.device)
    if res.sweep is not None:
        console.print(sweep_table(res.sweep))
        print_path(RunDir(run).ripple.sweep_path)
        return
    s = res.summary
    if s.mode == "benchmark":
        console.print(benchmark_table(s))
        print_path(RunDir(run).ripple.summary_path)
        return
    console.print(summary_table("ripple", [
        ("edits", f"{s.n_edits} ({s.n_successful} successful)"),
        ("Spearman's rho, coupling (mean over edits, 95% CI)", interval(s.spearman_coupling)),
        ("Spearman's rho, first order (mean over edits, 95% CI)", interval(s.spearman_first_order)),
        ("Spearman's rho, coupling (pooled)", num(s.pooled.spearman_coupling, "+.3f")),
        ("precision@k (mean over edits, 95% CI)", interval(s.precision_at_k)),
        ("time", f"{s.seconds:.1f} s")]))
    print_path(RunDir(run).ripple.summary_path)
