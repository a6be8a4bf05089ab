"""Append-only JSON-lines journals: what a long stage has finished, durable line by line, so that
an interrupted run resumes (extract's rank journals, ripple's edit journals)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any, Optional


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


__all__ = ["Journal"]
