"""Shard files: writing pieces into them and reading rows back, whatever the store kind.

A shard is a dict saved with ``torch.save`` (load with ``weights_only=True``):
``{"store": kind, "version": 1, "rows": [piece indices], "layers": {target: kind's entry}}``.
Rows are addressed in *store order*, the length-sorted order pieces were extracted in;
:attr:`GradientReader.order` maps store rows to pieces.jsonl indices.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import torch

from ..artifacts import Manifest, ShardEntry, StoreSettings, TargetShape
from ..errors import ArtifactError
from ..gradients import PieceFactors
from ..io import atomic_torch_save, sha256_file
from ..rundir import RunDir
from .base import StoreKind, store_kind

SHARD_VERSION = 1


class ShardWriter:
    """Accumulates pieces, encoded by the store kind, and writes one shard file (atomically) per :meth:`flush`."""

    def __init__(self, settings: StoreSettings, targets: list[TargetShape]):
        self.kind = store_kind(settings, targets)
        self.names = [t.name for t in targets]
        self.rows: list[int] = []
        self.buf: dict[str, list[dict]] = {n: [] for n in self.names}

    def add(self, row: int, pf: PieceFactors) -> None:
        """Encode piece ``row`` (its pieces.jsonl index) from its exact factors."""
        self.rows.append(row)
        for n in self.names:
            self.buf[n].append(self.kind.encode(n, pf.x[n], pf.d[n]))

    def pending_bytes(self, taken: "tuple[list[int], dict] | None" = None) -> int:
        """Bytes of the encoded pieces not yet written (the shard file adds a few hundred bytes more):
        the buffered ones, or those of ``taken`` (:meth:`take`)."""
        buf = self.buf if taken is None else taken[1]
        return sum(v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 8
                   for n in self.names for e in buf[n] for v in e.values())

    def take(self) -> tuple[list[int], dict]:
        """The buffered pieces (rows, encoded entries per target), leaving the writer empty for the
        next shard; :meth:`write` writes them, on another thread if wanted."""
        taken, (self.rows, self.buf) = (self.rows, self.buf), ([], {n: [] for n in self.names})
        return taken

    def write(self, path: Path, taken: tuple[list[int], dict]) -> ShardEntry:
        """Write pieces :meth:`take` returned as one shard, atomically, and return its manifest entry.
        Touches no state of the writer, so it may run on a background thread while pieces are added.

        Raises:
            OSError: the write failed (ENOSPC when the disk is full, naming ``path``); no file
                or temp file is left at ``path``.
        """
        rows, buf = taken
        layers = {n: self.kind.pack(n, buf[n]) for n in self.names}
        atomic_torch_save({"store": self.kind.name, "version": SHARD_VERSION, "rows": list(rows), "layers": layers}, path)
        return ShardEntry(file=path.name, sha256=sha256_file(path), rows=list(rows), bytes=path.stat().st_size)

    def flush(self, path: Path) -> ShardEntry:
        """:meth:`write` the buffered pieces now, as one shard (the writer is left empty).

        Raises:
            OSError: as :meth:`write`.
        """
        return self.write(path, self.take())


class GradientReader:
    """Read access to the shards of a complete extraction.

    Raises:
        ArtifactError: missing, incomplete or inconsistent manifest, or (with ``verify``) a shard
            that is missing, whose sha256 differs from the manifest, or that holds other pieces
            than the manifest lists for it.
    """

    def __init__(self, run: RunDir, manifest: Manifest | None = None, verify: bool = True, cache_shards: int = 4):
        self.run = run
        self.manifest = manifest or run.gradients.load_manifest()
        self.kind: StoreKind = store_kind(self.manifest.store, self.manifest.targets)
        self.names = self.manifest.names
        self.shards = self.manifest.shards
        self.order = self.manifest.order
        self.n = len(self.order)
        self.row_shard: list[tuple[int, int]] = [(si, k) for si, s in enumerate(self.shards) for k in range(len(s.rows))]
        if verify:
            for s in self.shards:
                p = run.gradients.shard_file(s)
                if not p.is_file() or sha256_file(p) != s.sha256:
                    raise ArtifactError(f"{p}: missing or its sha256 differs from the manifest; rerun the same "
                                        f"`gradcouple extract --out {run.root}` command: only damaged shards are recomputed.")
                self._check_rows(p, s)
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._cache_n = cache_shards

    def _check_rows(self, path: Path, entry: ShardEntry) -> None:
        # the sha256 vouches for the file, not for the manifest's rows of it; mmap reads the pickle only
        held = torch.load(path, weights_only=True, map_location="cpu", mmap=True).get("rows")
        if held != entry.rows:
            raise ArtifactError(f"{self.run.gradients.manifest_path}: lists pieces {_brief(entry.rows)} for {entry.file}, which holds "
                                f"pieces {_brief(held)}; the manifest does not match its shards; rerun "
                                f"`gradcouple extract --out {self.run.root} --overwrite` (it recomputes every shard).")

    def shard(self, si: int) -> dict:
        """Shard ``si``, memory-mapped (a small LRU cache keeps the last few)."""
        if si in self._cache:
            self._cache.move_to_end(si)
            return self._cache[si]
        # mapped, not read: a block reads only the slices it uses, straight from the page cache
        data = torch.load(self.run.gradients.shard_file(self.shards[si]), weights_only=True, map_location="cpu", mmap=True)
        self._cache[si] = data
        if len(self._cache) > self._cache_n:
            self._cache.popitem(last=False)
        return data

    def slices(self, start: int, stop: int, name: str) -> Iterator[tuple[dict, int, int]]:
        """(shard entry of target ``name``, first row, end row within the shard) covering store rows [start, stop)."""
        r = start
        while r < stop:
            si, k = self.row_shard[r]
            k2 = min(len(self.shards[si].rows), k + (stop - r))
            yield self.shard(si)["layers"][name], k, k2
            r += k2 - k

    def tokens(self) -> list[int]:
        """Stored positions per piece, in store order (the T of the cost model)."""
        recs = self.manifest.records()
        return [recs[i].n_inputs for i in self.order]

    def to_piece_order(self, values: torch.Tensor) -> torch.Tensor:
        """(N, ...) values in store order -> pieces.jsonl order."""
        out = torch.empty_like(values)
        out[torch.tensor(self.order)] = values
        return out


def _brief(rows, n: int = 6) -> str:
    rows = list(rows or [])
    return "[" + ", ".join(map(str, rows[:n])) + (", ...]" if len(rows) > n else "]")
