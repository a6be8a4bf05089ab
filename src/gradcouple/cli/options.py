"""Option aliases shared by the commands (their help is the settings' field descriptions), and the summary printing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..resolve import help_text
from ..runinfo import overloaded

console = Console(stderr=True)


def opt(setting: str, *decls: str, **kwargs) -> typer.models.OptionInfo:
    """A Typer option whose help is the setting's field description (:func:`gradcouple.resolve.help_text`):
    ``setting`` is a dotted field (``model.layers``) or a method knob (``ripple.hparams.ft.lr``)."""
    return typer.Option(*decls, help=help_text(setting), show_default=False, **kwargs)


ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="YAML config (sections data/model/extract/couple/ripple/forecast/report, as in "
                 "configs/default.yaml); its settings count as given, and flags override it.", exists=True, dir_okay=False),
]
ModelOpt = Annotated[Optional[str], opt("model.name", "--model", "-m")]
LayersOpt = Annotated[Optional[str], opt("model.layers", "--layers", "-l")]
DataOpt = Annotated[Optional[Path], opt("data.pieces", "--data", "-d")]
RunDirOpt = Annotated[Path, typer.Option("--run", "-r", help="Run directory made by `gradcouple extract --out` or "
                                         "`gradcouple run --out`.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace artifacts made from other inputs (pieces, "
                                            "settings, model).")]
DeviceOpt = Annotated[Optional[str], opt("model.device", "--device")]
BatchSizeOpt = Annotated[Optional[int], opt("extract.batch_size", "--batch-size", "-b")]
LimitOpt = Annotated[Optional[int], opt("data.limit", "--limit")]
ThreadsOpt = Annotated[Optional[int], opt("model.threads", "--threads")]
MaxLengthOpt = Annotated[Optional[int], opt("extract.max_length", "--max-length")]
EditsOpt = Annotated[Optional[str], opt("ripple.edits", "--edits")]
NEditsOpt = Annotated[Optional[int], opt("ripple.n_edits", "--n-edits", "-n")]
MethodOpt = Annotated[Optional[str], opt("ripple.method", "--method")]
HparamsOpt = Annotated[Optional[Path], opt("ripple.hparams_file", "--hparams")]
StoreOpt = Annotated[Optional[str], opt("extract.store", "--store")]


def print_notes(device=None, truncated: tuple[int, int, int] = (0, 0, 0), n_pieces: int = 0, max_length: int = 0) -> None:
    """Warnings that end a stage summary: prompts cut to --max-length, a machine busier than its cores."""
    n, most, total = truncated
    if n:
        console.print(f"[yellow]warning:[/] {n} of {n_pieces} prompts were cut from the left to --max-length {max_length} tokens "
                      f"(by up to {most}, {total} in all); raise --max-length to score them whole.", highlight=False)
    if device is not None and (note := overloaded(device)):
        console.print(f"[yellow]note:[/] {note}", highlight=False)


def layer_names(names: list[str]) -> str:
    """The selected target layers in a summary line: all when few, else the first and last with the count."""
    return ", ".join(names) if len(names) <= 2 else f"{len(names)}: {names[0]} ... {names[-1]}"


def gradsim_label(mode: str) -> str:
    """'mean GradSim', saying when it is over each piece's k nearest pieces only (a top-k coupling)."""
    return "mean GradSim" if mode == "full" else f"mean GradSim (each piece's {mode.removeprefix('top')} nearest only)"


def summary_table(title: str, rows: list[tuple[str, object]]) -> Table:
    """A two-column rich table for the one-screen summary that ends every stage."""
    t = Table(title=title, show_header=False, title_justify="left", title_style="bold")
    t.add_column(style="cyan")
    t.add_column()
    for k, v in rows:
        t.add_row(k, str(v))
    return t


def num(x, spec: str = ".4f") -> str:
    """Format a number for a summary table; None (e.g. a mean over no pairs) reads 'n/a'."""
    return "n/a" if x is None else format(x, spec)


def bracketed(value, low, high, spec: str = "+.3f") -> str:
    """'value [low, high]'; just the value without an interval; 'n/a' without a value."""
    if value is None:
        return "n/a"
    if low is None or high is None:
        return num(value, spec)
    return f"{num(value, spec)} [{num(low, spec)}, {num(high, spec)}]"


def interval(iv, spec: str = "+.3f") -> str:
    """An :class:`~gradcouple.metrics.Interval` as 'estimate [low, high]'."""
    return "n/a" if iv is None else bracketed(iv.estimate, iv.low, iv.high, spec)


def correlation(c, spec: str = "+.3f") -> str:
    """A :class:`~gradcouple.metrics.Correlation` as 'value [low, high]'."""
    return "n/a" if c is None else bracketed(c.value, c.ci_low, c.ci_high, spec)


def print_path(path: Path) -> None:
    """The stage's main output path, last, on stdout (for shell pipelines)."""
    typer.echo(str(path))
