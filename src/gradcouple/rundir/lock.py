"""The run directory's advisory lock, ``RUN/.lock`` (pid, host, stage, start time), held by the
stage writing into the run, so that a second process writing into it stops at once, naming the first."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from ..errors import ArtifactError
from ..ranks import is_main

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
#: stages that make a run directory; every other stage needs one that exists
CREATING = ("extract", "run")

_HELD: set[Path] = set()  # run directories this process has locked (stages nest inside `run`)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


@contextlib.contextmanager
def hold(root: Path, stage: str, create: bool = False) -> Iterator[None]:
    """Hold ``root/.lock`` while a stage writes into the run directory ``root``.

    Re-entrant within a process; under torchrun only rank 0 takes it, for every rank. A lock
    left by a dead process on this host is taken over with a note (logged). Only a stage that
    makes a run (``create``) creates its directory, and removes it again when the stage leaves it
    empty (it failed before writing anything).

    Raises:
        ArtifactError: another live process holds the lock (the message names it), or the run
            directory does not exist and ``create`` is False.
    """
    key = root.resolve()
    if key in _HELD or not is_main():  # under torchrun rank 0 holds it for every rank
        yield
        return
    if not create and not root.is_dir():
        raise ArtifactError(f"{root}: no such run directory; make one with `gradcouple extract --out {root}` "
                            f"or `gradcouple run --out {root}`.")
    made = [d for d in (root, *root.parents) if not d.exists()]
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                log.info(f"{path}: taking over the lock of {holder.get('stage')} (pid {holder['pid']}), "
                         f"which is no longer running.")
                path.unlink(missing_ok=True)
                continue
            raise ArtifactError(
                f"{root}: in use by `gradcouple {holder.get('stage', '?')}` (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, since {holder.get('started', '?')}); wait for it to finish, or delete "
                f"{path} if that process is gone.") from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(me, fh)
        break
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        path.unlink(missing_ok=True)
        for d in made:  # a stage that failed before writing anything leaves no empty run directory behind
            with contextlib.suppress(OSError):
                d.rmdir()


def locked(stage: str):
    """Decorator of a stage ``fn(cfg, run_dir, ...)``: it runs holding the lock of ``run_dir``
    (the stages of :data:`CREATING` may create the directory)."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(cfg, run_dir, *args, **kwargs):
            with hold(Path(run_dir), stage, create=stage in CREATING):
                return fn(cfg, run_dir, *args, **kwargs)
        return inner
    return wrap


__all__ = ["LOCK_FILE", "hold", "locked"]
