"""``gradcouple ripple``: real edits, measured ripple effects, and how well coupling predicts them."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..edits import METHODS
from ..resolve import help_text
from .options import (
    ConfigOpt,
    DeviceOpt,
    EditsOpt,
    HparamsOpt,
    MethodOpt,
    NEditsOpt,
    RunDirOpt,
    ThreadsOpt,
    console,
    correlation,
    interval,
    num,
    opt,
    print_notes,
    print_path,
    summary_table,
)

EPILOG = """Examples:

  gradcouple ripple --run runs/rippleedits                      # the benchmark's own edits and test queries

  gradcouple ripple --run runs/rippleedits --method rome --n-edits 40

  gradcouple ripple --run runs/musique --edits pieces --n-edits 20 --steps 5 --lr 5e-4

  gradcouple ripple --run runs/rippleedits --sweep lr=1e-4,3e-4,1e-3     # one set of edits at three learning rates

  gradcouple ripple --run runs/rippleedits --method rome --sweep clamp-norm-factor=1,4   # at two value clamps

  gradcouple ripple --run runs/rippleedits --method rome --layer-sweep all --n-edits 10   # where to edit this model

  gradcouple ripple --run runs/rippleedits --method memit --batch-size 10 --sequential    # as MEMIT is used
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


def layer_sweep_table(sw):
    """Per block: efficacy over the edits not already satisfied, its magnitude, specificity and locality."""
    t = Table(title=f"layer sweep ({sw.method})", title_justify="left")
    for col in ("layers", "efficacy", "already satisfied", "log P(new) rise (nats)", "specificity (nats)", "locality",
                "seconds"):
        t.add_column(col)
    for p in sw.points:
        t.add_row(",".join(map(str, p.layers)), f"{p.n_successful_counted}/{p.n_counted}", str(p.n_already_satisfied),
                  num(p.efficacy_magnitude.median, "+.1f"), num(p.specificity.mean, "+.3f"), num(p.locality.mean, ".3f"),
                  f"{p.seconds:.0f}")
    return t


def _knob_parameters() -> list[inspect.Parameter]:
    """One option per knob flag of the registered edit methods (a flag several methods share, such as
    --edit-layers, sets that knob of whichever is chosen; a method's knobs are refused with the
    others' by the config rules), typed as the knob's field (a list as its text)."""
    owners: dict[str, list[tuple[type, str]]] = {}
    for cls in METHODS.values():
        for knob, flag in cls.knobs().items():
            if flag:
                owners.setdefault(flag, []).append((cls, knob))
    out = []
    for flag, found in owners.items():
        cls, knob = found[0]
        kind = cls.Hparams.model_fields[knob].annotation
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        kind = str if typing.get_origin(kind) in (list, typing.Annotated) or kind is list else kind
        help_ = help_text(f"ripple.hparams.{cls.name}.{knob}")
        out.append(inspect.Parameter(flag.lstrip("-").replace("-", "_"), inspect.Parameter.KEYWORD_ONLY, default=None,
                                     annotation=Annotated[Optional[kind], typer.Option(flag, help=help_, show_default=False)]))
    return out


def ripple(
    run: RunDirOpt = Path("runs/default"),
    edits: EditsOpt = None,
    n_edits: NEditsOpt = None,
    method: MethodOpt = None,
    hparams: HparamsOpt = None,
    sweep: Annotated[Optional[str], opt("ripple.sweep", "--sweep")] = None,
    layer_sweep: Annotated[Optional[str], opt("ripple.layer_sweep", "--layer-sweep")] = None,
    batch_size: Annotated[Optional[int], opt("ripple.batch_size", "--batch-size")] = None,
    sequential: Annotated[Optional[bool], opt("ripple.sequential", "--sequential")] = None,
    full_model: Annotated[Optional[bool], opt("ripple.full_model", "--full-model")] = None,
    seed: Annotated[Optional[int], opt("ripple.seed", "--seed")] = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    config: ConfigOpt = None,
    **knobs,
) -> None:
    """Make real edits (the benchmark's own, or pieces toward counterfactuals) and score how well each predictor foresees the ripple.

    The model, layers, prompt template, max length and batch size are those of the extraction
    in RUN; only the device can differ. Flags the edits would ignore are refused: another
    method's knobs (--lr with --method rome), the knob --sweep varies, and --sweep outside
    benchmark mode. Every finished edit is journalled, so an interrupted ripple resumes: rerun
    the same command and only the missing edits are made.
    """
    from .. import api  # deferred: torch and transformers (the stages), so `--help` stays fast

    res = api.ripple(run, config=config, show_progress=True, edits=edits, n_edits=n_edits, method=method,
                     hparams=hparams, sweep=sweep, layer_sweep=layer_sweep, batch_size=batch_size, sequential=sequential,
                     full_model=full_model, seed=seed, device=device, threads=threads, **knobs)
    if res.layer_sweep is not None:
        console.print(layer_sweep_table(res.layer_sweep))
        print_path(res.path)
        return
    done = res.summary or res.sweep
    if getattr(done, "resumed_edits", 0):
        n = done.resumed_edits
        console.print(f"resumed: {n} edit{'s' if n != 1 else ''} read back from the journal of an interrupted run, the rest made now.")
    if res.summary is not None:
        print_notes(res.summary.device)
    if res.sweep is not None:
        console.print(sweep_table(res.sweep))
        print_path(res.path)
        return
    s = res.summary
    if s.mode == "benchmark":
        console.print(benchmark_table(s))
        print_path(res.path)
        return
    console.print(summary_table("ripple", [
        ("edits", f"{s.n_edits} ({s.n_successful} successful)"),
        ("Spearman's rho, coupling (mean over edits, 95% CI)", interval(s.spearman_coupling)),
        ("Spearman's rho, first order (mean over edits, 95% CI)", interval(s.spearman_first_order)),
        ("Spearman's rho, coupling (pooled)", num(s.pooled.spearman_coupling, "+.3f")),
        ("precision@k (mean over edits, 95% CI)", interval(s.precision_at_k)),
        ("time", f"{s.seconds:.1f} s")]))
    print_path(res.path)


_sig = inspect.signature(ripple, eval_str=True)
ripple.__signature__ = _sig.replace(parameters=[p for p in _sig.parameters.values() if p.kind != p.VAR_KEYWORD]
                                    + _knob_parameters())
