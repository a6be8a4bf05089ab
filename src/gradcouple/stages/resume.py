"""What earlier extractions left in a run directory, and which shards each process computes.

One process: the previous ``manifest.json``, when it was made from the same inputs, lists
complete shards that are kept (their sha256 checked) instead of computed again. Under
``torchrun`` every rank tokenizes and length-sorts all pieces (the global shard plan, the same for
every K). Rank 0 decides what earlier, possibly interrupted, extractions left that can be kept
(``manifest.json`` and every rank journal made from the same inputs) and deals the other shards
to the ranks by token totals (greedy longest-processing-time, so the ranks get about equal work,
not equal counts). Each rank writes its shards under their global numbers (``shard-00012.pt``, so
names never collide) and appends one fsynced line per shard to its journal. After a barrier rank
0 writes ``manifest.json`` (every piece exactly once) and removes the journals. A rank that dies
leaves its complete shards and its journal; a rerun with the same or another K (or one process)
resumes from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..artifacts import Inputs, Manifest, PieceRecord, ShardEntry
from ..config import config_diff
from ..errors import ArtifactError, ConfigError
from ..io import sha256_file
from ..ranks import balance, barrier, decide, rank, world_size
from ..rundir import RunDir, stale_inputs


def _previous(run: RunDir) -> tuple[Optional[Manifest], list[str]]:
    """The run's manifest, or (None, [why it cannot be used]) when it is unreadable or from another version."""
    if not run.gradients.has_manifest():
        return None, []
    try:
        return run.gradients.load_manifest(complete=False), []
    except ArtifactError as e:
        return None, [f"gradients/manifest.json unusable ({str(e).split(': ', 1)[-1]})"]


def _changes(previous: Manifest, inputs: Inputs, config: dict) -> list[str]:
    changed = stale_inputs(previous.inputs, inputs)
    if any(c.startswith("settings") for c in changed):
        changed = [c for c in changed if not c.startswith("settings")] + config_diff(previous.config, config)
    return changed


def resume_point(run: RunDir, header: Manifest, overwrite: bool) -> Optional[Manifest]:
    """The previous manifest in ``run`` when it was made from the same inputs (its complete shards are reused).

    Raises:
        ConfigError: a previous extraction from other inputs, without ``overwrite``; the
            message names every setting, file or model that changed.
    """
    previous, unusable = _previous(run)
    if previous is None and not unusable:
        return None
    changed = unusable or _changes(previous, header.inputs, header.config)
    if changed and not overwrite:
        raise ConfigError(f"{run.gradients.manifest_path}: existing gradients were made from other inputs ({'; '.join(changed)}); "
                          f"pass --overwrite to replace them, or give another run directory.")
    if changed or overwrite:
        run.gradients.clear()
        return None
    return previous


class Earlier:
    """What earlier extractions of the same inputs left: for each global shard number, every
    (entry, records) that ``manifest.json`` or a rank journal lists, the most recent last."""

    def __init__(self) -> None:
        self.candidates: dict[int, list[tuple[ShardEntry, dict[int, PieceRecord]]]] = {}
        #: records of the rows of every shard :meth:`kept` returned, by piece index
        self.pieces: dict[int, PieceRecord] = {}

    def add(self, k: int, entry: ShardEntry, records: Sequence[Optional[PieceRecord]]) -> None:
        self.candidates.setdefault(k, []).append((entry, {r.index: r for r in records if r is not None}))

    def kept(self, run: RunDir, k: int, rows: list[int]) -> Optional[ShardEntry]:
        """Shard ``k``'s entry when an earlier run wrote it for exactly ``rows`` and its file is
        intact (sha256); its records are then in :attr:`pieces`. None: compute it."""
        digests: dict[Path, str] = {}
        for entry, recs in reversed(self.candidates.get(k, [])):
            if entry.rows != rows or any(r not in recs or recs[r].shard != k for r in rows):
                continue
            path = run.gradients.shard_file(entry)
            if path not in digests:
                digests[path] = sha256_file(path) if path.is_file() else ""
            if digests[path] == entry.sha256:
                for r in rows:
                    self.pieces[r] = recs[r]
                return entry
        return None


def journal_changes(run: RunDir, inputs, config: dict) -> Optional[list[str]]:
    """What differs between the rank journals in ``run`` and an extraction from ``inputs`` and
    ``config`` now: None when they all match (resume them), else the differences, file by file."""
    changed = []
    for path in run.gradients.rank_manifest_paths():
        head, _, why = run.gradients.read_rank_journal(path)
        diff = [f"unusable ({why})"] if why else _changes(head, inputs, config)
        changed += [f"{run.relative(path)}: {d}" for d in diff]
    return changed or None


def earlier(run: RunDir, header: Manifest, overwrite: bool) -> Optional[Earlier]:
    """What can be resumed in ``run``: the union of ``manifest.json`` and the rank journals made
    from the same inputs as ``header`` (None when nothing is there, or with ``overwrite``, which
    clears the gradients).

    Raises:
        ConfigError: a manifest or a journal made from other inputs, without ``overwrite``; the
            message names the file and every setting, file or model that changed.
    """
    previous = resume_point(run, header, overwrite)
    paths = run.gradients.rank_manifest_paths()
    if overwrite and paths:
        run.gradients.clear()
        return None
    changed = journal_changes(run, header.inputs, header.config)
    if changed:
        raise ConfigError(f"{run.gradients.dir}: an interrupted extraction under torchrun was made from other inputs "
                          f"({'; '.join(changed)}); pass --overwrite to replace it or choose another --out.")
    found = Earlier()
    if previous is not None:
        for k, s in enumerate(previous.shards):
            found.add(k, s, [previous.pieces[r] for r in s.rows if r < len(previous.pieces)])
    for path in paths:
        for k, entry, records in run.gradients.read_rank_journal(path)[1]:
            found.add(k, entry, records)
    return found if found.candidates else None


class Extraction:
    """This process's part of one extraction: what it resumes, which shards it computes, where it
    records them, and (rank 0) the merged manifest. In one process every method is what
    ``extract`` always did: all shards, manifest.json rewritten after each."""

    def __init__(self, run: RunDir, header: Manifest, overwrite: bool, pieces: list) -> None:
        """Find what earlier runs left (rank 0) and write RUN/pieces.jsonl (rank 0).

        Raises (on every rank): ConfigError as :func:`earlier`.
        """
        self.run, self.header = run, header
        self.world, self.rank = world_size(), rank()
        self.main = self.rank == 0
        self.resumed = 0                                  # shards kept by rank 0 under torchrun
        self._earlier: Optional[Earlier] = None
        self._kept: dict[int, ShardEntry] = {}
        self._plan: list[list[int]] = []
        self._done: list[tuple[int, ShardEntry, list[PieceRecord]]] = []
        self._journal = None

        def begin() -> None:
            self._earlier = earlier(run, header, overwrite)
            run.save_pieces(pieces)

        decide(begin)

    @property
    def previous(self) -> Optional[Earlier]:
        """What the shard loop may keep (one process); under torchrun rank 0 kept shards in :meth:`share`."""
        return self._earlier if self.world == 1 else None

    def share(self, plan: list[list[int]], encoded: Sequence) -> dict[int, list[int]]:
        """{global shard number: piece rows} this process computes (or, in one process, keeps).

        Under torchrun rank 0 keeps every intact earlier shard and deals the rest by token
        totals (:func:`balance`); the plan and the deal are rank 0's, sent to every rank.
        """
        if self.world == 1:
            self._plan = plan
            return dict(enumerate(plan))

        def deal():
            for k, rows in enumerate(plan):
                entry = self._earlier.kept(self.run, k, rows) if self._earlier is not None else None
                if entry is not None:
                    self._kept[k] = entry
            todo = [k for k in range(len(plan)) if k not in self._kept]
            bins = balance([sum(encoded[r].n_inputs for r in plan[k]) for k in todo], self.world)
            return plan, [[todo[i] for i in b] for b in bins], len(self._kept)

        self._plan, bins, self.resumed = decide(deal)
        return {k: self._plan[k] for k in bins[self.rank]}

    def save(self, man: Manifest) -> None:
        """Record the shard just added to ``man``: manifest.json (one process) or this rank's journal."""
        if self.world == 1:
            self.run.gradients.save_manifest(man)
            return
        entry = man.shards[-1]
        records = [man.pieces[r] for r in entry.rows]
        k = records[0].shard
        self._done.append((k, entry, records))
        self._append(k, entry, records)

    def _append(self, k: int, entry: ShardEntry, records: list[PieceRecord]) -> None:
        if self._journal is None:
            self._journal = self.run.gradients.rank_journal(self.rank, self.world, self.header)
        self._journal.append(self.run.gradients.journal_line(k, entry, records))

    def merge(self, man: Manifest, computed: int, loop_s: float) -> tuple[Manifest, int, float]:
        """After the shard loop: (manifest, pieces computed, loop seconds) of the whole job.

        Under torchrun every rank sends rank 0 what it computed; rank 0 lists every shard in
        plan order (kept ones included), so its manifest is the one a single process writes.
        The throughput is that of the job: all pieces computed over the slowest rank's time.

        Raises:
            ArtifactError: (rank 0) a shard of the plan that no rank wrote.
        """
        if self.world == 1:
            return man, computed, loop_s
        import torch.distributed as dist  # deferred: torch.distributed, only under torchrun

        if self._journal is not None:
            self._journal.close()
            self._journal = None
        mine = (self._done, computed, loop_s, man.batch_size)
        parts: Optional[list] = [None] * self.world if self.main else None
        dist.gather_object(mine, parts, dst=0)
        if not self.main:
            return man, computed, loop_s
        entries = dict(self._kept)
        pieces: list[Optional[PieceRecord]] = [None] * len(man.pieces)
        for k in self._kept:
            for r in self._plan[k]:
                pieces[r] = self._earlier.pieces[r]
        for done, _, _, _ in parts:
            for k, entry, records in done:
                entries[k] = entry
                for rec in records:
                    pieces[rec.index] = rec
        missing = [k for k in range(len(self._plan)) if k not in entries]
        if missing:
            raise ArtifactError(f"{self.run.gradients.manifest_path}: no rank wrote shard(s) {missing[:6]}; rerun the same command "
                                f"to compute them.")
        man.shards = [entries[k] for k in range(len(self._plan))]
        man.pieces = pieces
        man.batch_size = min(p[3] for p in parts)
        return man, sum(p[1] for p in parts), max(p[2] for p in parts)

    def finish(self, man: Manifest, cfg) -> Manifest:
        """Write the complete manifest and the run's config.json (rank 0), remove the rank journals,
        and (torchrun) wait for rank 0; every rank returns the manifest on disk.

        Raises:
            ArtifactError: (rank 0, torchrun) the merged manifest does not list every piece exactly once.
        """
        if self.main:
            if man.timing is not None and "processes" in type(man.timing).model_fields:
                man.timing.processes = self.world
            if self.world > 1:
                problem = man.mismatch()
                if problem:
                    raise ArtifactError(f"{self.run.gradients.manifest_path}: the ranks' shards do not add up ({problem}); rerun "
                                        f"`gradcouple extract --out {self.run.root} --overwrite`.")
            self.run.gradients.save_manifest(man)
            for path in self.run.gradients.rank_manifest_paths():
                path.unlink(missing_ok=True)
            self.run.save_config(cfg)
        if self.world > 1:
            barrier()
            if not self.main:
                man = self.run.gradients.load_manifest()
        return man
