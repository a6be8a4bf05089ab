"""Append-only JSON-lines journals: what a long stage has finished, durable line by line, so that
an interrupted run resumes (extract's rank journals, ripple's edit journals, :class:`EditJournal`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any, Callable, Optional


class Journal:
    """One JSON object per line, flushed and fsynced before :meth:`append` returns.

    A line cut short (the process was killed while writing it) is skipped on reading, and the
    next append starts a fresh line after it.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fh: Optional[IO[str]] = None

    def lines(self) -> list[Any]:
        """Every complete line, parsed ([] when the file does not exist).

        Raises:
            OSError: the file exists but cannot be read.
        """
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # the line being written when the process died
        return out

    def append(self, obj: Any) -> None:
        """Add ``obj`` as one line; durable when this returns."""
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
            if self._fh.tell() and not self.path.read_bytes().endswith(b"\n"):
                self._fh.write("\n")  # end a line cut short, so the new one parses
        self._fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class EditJournal:
    """Ripple's finished edits, so an interrupted ripple resumes: one line per edit, written only
    after the model's weights are restored. ``finished(k, key)`` is edit ``k``'s payload when its
    ``key`` (which edit it was) matches."""

    def __init__(self, path: Path):
        self._journal = Journal(path)
        self.done: dict[int, dict] = {}
        for entry in self._journal.lines():
            try:
                self.done[int(entry["edit"])] = entry
            except (KeyError, TypeError, ValueError):
                continue

    @property
    def path(self) -> Path:
        return self._journal.path

    def finished(self, k: int, key: str) -> Optional[dict]:
        """Edit ``k``'s payload from an earlier run, or None when it did not finish (or was another edit)."""
        entry = self.done.get(k)
        return entry["payload"] if entry and entry.get("key") == key else None

    def append(self, k: int, key: str, payload: dict) -> None:
        """Record edit ``k`` (identified by ``key``) as finished; durable when this returns."""
        self._journal.append({"edit": k, "key": key, "payload": payload})

    def each(self, keys: list[str], make: Callable[[int], dict], advance: Callable[[int], None]) -> tuple[list[dict], int]:
        """Every edit's payload, in order: read back when an earlier run finished edit ``k`` (with the
        same ``keys[k]``), else ``make(k)``, journalled before the next edit starts. Returns the
        payloads and how many were read back; the journal is closed afterwards."""
        out, resumed = [], 0
        try:
            for k, key in enumerate(keys):
                done = self.finished(k, key)
                if done is None:
                    done = make(k)
                    self.append(k, key, done)
                else:
                    resumed += 1
                out.append(done)
                advance(1)
        finally:
            self.close()
        return out, resumed

    def close(self) -> None:
        self._journal.close()


__all__ = ["EditJournal", "Journal"]
