"""The ``gradcouple`` command line: every command registered here, and the one error boundary."""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

from ..errors import GradcoupleError
from . import couple, download, extract, report, ripple, run
from .options import console

#: what an interrupt leaves behind, per command
INTERRUPTED = {
    "extract": "completed shards are kept; rerun the same command to resume.",
    "run": "completed stages and shards are kept; rerun the same command to resume.",
    "couple": "couple writes its files only at the end, so nothing changed; rerun the command.",
    "ripple": "ripple writes its files only at the end, so nothing changed; rerun the command (it starts over).",
    "report": "nothing was written; rerun the command.",
    "download": "nothing was written; rerun the command.",
}


def one_line(exc: BaseException) -> tuple[str, int]:
    """The message and exit code printed for an exception that reaches the boundary."""
    if isinstance(exc, GradcoupleError):
        return str(exc), exc.exit_code
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError is a RuntimeError
        return "out of GPU memory; lower --batch-size, use --device cpu, or a smaller model.", 1
    if isinstance(exc, MemoryError):
        return "out of memory; lower --batch-size or --max-memory, or use fewer pieces (--limit).", 1
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}; check the path, its permissions and the free disk space.", 1
    first = (str(exc).splitlines() or [""])[0]
    return (f"unexpected {type(exc).__name__}: {first} — a bug in gradcouple; rerun with GRADCOUPLE_DEBUG=1 for the "
            f"traceback and report it."), 1


class GuardedGroup(TyperGroup):
    """The command group whose ``invoke`` is the one error boundary: every exception from a command
    becomes one red line and an exit code (``GRADCOUPLE_DEBUG=1`` re-raises it with its traceback)."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):  # usage errors and exits: typer reports them
            raise
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted[/]: {INTERRUPTED.get(ctx.invoked_subcommand or '', 'rerun the command.')}")
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 (the boundary)
            if os.environ.get("GRADCOUPLE_DEBUG"):
                raise
            message, code = one_line(e)
            console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(code) from None


app = typer.Typer(
    name="gradcouple",
    cls=GuardedGroup,
    help="Gradient coupling of knowledge pieces in causal LMs, and the ripple effects of editing them.\n\n"
    "Stages: download -> extract -> couple -> ripple -> report, or all at once with `run`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for _module, _name in ((download, "download"), (extract, "extract"), (couple, "couple"), (ripple, "ripple"),
                       (report, "report"), (run, "run")):
    app.command(name=_name, epilog=_module.EPILOG)(getattr(_module, _name))


def main() -> None:
    """Console-script entry point (``gradcouple``, ``python -m gradcouple``)."""
    app(prog_name="gradcouple", args=sys.argv[1:])
