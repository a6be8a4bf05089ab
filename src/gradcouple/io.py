"""Atomic file writes: write to a temp file in the same directory, fsync, then rename."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import ConfigError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temp file beside ``path``; on success rename it over ``path``, on error delete it.

    Readers never see a half-written file, and an interrupted write leaves the old file intact.

    Raises:
        OSError: the directory cannot be made or written, or the disk is full; its ``errno``
            says which (EACCES, EROFS, ENOSPC, ...) and its ``filename`` is ``path``, not the
            temp file (nor None, as a failed ``write`` would leave it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # its error names the directory it could not make
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        _raise_naming(e, path)
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            _raise_naming(e, path)
        raise


def _raise_naming(e: OSError, path: Path):
    """Raise ``e`` with ``filename`` set to ``path`` (same errno, hence the same OSError subclass)."""
    if e.errno is None or e.filename == str(path):
        raise e
    raise OSError(e.errno, e.strerror, str(path)) from e


class _KeepWriteError:
    """A binary file whose first failed ``write`` is kept: torch.save turns it into a RuntimeError
    ("unexpected pos ..."), which loses the errno that says the disk is full."""

    def __init__(self, fh: IO[bytes]):
        self.fh, self.error = fh, None

    def write(self, b) -> int:
        try:
            return self.fh.write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.fh.flush()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented UTF-8 JSON."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False, default=str)
        fh.write("\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Atomically ``torch.save`` ``obj`` to ``path``.

    Raises:
        OSError: as :func:`atomic_open` (a full disk is ENOSPC naming ``path``); no temp file is left.
    """
    import torch  # deferred: torch; the CLI writes JSON through this module before any model loads

    with atomic_open(path, "wb") as fh:
        out = _KeepWriteError(fh)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None


def check_directory(path: str | os.PathLike, flag: str) -> None:
    """Refuse an output or run directory that exists as something else.

    Raises:
        ConfigError: ``path`` exists and is not a directory (the message names ``flag``).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {p} is a file, not a directory; give a directory ({flag} makes it when missing).")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensor_sha256(t: "torch.Tensor") -> str:
    """sha256 (hex) of a CPU tensor's bytes in row-major order: what a cached tensor is verified by."""
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def digest(obj: Any) -> str:
    """sha256 hex of ``obj`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
