"""The ``gradcouple`` command line: every command registered here, and the one error boundary."""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from typer.core import TyperGroup

from .._version import __version__
from ..errors import GradcoupleError, ResourceError
from . import couple, download, extract, forecast, report, ripple, run
from .options import console

#: what an interrupt leaves behind, per command
INTERRUPTED = {
    "extract": "completed shards are kept; rerun the same command to resume.",
    "run": "completed stages and shards are kept; rerun the same command to resume.",
    "couple": "couple writes its files only at the end, so nothing changed; rerun the command.",
    "ripple": "every finished edit is kept in RUN/ripple/*/journal-*.jsonl; rerun the same command to make only the missing ones.",
    "forecast": "every finished edit is kept in RUN/forecast/journal-*.jsonl; rerun the same command to make only the missing ones.",
    "report": "nothing was written; rerun the command.",
    "download": "nothing was written; rerun the command.",
}


#: the remedies of running out of memory, each with the flag it needs
GPU_MEMORY_FIXES = (("--batch-size", "lower --batch-size"), ("--device", "use --device cpu"))
MEMORY_FIXES = (("--batch-size", "lower --batch-size"), ("--max-memory", "lower --max-memory"),
                ("--top-k", "pass --top-k K"), ("--limit", "use fewer pieces or records (--limit)"))


def command_flags(command: str | None) -> set[str]:
    """Every option name of ``gradcouple COMMAND`` (empty for an unknown command)."""
    cmd = typer.main.get_command(app).commands.get(command or "") if command else None
    return {o for p in (cmd.params if cmd else []) for o in p.opts if o.startswith("--")}


def _fixes(command: str | None, fixes: tuple[tuple[str, str], ...], last: str) -> str:
    """The remedies whose flag ``command`` has (all of them when the command is unknown), then ``last``."""
    have = command_flags(command)
    texts = [text for flag, text in fixes if not command or flag in have]
    return ", ".join([*texts, f"or {last}"]) if texts else last


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_PERMITTED = (errno.EACCES, errno.EPERM, errno.EROFS)


def _os_error(exc: OSError, command: str | None) -> tuple[str, int]:
    """A file system error, naming the file first: exit 2 for permissions and read-only file systems
    (the directory and the flag that moves the output are named), 6 for a full disk, 1 for anything else."""
    if not exc.filename:
        return f"{exc.strerror or exc}; check the path, its permissions and the free disk space.", 1
    path = Path(exc.filename)
    if exc.errno in _DISK_FULL:
        return (f"{path}: {exc.strerror} (disk full); free space or use another disk, then rerun the command "
                f"(what it already saved is kept)."), ResourceError.exit_code
    if exc.errno in _NOT_PERMITTED:
        flag = next((f for f in ("--out", "--run") if f in command_flags(command)), "--out")
        if exc.errno == errno.EROFS:
            return (f"{path}: {exc.strerror} (the directory {path.parent} cannot be written); choose another {flag} "
                    f"directory on a writable disk, then rerun."), 2
        if not path.exists():  # creating a file or directory in path.parent
            return (f"{path}: {exc.strerror} (the directory {path.parent} is not writable); make it writable "
                    f"(chmod u+w {path.parent}) or choose another {flag} directory, then rerun."), 2
        return f"{path}: {exc.strerror}; check the permissions of the file and its directory, then rerun.", 2
    return f"{path}: {exc.strerror or exc}; check the path, its permissions and the free disk space.", 1


def run_dir_arg(args: list[str]) -> str | None:
    """The run directory a command line names (``--run``/``-r``/``--out``/``-o``), or None."""
    for i, a in enumerate(args):
        if a in ("--run", "-r", "--out", "-o") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(("--run=", "--out=")):
            return a.split("=", 1)[1]
    return None


def one_line(exc: BaseException, command: str | None = None) -> tuple[str, int]:
    """The message and exit code printed for an exception that reaches the boundary; its hints name
    only flags that ``command`` (the subcommand that raised it) has."""
    if isinstance(exc, GradcoupleError):  # one line, whatever a wrapped library message held
        return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()), exc.exit_code
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError is a RuntimeError
        return f"out of GPU memory; {_fixes(command, GPU_MEMORY_FIXES, 'use a smaller model')}.", ResourceError.exit_code
    if isinstance(exc, MemoryError):
        return f"out of memory; {_fixes(command, MEMORY_FIXES, 'use a machine with more memory')}.", ResourceError.exit_code
    if isinstance(exc, OSError):
        return _os_error(exc, command)
    first = (str(exc).splitlines() or [""])[0]
    return (f"unexpected {type(exc).__name__}: {first} — a bug in gradcouple; rerun with GRADCOUPLE_DEBUG=1 for the "
            f"traceback and report it."), 1


class _NoteHandler(logging.Handler):
    """Prints the library's log records (logger ``gradcouple``) as 'note:' / 'warning:' lines."""
    def emit(self, record: logging.LogRecord) -> None:
        label = "[yellow]warning:[/]" if record.levelno >= logging.WARNING else "note:"
        console.print(f"{label} {escape(record.getMessage())}", highlight=False, soft_wrap=True)


def show_notes() -> None:
    """Route ``logging.getLogger('gradcouple')`` records of level INFO and above to the console, once."""
    log = logging.getLogger("gradcouple")
    if not any(isinstance(h, _NoteHandler) for h in log.handlers):
        log.addHandler(_NoteHandler())
        log.setLevel(logging.INFO)
        log.propagate = False


#: (command, option) -> the value an option given without one takes (click options need a value)
OPTIONAL_VALUES = {("forecast", "--verify"): "10"}


def with_optional_values(args: list[str]) -> list[str]:
    """``args`` with a value after every option of :data:`OPTIONAL_VALUES` given bare (``--verify``
    last, or before another option: ``--verify 10``)."""
    command = next((a for a in args if not a.startswith("-")), None)
    out = []
    for i, a in enumerate(args):
        out.append(a)
        value = OPTIONAL_VALUES.get((command, a))
        if value is not None and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append(value)
    return out


class GuardedGroup(TyperGroup):
    """The command group whose ``invoke`` is the one error boundary: every exception from a command
    becomes one red line and an exit code (``GRADCOUPLE_DEBUG=1`` re-raises it with its traceback)."""
    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, with_optional_values(list(args)))

    def invoke(self, ctx: typer.Context):
        show_notes()
        args = [*getattr(ctx, "_protected_args", []), *ctx.args]  # the subcommand's own arguments
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):  # usage errors and exits: typer reports them
            raise
        except KeyboardInterrupt:
            what = INTERRUPTED.get(ctx.invoked_subcommand or "", "rerun the command.")
            run_dir = run_dir_arg(args)
            console.print(f"[yellow]interrupted[/]: {escape(what.replace('RUN/', f'{run_dir}/') if run_dir else what)}",
                          highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 (the boundary)
            if os.environ.get("GRADCOUPLE_DEBUG"):
                raise
            message, code = one_line(e, ctx.invoked_subcommand)
            console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(code) from None


app = typer.Typer(
    name="gradcouple",
    cls=GuardedGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gradcouple {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                   help="Print gradcouple's version and exit.")] = False) -> None:
    """Gradient coupling of knowledge pieces in causal LMs, and the ripple effects of editing them.

    Stages: download -> extract -> couple -> ripple -> report, or all at once with `run`; `forecast` says
    which stored facts an edit will move before it is made.
    """


for _module, _name in ((download, "download"), (extract, "extract"), (couple, "couple"), (ripple, "ripple"),
                       (forecast, "forecast"), (report, "report"), (run, "run")):
    app.command(name=_name, epilog=_module.EPILOG)(getattr(_module, _name))


def main() -> None:
    """Console-script entry point (``gradcouple``, ``python -m gradcouple``)."""
    app(prog_name="gradcouple", args=sys.argv[1:])
