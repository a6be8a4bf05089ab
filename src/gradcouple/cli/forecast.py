"""``gradcouple forecast``: before an edit is applied, which stored facts will it move?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .options import (
    ConfigOpt,
    DeviceOpt,
    HparamsOpt,
    MethodOpt,
    RunDirOpt,
    ThreadsOpt,
    console,
    correlation,
    interval,
    num,
    opt,
    print_notes,
    print_path,
)

EPILOG = """Examples:

  gradcouple forecast --run runs/demo --edit "The mother tongue of Danielle Darrieux is" --target English --subject "Danielle Darrieux"

  gradcouple forecast --run runs/demo --edits knowedit_test_cf.json --predictor gradsim,first_order --top-k 20

  gradcouple forecast --run runs/demo --edits counterfact.json --method rome --verify 10
"""


def _short(text: str, n: int = 140) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3].rsplit(" ", 1)[0] + " ..."


def edit_tables(res) -> list[Table]:
    """Per edit and predictor: its top pieces (rank, score, prompt -> answer, where from, measured change)."""
    out = []
    verified = res.summary.verify is not None
    for e in res.summary.edits:
        for name in res.summary.predictors:
            rows = sorted((r for r in res.rows if r.edit == e.id and r.predictor == name and r.rank <= res.summary.top_k),
                          key=lambda r: r.rank)
            w = e.rewrites[0]
            more = f" (+{len(e.rewrites) - 1} rewrites)" if len(e.rewrites) > 1 else ""
            t = Table(title=f"{escape(_short(w.prompt))} -> {escape(w.target)}{more}  ({name}; top {len(rows)} of "
                            f"{res.summary.n_pieces} stored pieces and {e.n_tests} own tests)", title_justify="left")
            t.add_column("rank", justify="right")
            t.add_column(name, justify="right")
            t.add_column("piece: prompt -> answer", ratio=1)
            t.add_column("from")
            if verified:
                t.add_column("change (nats)", justify="right")
            for r in rows:
                source = "store" if r.source == "store" else f"test: {r.criterion}"
                t.add_row(str(r.rank), f"{r.score:+.3g}", escape(f"{_short(r.prompt)} -> {r.answer}"), escape(source),
                          *((num(r.change, "+.3f"),) if verified else ()))
            out.append(t)
    return out


def verify_table(v) -> Table:
    """How each predictor's forecast held up when the edits were made (at --verify's k): one column per predictor."""
    k = v.k
    t = Table(title=f"verify: {v.n_edits} edits made, {v.n_measured} (edit, piece) pairs measured; precision@{k} of a random "
                    f"ranking {num(v.precision_at_k_chance, '.2f')}", title_justify="left")
    t.add_column("[95% CI]; means over edits")
    for name in v.predictors:
        t.add_column(name)
    cs = list(v.predictors.values())
    t.add_row("Spearman's rho, pooled", *(correlation(c.spearman, "+.2f") for c in cs))
    t.add_row("within-edit rho", *(interval(c.within_edit_spearman, "+.2f") for c in cs))
    t.add_row(f"precision@{k}", *(interval(c.precision_at_k, ".2f") for c in cs))
    t.add_row(f"own tests in top {k}", *(interval(c.recall_own_tests, ".2f") for c in cs))
    t.add_row(f"locality tests in top {k}", *(interval(c.stable_tests_in_top_k, ".2f") for c in cs))
    t.add_row(f"|change| top {k} / sample (nats)",
              *(f"{num(c.mean_abs_change_top_k, '.2f')} / {num(c.mean_abs_change_sample, '.2f')}" for c in cs))
    return t


def forecast(
    run: RunDirOpt = Path("runs/default"),
    edits: Annotated[Optional[Path], typer.Option("--edits", help=(
        "File of edit requests: EasyEdit / KnowEdit JSON, CounterFact, MQuAKE or RippleEdits records, or gradcouple "
        "pieces with role 'edit' (the format is sniffed; --format names it)."))] = None,
    edit: Annotated[Optional[str], typer.Option("--edit", help="One edit's prompt (with --target).")] = None,
    target: Annotated[Optional[str], typer.Option("--target", help="The new target of --edit.")] = None,
    subject: Annotated[Optional[str], typer.Option("--subject", help=(
        "The subject --edit names (ROME's and MEMIT's key is at its last token); none: the last prompt token."))] = None,
    format: Annotated[Optional[str], typer.Option("--format", help="Format of --edits, any that `gradcouple download` reads; "
                                                  "the edit formats are easyedit, counterfact, mquake, rippleedits and "
                                                  "pieces (default: sniffed).")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip and count malformed records of --edits instead of "
                                           "stopping at the first (counted in forecast/summary.json).")] = False,
    method: MethodOpt = None,
    hparams: HparamsOpt = None,
    predictor: Annotated[Optional[str], opt("forecast.predictors", "--predictor")] = None,
    top_k: Annotated[Optional[int], opt("forecast.top_k", "--top-k")] = None,
    verify: Annotated[Optional[int], opt("forecast.verify", "--verify", metavar="[K]")] = None,
    precision: Annotated[Optional[str], opt("forecast.precision", "--precision")] = None,
    seed: Annotated[Optional[int], opt("ripple.seed", "--seed")] = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Before an edit is made, score every stored piece of RUN by how much the edit will move it.

    Each edit's new-target gradient is computed exactly with the run's model and layers; the stored
    gradients are read block by block (never as dense matrices). first_order computes the edit's
    weight change with --method (not kept: the weights are restored bit for bit). --verify [K]
    (default 10) makes each edit for real and measures what moved. Writes RUN/forecast/forecast.jsonl
    and summary.json; finished edits are journalled, so an interrupted forecast resumes.
    """
    from .. import api  # deferred: torch and transformers (the stages), so `--help` stays fast

    res = api.forecast_result(run, edits, config=config, edit=edit, target=target, subject=subject, format=format,
                              skip_bad=skip_bad, show_progress=True, method=method, hparams=hparams, predictor=predictor,
                              top_k=top_k, verify=verify, precision=precision, seed=seed, device=device, threads=threads)
    s = res.summary
    if s.resumed_edits:
        console.print(f"resumed: {s.resumed_edits} edit{'s' if s.resumed_edits != 1 else ''} read back from the journal of "
                      f"an interrupted forecast, the rest made now.")
    for t in edit_tables(res):
        console.print(t)
    if s.skipped:
        console.print("skipped (records, edits or test queries of the file, by reason): " +
                      ", ".join(f"{n} {why}" for why, n in s.skipped.items()), highlight=False)
    if s.verify is not None:
        console.print(verify_table(s.verify))
    print_notes(s.device)
    print_path(res.path)
