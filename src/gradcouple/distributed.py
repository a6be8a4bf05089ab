"""Many processes, GPUs and nodes under ``torchrun``: one result, identical to a single process.

    torchrun --nproc-per-node K -m gradcouple extract ...                       (one machine)
    torchrun --nnodes 2 --node-rank R --nproc-per-node K \\
             --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m gradcouple extract ...   (several)

torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; without them (or with ``WORLD_SIZE``
1) nothing here starts a process group and every stage runs as one process, unchanged. The
process group is gloo on CPU, NCCL for CUDA tensors (``cpu:gloo,cuda:nccl``); everything this
module sends (decisions, Gram parts, top-k lists) is a CPU tensor or object, so it goes over gloo.
The run directory must be one shared file system for every node.

**extract**: every rank tokenizes and length-sorts all pieces (the global shard plan, the same for
every K). Rank 0 decides what earlier, possibly interrupted, extractions left that can be kept
(``manifest.json`` and every ``manifest.rank-R.jsonl`` made from the same inputs) and deals the
other shards to the ranks by token totals (greedy longest-processing-time, so the ranks get
about equal work, not equal counts). Each rank writes its shards under their global numbers
(``shard-00012.pt``, so names never collide) and appends one fsynced line per shard to its
journal ``gradients/manifest.rank-R.jsonl``. After a barrier rank 0 writes ``manifest.json``
(every piece exactly once) and removes the journals. A rank that dies leaves its complete shards
and its journal; a rerun with the same or another K (or one process) resumes from them.

**couple**: the block rows of the Gram are dealt to the ranks (by token products, the factored
cost); each computes its block pairs; rank 0 receives the sum of the parts (full matrix) or every
rank's top-k lists, merges them and writes the same files as one process. Only rank 0 shows
progress, writes results and prints summaries; ``ripple``, ``report``, ``download`` and ``run``
run on rank 0 alone (:func:`runs_here`).
"""

from __future__ import annotations

import atexit
import datetime
import heapq
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from pydantic import ValidationError

from .artifacts import Manifest, PieceRecord, ShardEntry
from .errors import ArtifactError, ConfigError
from .io import atomic_open, sha256_file
from .rundir import RunDir

#: commands that split their work across the ranks of a torchrun job; the others run on rank 0 alone
DISTRIBUTED_COMMANDS = ("extract", "couple")
#: how long a rank waits for the others at a collective (a dead rank ends the job sooner: torchrun stops them all)
TIMEOUT = datetime.timedelta(hours=3)
JOURNAL_FORMAT = "gradcouple-rank-manifest"

_single = False  # set by runs_here: this torchrun process runs a single-process command alone


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


def world_size() -> int:
    """Processes of this torchrun job (1 outside torchrun)."""
    return 1 if _single else max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's rank (0 outside torchrun)."""
    return 0 if world_size() == 1 else _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its machine (0 outside torchrun)."""
    return 0 if world_size() == 1 else _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """True on rank 0, which shows progress, writes the merged results and prints summaries."""
    return rank() == 0


def runs_here(argv: Sequence[str]) -> bool:
    """Whether this process runs the command line ``argv`` (``python -m gradcouple`` / ``torchrun``).

    extract and couple run on every rank. Any other command under torchrun runs on rank 0 alone,
    as one process (it stays single-process: ripple and report read what extract and couple
    wrote); the other ranks exit at once.
    """
    global _single
    if world_size() == 1:
        return True
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in DISTRIBUTED_COMMANDS:
        return True
    on_main = _env_int("RANK", 0) == 0
    _single = True
    return on_main


def rank_device(spec: str) -> str:
    """The device this rank computes on: under torchrun on a CUDA machine ``auto`` and ``cuda``
    become ``cuda:LOCAL_RANK`` (one GPU per process); anything else is kept as given.

    Raises:
        ConfigError: ``auto-map`` (one model spread over every GPU of a machine) with more than
            one process per machine.
    """
    if world_size() == 1:
        return spec
    if spec == "auto-map" and _env_int("LOCAL_WORLD_SIZE", 1) > 1:
        raise ConfigError("--device auto-map spreads one model over every GPU of a machine, so it needs one process per "
                          "machine: run torchrun with --nproc-per-node 1 (and --nnodes N), or use --device auto.")
    if spec in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank() % torch.cuda.device_count()}"
    return spec


def compute_device(spec: Optional[str]) -> Optional[torch.device]:
    """The device of couple's Gram blocks: a CUDA device when ``spec`` names one (``cuda``,
    ``cuda:N``; under torchrun ``cuda`` is the rank's own GPU), else None (the CPU, as always).

    Raises:
        ModelError: ``spec`` names a CUDA device this machine does not have.
    """
    if not spec or not str(spec).startswith("cuda"):
        return None
    from .models import resolve_device

    return resolve_device(rank_device(str(spec)))


def _destroy() -> None:
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 (exiting anyway)
        pass


def group():
    """Start this torchrun job's process group (once; from torchrun's environment). No-op in one process.

    Raises:
        ConfigError: torch was built without torch.distributed.
    """
    if world_size() == 1:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run gradcouple without torchrun.")
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available() and dist.is_nccl_available():
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
        atexit.register(_destroy)
    return dist.group.WORLD


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if world_size() > 1:
        import torch.distributed as dist

        group()
        dist.barrier()


def decide(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 alone; its value (or the exception it raised) on every rank.

    In one process this is ``fn()``.
    """
    if world_size() == 1:
        return fn()
    import torch.distributed as dist

    group()
    box: list = [None]
    error = None
    if is_main():
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 (re-raised on every rank)
            error, box[0] = e, ("error", e)
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise value
    return value


def balance(weights: Sequence[float], parts: int) -> list[list[int]]:
    """Greedy longest-processing-time: the indices of ``weights`` dealt to ``parts`` bins, heaviest
    first, each to the bin with the smallest sum so far (ties: the lower index, the lower bin).
    The sums come out about equal (LPT is within 4/3 of the optimum); each bin is sorted."""
    bins: list[list[int]] = [[] for _ in range(parts)]
    heap = [(0.0, b) for b in range(parts)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + float(weights[i]), b))
    return [sorted(b) for b in bins]


# ---------------------------------------------------------------------------------------------
# extract


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
            path = run.shard_file(entry)
            if path not in digests:
                digests[path] = sha256_file(path) if path.is_file() else ""
            if digests[path] == entry.sha256:
                for r in rows:
                    self.pieces[r] = recs[r]
                return entry
        return None


def read_journal(path: Path) -> tuple[Optional[Manifest], list[tuple[int, ShardEntry, list[PieceRecord]]], Optional[str]]:
    """(header, [(shard number, entry, records)], why it is unusable or None) of a rank journal.

    A line cut short (the rank died while writing it) is skipped: its shard is recomputed.
    """
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        return None, [], f"cannot read it ({e.strerror})"
    try:
        head = json.loads(lines[0])
        if head.get("journal") != JOURNAL_FORMAT:
            raise ValueError("not a journal")
        version = head["header"].get("version")
        if version != Manifest.model_fields["version"].default:
            return None, [], f"made by another gradcouple version (manifest version {version})"
        header = Manifest.model_validate(head["header"])
    except (IndexError, ValueError, KeyError, TypeError, AttributeError, ValidationError):
        return None, [], "not a gradcouple rank manifest"
    out = []
    for line in lines[1:]:
        try:
            d = json.loads(line)
            out.append((int(d["shard"]), ShardEntry.model_validate(d["entry"]),
                        [PieceRecord.model_validate(p) for p in d["pieces"]]))
        except (ValueError, KeyError, TypeError, ValidationError):
            continue
    return header, out, None


def journal_changes(run: RunDir, inputs, config: dict) -> Optional[list[str]]:
    """What differs between the rank journals in ``run`` and an extraction from ``inputs`` and
    ``config`` now: None when they all match (resume them), else the differences, file by file."""
    from .extract import _changes

    changed = []
    for path in run.rank_manifest_paths():
        head, _, why = read_journal(path)
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
    from .extract import resume_point

    previous = resume_point(run, header, overwrite)
    paths = run.rank_manifest_paths()
    if overwrite and paths:
        run.clear_gradients()
        return None
    changed = journal_changes(run, header.inputs, header.config)
    if changed:
        raise ConfigError(f"{run.gradients_dir}: an interrupted extraction under torchrun was made from other inputs "
                          f"({'; '.join(changed)}); pass --overwrite to replace it or choose another --out.")
    found = Earlier()
    if previous is not None:
        for k, s in enumerate(previous.shards):
            found.add(k, s, [previous.pieces[r] for r in s.rows if r < len(previous.pieces)])
    for path in paths:
        for k, entry, records in read_journal(path)[1]:
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
            self.run.save_manifest(man)
            return
        entry = man.shards[-1]
        records = [man.pieces[r] for r in entry.rows]
        k = records[0].shard
        self._done.append((k, entry, records))
        self._append(k, entry, records)

    def _append(self, k: int, entry: ShardEntry, records: list[PieceRecord]) -> None:
        path = self.run.rank_manifest_path(self.rank)
        if self._journal is None:
            if not path.is_file():
                head = self.header.model_dump(mode="json", exclude={"shards", "pieces", "timing", "complete"})
                with atomic_open(path, "w", encoding="utf-8") as fh:
                    fh.write(json.dumps({"journal": JOURNAL_FORMAT, "rank": self.rank, "world_size": self.world,
                                         "header": head}, ensure_ascii=False) + "\n")
            with open(path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                ends_clean = fh.read(1) == b"\n"
            self._journal = open(path, "a", encoding="utf-8")
            if not ends_clean:
                self._journal.write("\n")  # end a line cut short, so the next one parses
        line = {"shard": k, "entry": entry.model_dump(mode="json"), "pieces": [r.model_dump(mode="json") for r in records]}
        self._journal.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

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
        import torch.distributed as dist

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
            raise ArtifactError(f"{self.run.manifest_path}: no rank wrote shard(s) {missing[:6]}; rerun the same command "
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
                    raise ArtifactError(f"{self.run.manifest_path}: the ranks' shards do not add up ({problem}); rerun "
                                        f"`gradcouple extract --out {self.run.root} --overwrite`.")
            self.run.save_manifest(man)
            for path in self.run.rank_manifest_paths():
                path.unlink(missing_ok=True)
            self.run.save_config(cfg)
        if self.world > 1:
            barrier()
            if not self.main:
                man = self.run.load_manifest()
        return man


# ---------------------------------------------------------------------------------------------
# couple


class GramShare:
    """This rank's block rows of the Gram and how the parts meet on rank 0.

    ``block_size``, ``top_k`` and ``methods`` are rank 0's (machines may differ in memory);
    ``rows`` are the block-row indices (block i = store rows [i*block_size, (i+1)*block_size))
    whose block pairs (i, j >= i) this rank computes; ``n_pairs`` counts them.
    """

    def __init__(self, rows: set[int], n_pairs: int, block_size: int, top_k: Optional[int], methods: dict[str, str]):
        self.rows, self.n_pairs = rows, n_pairs
        self.block_size, self.top_k, self.methods = block_size, top_k, methods
        self.main = is_main()

    def sum_to_main(self, t: torch.Tensor) -> None:
        """Rank 0's ``t`` becomes the sum of every rank's (each Gram entry is computed by one rank
        and zero elsewhere, so the sum is exact)."""
        import torch.distributed as dist

        dist.reduce(t, dst=0, op=dist.ReduceOp.SUM)

    def sum_layers(self, layers) -> None:
        """Rank 0's per-layer accumulators (:class:`~gradcouple.gram.LayerParts`) become the job's."""
        import torch.distributed as dist

        count = torch.tensor([float(layers.n_pairs)], dtype=torch.float64)
        for t in (layers.signed, layers.absolute, count):
            dist.reduce(t, dst=0, op=dist.ReduceOp.SUM)
        layers.n_pairs = int(count.item())

    def topk_to_main(self, best_v: torch.Tensor, best_i: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's running top-k per row (values float64, indices; store order) merged on rank 0.

        Each pair was offered to one rank only, so the merge is the top k of the union.
        """
        import torch.distributed as dist

        vs = [torch.empty_like(best_v) for _ in range(world_size())] if self.main else None
        ids = [torch.empty_like(best_i) for _ in range(world_size())] if self.main else None
        dist.gather(best_v.contiguous(), vs, dst=0)
        dist.gather(best_i.contiguous(), ids, dst=0)
        if not self.main:
            return best_v, best_i
        v, pos = torch.cat(vs, 1).topk(k, dim=1)
        return v, torch.cat(ids, 1).gather(1, pos)

    def done(self) -> None:
        """Rank 0 has written every output (a barrier)."""
        barrier()

    def follow(self, run: RunDir, reader, layers, budget: float, device: Optional[torch.device], t0: float):
        """A rank other than 0: compute this rank's block rows, hand them to rank 0, wait for its
        files and return the same :class:`~gradcouple.couple.CoupleResult`."""
        from .couple import CoupleResult
        from .gram import gram_matrix, topk_cosine

        if self.top_k is None:
            gram_matrix(reader, self.block_size, self.methods, max_memory=budget, layers=layers, share=self, device=device)
        else:
            topk_cosine(reader, self.top_k, self.block_size, self.methods, max_memory=budget, layers=layers, share=self,
                        device=device)
        self.done()
        stats = run.load_stats()
        return CoupleResult(out_dir=run.coupling_dir, n=reader.n, mode=stats.mode, seconds=time.perf_counter() - t0,
                            stats=stats)


def gram_share(reader, block_size: int, top_k: Optional[int], methods: dict[str, str]) -> Optional[GramShare]:
    """This rank's share of couple's block pairs under torchrun (None in one process).

    Block row i costs about T_i * sum_{j >= i} T_j (T: tokens of a block; the factored product
    of a block pair is T_i T_j (d_in + d_out)), and the rows are dealt by :func:`balance`.
    """
    if world_size() == 1:
        return None
    block_size, top_k, methods = decide(lambda: (block_size, top_k, dict(methods)))
    tokens = reader.tokens()
    T = [float(sum(tokens[s:s + block_size])) for s in range(0, reader.n, block_size)]
    tail = [sum(T[i:]) for i in range(len(T))]
    rows = set(balance([T[i] * tail[i] for i in range(len(T))], world_size())[rank()])
    n_pairs = sum(len(T) - i for i in rows)
    return GramShare(rows, n_pairs, block_size, top_k, methods)


__all__ = ["DISTRIBUTED_COMMANDS", "Earlier", "Extraction", "GramShare", "balance", "barrier", "compute_device", "decide",
           "earlier", "gram_share", "group", "is_main", "journal_changes", "rank", "rank_device", "read_journal", "runs_here",
           "world_size"]
