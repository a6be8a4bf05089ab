"""The run directory: every path of a run, loading and saving each artifact, and the one rule
that decides whether an artifact is current.

    RUN/pieces.jsonl            the pieces as extracted           (extract)
    RUN/config.json             the resolved RunConfig            (every stage)
    RUN/gradients/              manifest.json, shard-*.pt         (extract)
    RUN/gradients/manifest.rank-R.jsonl  what torchrun rank R finished of an unfinished extraction; merged and removed at the end
    RUN/coupling/               gram.pt, cosine.pt | topk.pt, pairs.csv, pairs_different_answer.csv, stats.json (couple)
    RUN/ripple/                 summary.json, edits.jsonl (pieces mode) | tests.jsonl (benchmark mode), sweep.json (ripple)
    RUN/ripple/journal-*.jsonl  finished edits of an unfinished ripple, one line each; removed when ripple completes
    RUN/ripple/covariance-*.pt  a target's key covariance over Wikipedia text (ripple), keyed by model, layer and tokens
    RUN/report/                 index.html, summary.json          (report)
    RUN/timing.json             stage wall times of `gradcouple run`
    RUN/data/                   the bundled samples `gradcouple run` converted, when no --data was given
    RUN/.lock                   held by the stage writing into the run (pid, host, stage)

Every artifact (typed in :mod:`gradcouple.artifacts`) records the fingerprints of its inputs.
:func:`stale_inputs` compares them with the current ones and names each difference; a stage
either recomputes or refuses with that list, never reuses silently. Only this module builds a
run path or parses a stored artifact.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
from pydantic import BaseModel, ValidationError

from .artifacts import (
    BenchmarkSummary,
    CouplingStats,
    Inputs,
    Manifest,
    Measurement,
    PairRow,
    RippleSummary,
    ShardEntry,
    SweepSummary,
    TestMeasurement,
)
from .config import RunConfig
from .errors import ArtifactError, ConfigError
from .io import atomic_open, atomic_torch_save, digest, sha256_file, write_json
from .pieces import KnowledgePiece, read_pieces, write_pieces
from .ranks import is_main

log = logging.getLogger(__name__)

INPUT_LABELS = {"pieces": "pieces file (sha256)", "config": "settings (config hash)", "model": "model weights (fingerprint)",
                "gradients": "gradients (manifest fingerprint)", "coupling": "coupling matrix (sha256)"}


def stale_inputs(recorded: Inputs, current: Inputs) -> list[str]:
    """The one freshness rule: every input whose recorded fingerprint differs from the current one.

    Returns human-readable lines ``"pieces file (sha256): 3f2a91c0 -> 77b0e1d4"``; empty when current.
    """
    out = []
    for key in sorted(set(recorded.values) | set(current.values)):
        a, b = recorded.values.get(key), current.values.get(key)
        if a != b:
            out.append(f"{INPUT_LABELS.get(key, key)}: {_short(a)} -> {_short(b)}")
    return out


def _short(x: Optional[str]) -> str:
    return "none" if x is None else (x[:8] if len(x) >= 32 and all(c in "0123456789abcdef" for c in x) else x)


def _load_json_model(path: Path, model: type[BaseModel], fix: str):
    try:
        return model.model_validate_json(path.read_bytes())
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror}); {fix}") from None
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "<document>"
        raise ArtifactError(f"{path}: field '{loc}': {err['msg']}; {fix}") from None


_HELD: set[Path] = set()  # run directories this process has locked (stages nest inside `run`)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    """Paths and artifacts of one run directory (see the module docstring for the layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # paths
    @property
    def pieces_path(self) -> Path: return self.root / "pieces.jsonl"
    @property
    def config_path(self) -> Path: return self.root / "config.json"
    @property
    def timing_path(self) -> Path: return self.root / "timing.json"
    @property
    def data_dir(self) -> Path: return self.root / "data"
    @property
    def gradients_dir(self) -> Path: return self.root / "gradients"
    @property
    def manifest_path(self) -> Path: return self.gradients_dir / "manifest.json"
    def shard_path(self, k: int) -> Path: return self.gradients_dir / f"shard-{k:05d}.pt"
    def shard_file(self, entry: ShardEntry) -> Path: return self.gradients_dir / entry.file
    def rank_manifest_path(self, rank: int) -> Path: return self.gradients_dir / f"manifest.rank-{rank}.jsonl"
    def rank_manifest_paths(self) -> list[Path]: return sorted(self.gradients_dir.glob("manifest.rank-*.jsonl"))
    @property
    def coupling_dir(self) -> Path: return self.root / "coupling"
    @property
    def gram_path(self) -> Path: return self.coupling_dir / "gram.pt"
    @property
    def cosine_path(self) -> Path: return self.coupling_dir / "cosine.pt"
    @property
    def topk_path(self) -> Path: return self.coupling_dir / "topk.pt"
    @property
    def pairs_path(self) -> Path: return self.coupling_dir / "pairs.csv"
    @property
    def pairs_different_answer_path(self) -> Path: return self.coupling_dir / "pairs_different_answer.csv"
    @property
    def stats_path(self) -> Path: return self.coupling_dir / "stats.json"
    @property
    def ripple_dir(self) -> Path: return self.root / "ripple"
    @property
    def edits_path(self) -> Path: return self.ripple_dir / "edits.jsonl"
    @property
    def ripple_summary_path(self) -> Path: return self.ripple_dir / "summary.json"
    @property
    def tests_path(self) -> Path: return self.ripple_dir / "tests.jsonl"
    @property
    def sweep_path(self) -> Path: return self.ripple_dir / "sweep.json"
    @property
    def report_dir(self) -> Path: return self.root / "report"
    @property
    def index_path(self) -> Path: return self.report_dir / "index.html"
    @property
    def report_summary_path(self) -> Path: return self.report_dir / "summary.json"

    @property
    def lock_path(self) -> Path: return self.root / ".lock"

    @contextlib.contextmanager
    def lock(self, stage: str, create: bool = False) -> Iterator[None]:
        """Hold the run directory's advisory lock (``RUN/.lock``: pid, host, stage, start time) while a stage writes.

        Re-entrant within a process; under torchrun only rank 0 takes it, for every rank. A lock
        left by a dead process on this host is taken over with a note on stderr. Only a stage that makes a run (``create``) creates its directory, and removes
        it again when the stage leaves it empty (it failed before writing anything).

        Raises:
            ArtifactError: another live process holds the lock (the message names it), or the run
                directory does not exist and ``create`` is False.
        """
        key = self.root.resolve()
        if key in _HELD or not is_main():  # under torchrun rank 0 holds it for every rank
            yield
            return
        if not create and not self.root.is_dir():
            raise ArtifactError(f"{self.root}: no such run directory; make one with `gradcouple extract --out {self.root}` "
                                f"or `gradcouple run --out {self.root}`.")
        made = [d for d in (self.root, *self.root.parents) if not d.exists()]
        self.root.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        while True:
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.lock_path.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError):
                    holder = {}
                same_host = holder.get("host") == me["host"]
                if same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                    log.info(f"{self.lock_path}: taking over the lock of {holder.get('stage')} (pid {holder['pid']}), "
                             f"which is no longer running.")
                    self.lock_path.unlink(missing_ok=True)
                    continue
                raise ArtifactError(
                    f"{self.root}: in use by `gradcouple {holder.get('stage', '?')}` (pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')}, since {holder.get('started', '?')}); wait for it to finish, or delete "
                    f"{self.lock_path} if that process is gone.") from None
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(me, fh)
            break
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
            self.lock_path.unlink(missing_ok=True)
            for d in made:  # a stage that failed before writing anything leaves no empty run directory behind
                with contextlib.suppress(OSError):
                    d.rmdir()

    def relative(self, path: Path) -> str:
        """``path`` relative to the run directory, with forward slashes."""
        return Path(path).relative_to(self.root).as_posix()

    def files(self) -> list[tuple[str, int]]:
        """(relative path, bytes) of every finished file of the run, sorted (temp files left out)."""
        return [(self.relative(p), p.stat().st_size) for p in sorted(self.root.rglob("*"))
                if p.is_file() and not p.name.startswith(".")]

    # pieces and config
    def save_pieces(self, pieces: list[KnowledgePiece]) -> None:
        write_pieces(self.pieces_path, pieces)

    def load_pieces(self) -> list[KnowledgePiece]:
        """Raises: DataError (unreadable line), ArtifactError (absent)."""
        if not self.pieces_path.is_file():
            raise ArtifactError(f"{self.pieces_path}: no pieces; run `gradcouple extract --out {self.root}` first.")
        return read_pieces(self.pieces_path)

    def save_config(self, cfg: RunConfig) -> None:
        cfg.save(self.config_path)

    def saved_config_path(self) -> Optional[Path]:
        """config.json when the run has one (the base of flags given to a later stage)."""
        return self.config_path if self.config_path.is_file() else None

    def save_timing(self, seconds: dict[str, float]) -> None:
        write_json(self.timing_path, seconds)

    # gradients
    def has_manifest(self) -> bool:
        return self.manifest_path.is_file()

    def load_manifest(self, complete: bool = True) -> Manifest:
        """The gradient manifest, checked against itself and the run's pieces.jsonl (not against the
        shard files: :class:`~gradcouple.stores.GradientReader` hashes those).

        Raises:
            ArtifactError: absent; unreadable or not JSON; from another gradcouple version; a
                field missing or invalid; a pieces list that does not match the shard list
                (:meth:`Manifest.mismatch`) or the ids of RUN/pieces.jsonl; or (with ``complete``)
                unfinished. Each message names the file and the fix (``extract --overwrite``,
                which recomputes every shard; or, unfinished, the same ``extract`` to resume).
        """
        p = self.manifest_path
        fix = f"rerun `gradcouple extract --out {self.root} --overwrite` (it recomputes every shard)."
        if not p.is_file():
            raise ArtifactError(f"{p}: no gradient manifest; run `gradcouple extract --out {self.root}` first.")
        try:
            data = p.read_bytes()
            raw = json.loads(data)
        except OSError as e:
            raise ArtifactError(f"{p}: cannot read ({e.strerror}); check its permissions, or {fix}") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ArtifactError(f"{p}: not valid JSON ({e}); {fix}") from None
        if not isinstance(raw, dict):
            raise ArtifactError(f"{p}: not a gradient manifest (a JSON {type(raw).__name__}, not an object); {fix}")
        if "version" in raw and raw["version"] != Manifest.model_fields["version"].default:
            raise ArtifactError(f"{p}: made by another gradcouple version (manifest version {raw['version']}); {fix}")
        missing = [k for k in Manifest.model_fields if k not in raw]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ArtifactError(f"{p}: field '{missing[0]}' is missing{more}; {fix}")
        try:
            man = Manifest.model_validate_json(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"]) or "<document>"
            raise ArtifactError(f"{p}: field '{loc}': {err['msg']}; {fix}") from None
        problem = man.mismatch()
        if problem:
            raise ArtifactError(f"{p}: {problem}; the manifest does not match its shards; {fix}")
        problem = self._pieces_mismatch(man)
        if problem:
            raise ArtifactError(f"{p}: {problem}; the manifest does not match the run's pieces; {fix}")
        if complete and not man.complete:
            raise ArtifactError(f"{p}: extraction is incomplete ({len(man.shards)} shards); "
                                f"rerun the same `gradcouple extract` command to resume it.")
        return man

    def _pieces_mismatch(self, man: Manifest) -> Optional[str]:
        """Where the manifest's piece ids differ from RUN/pieces.jsonl's (None: they agree, or there
        is no readable pieces.jsonl to compare with; :meth:`load_pieces` reports that one)."""
        try:
            with open(self.pieces_path, encoding="utf-8") as fh:
                ids = [json.loads(line)["id"] for line in fh if line.strip()]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        for i, rec in enumerate(man.pieces):
            if rec is not None and (i >= len(ids) or rec.id != ids[i]):
                there = f"{ids[i]!r}" if i < len(ids) else "absent"
                return f"piece {i} is {rec.id!r} in the manifest but {there} in {self.pieces_path}"
        if len(ids) != len(man.pieces):
            return f"it lists {len(man.pieces)} pieces where {self.pieces_path} has {len(ids)}"
        return None

    def save_manifest(self, manifest: Manifest) -> None:
        write_json(self.manifest_path, manifest.model_dump(mode="json"))

    def clear_gradients(self) -> None:
        shutil.rmtree(self.gradients_dir, ignore_errors=True)

    # coupling
    def save_full_coupling(self, ids: list[str], gram: torch.Tensor, cosine: torch.Tensor) -> str:
        """Write gram.pt and cosine.pt ({"ids", "gram"|"cosine": (N, N) float64}); remove topk.pt. Returns cosine.pt's sha256."""
        atomic_torch_save({"ids": ids, "gram": gram}, self.gram_path)
        atomic_torch_save({"ids": ids, "cosine": cosine}, self.cosine_path)
        self.topk_path.unlink(missing_ok=True)
        return sha256_file(self.cosine_path)

    def save_topk_coupling(self, ids: list[str], indices: torch.Tensor, cosine: torch.Tensor) -> str:
        """Write topk.pt ({"ids", "indices" (N, k) int64, "cosine" (N, k) float32}); remove the full-mode files."""
        atomic_torch_save({"ids": ids, "indices": indices, "cosine": cosine}, self.topk_path)
        for stale in (self.cosine_path, self.gram_path, self.pairs_different_answer_path):
            stale.unlink(missing_ok=True)
        return sha256_file(self.topk_path)

    def matrix_path(self) -> Path:
        """cosine.pt in full mode, topk.pt in top-k mode.

        Raises:
            ArtifactError: neither exists.
        """
        for p in (self.cosine_path, self.topk_path):
            if p.is_file():
                return p
        raise ArtifactError(f"{self.cosine_path}: no coupling matrix (nor topk.pt); run `gradcouple couple --run {self.root}` first.")

    def load_cosine(self) -> tuple[list[str], torch.Tensor]:
        """(ids, (N, N) float64 GradSim) in pieces.jsonl order.

        Raises:
            ArtifactError: not computed yet, or computed in top-k mode.
        """
        if not self.cosine_path.is_file():
            raise ArtifactError(f"{self.cosine_path}: no full coupling matrix; run `gradcouple couple --run {self.root}` "
                                f"(without --top-k) first.")
        d = torch.load(self.cosine_path, weights_only=True, map_location="cpu")
        return list(d["ids"]), d["cosine"].double()

    def load_gram(self) -> torch.Tensor:
        """The (N, N) float64 Gram matrix <g_i, g_j> in pieces.jsonl order (full mode only)."""
        if not self.gram_path.is_file():
            raise ArtifactError(f"{self.gram_path}: no Gram matrix; run `gradcouple couple --run {self.root}` (without --top-k).")
        return torch.load(self.gram_path, weights_only=True, map_location="cpu")["gram"].double()

    def load_topk(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(ids, indices (N, k) int64, cosine (N, k) float64)."""
        if not self.topk_path.is_file():
            raise ArtifactError(f"{self.topk_path}: no top-k coupling; run `gradcouple couple --run {self.root} --top-k K`.")
        d = torch.load(self.topk_path, weights_only=True, map_location="cpu")
        return list(d["ids"]), d["indices"].long(), d["cosine"].double()

    def save_pairs(self, rows: list[PairRow], different_answer: bool = False) -> None:
        path = self.pairs_different_answer_path if different_answer else self.pairs_path
        with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(PairRow.model_fields))
            w.writeheader()
            for r in rows:
                w.writerow({**r.model_dump(), "cosine": f"{r.cosine:.6f}"})

    def load_pairs(self, different_answer: bool = False) -> list[PairRow]:
        """Rows of pairs.csv (or pairs_different_answer.csv; [] when that one is absent in top-k mode)."""
        path = self.pairs_different_answer_path if different_answer else self.pairs_path
        if not path.is_file():
            if different_answer:
                return []
            raise ArtifactError(f"{path}: no list of coupled pairs; run `gradcouple couple --run {self.root}` first.")
        with open(path, encoding="utf-8", newline="") as fh:
            try:
                return [PairRow.model_validate({**r, "same_question": r["same_question"] == "True",
                                                "same_answer": r["same_answer"] == "True"}) for r in csv.DictReader(fh)]
            except (ValidationError, KeyError) as e:
                raise ArtifactError(f"{path}: not a pairs table ({e}); rerun `gradcouple couple --run {self.root}`.") from None

    def save_stats(self, stats: CouplingStats) -> None:
        write_json(self.stats_path, stats.model_dump(mode="json"))

    def load_stats(self) -> CouplingStats:
        if not self.stats_path.is_file():
            raise ArtifactError(f"{self.stats_path}: no coupling statistics; run `gradcouple couple --run {self.root}` first.")
        return _load_json_model(self.stats_path, CouplingStats, f"rerun `gradcouple couple --run {self.root}`.")

    # ripple
    def save_ripple(self, summary: RippleSummary | BenchmarkSummary,
                    rows: list[Measurement] | list[TestMeasurement]) -> None:
        """summary.json, and one line per measurement: edits.jsonl (pieces mode) or tests.jsonl (benchmark mode)."""
        keep = self.tests_path if summary.mode == "benchmark" else self.edits_path
        for stale in {self.tests_path, self.edits_path} - {keep}:
            stale.unlink(missing_ok=True)
        with atomic_open(keep, "w", encoding="utf-8") as fh:
            for m in rows:
                fh.write(m.model_dump_json() + "\n")
        write_json(self.ripple_summary_path, summary.model_dump(mode="json"))
        self.clear_journals()

    def save_sweep(self, sweep: SweepSummary) -> None:
        write_json(self.sweep_path, sweep.model_dump(mode="json"))
        self.clear_journals()

    def journal(self, inputs: Inputs) -> "EditJournal":
        """The journal of finished edits for ripple inputs ``inputs`` (one file per inputs, so a
        sweep's strengths each resume), holding whatever an interrupted earlier run finished."""
        return EditJournal(self.ripple_dir / f"journal-{digest(inputs.values)[:12]}.jsonl")

    def covariance_path(self, key: object) -> Path:
        """Where ripple keeps the key covariance computed under ``key`` (model fingerprint, layer, text, tokens)."""
        return self.ripple_dir / f"covariance-{digest(key)[:16]}.pt"

    def clear_journals(self) -> None:
        """Remove every journal: called once ripple's results are saved."""
        for path in self.ripple_dir.glob("journal-*.jsonl"):
            path.unlink(missing_ok=True)

    def load_sweep(self) -> SweepSummary:
        return _load_json_model(self.sweep_path, SweepSummary, f"rerun `gradcouple ripple --run {self.root} --sweep ...`.")

    def has_ripple(self) -> bool:
        return self.ripple_summary_path.is_file()

    def load_ripple(self) -> tuple[RippleSummary | BenchmarkSummary, list[Measurement] | list[TestMeasurement]]:
        """The ripple summary (either mode) and its measurement lines."""
        fix = f"rerun `gradcouple ripple --run {self.root}`."
        try:
            mode = json.loads(self.ripple_summary_path.read_text(encoding="utf-8")).get("mode", "pieces")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise ArtifactError(f"{self.ripple_summary_path}: unreadable ({e}); {fix}") from None
        model, line_model, path = ((BenchmarkSummary, TestMeasurement, self.tests_path) if mode == "benchmark"
                                   else (RippleSummary, Measurement, self.edits_path))
        summary = _load_json_model(self.ripple_summary_path, model, fix)
        rows = []
        if path.is_file():
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(line_model.model_validate_json(line))
                    except ValidationError as e:
                        raise ArtifactError(f"{path}:{n}: {e.errors()[0]['msg']}; {fix}") from None
        return summary, rows

    # freshness of the downstream artifacts
    def coupling_inputs(self, manifest: Manifest, cfg: RunConfig) -> Inputs:
        """What the coupling of this run must have been computed from now."""
        return Inputs(values={"gradients": manifest.fingerprint(), "config": cfg.couple_hash()})

    def current_stats(self, manifest: Manifest) -> CouplingStats:
        """The coupling statistics, checked against the gradients and the matrix file on disk.

        Raises:
            ArtifactError: absent, or computed from other gradients, or the matrix file was replaced;
                the message names what changed and the command that recomputes it.
        """
        stats = self.load_stats()
        changed = stale_inputs(Inputs(values={"gradients": stats.inputs.values.get("gradients", "")}),
                               Inputs(values={"gradients": manifest.fingerprint()}))
        path = self.matrix_path()
        if sha256_file(path) != stats.matrix_sha256:
            changed.append(f"{INPUT_LABELS['coupling']}: {self.relative(path)} differs from the one stats.json records")
        if changed:
            raise ArtifactError(f"{self.stats_path}: stale coupling ({'; '.join(changed)}); "
                                f"rerun `gradcouple couple --run {self.root}`.")
        return stats

    def ripple_inputs(self, manifest: Manifest, stats: CouplingStats, cfg: RunConfig) -> Inputs:
        return Inputs(values={"gradients": manifest.fingerprint(), "coupling": stats.matrix_sha256,
                              "config": cfg.ripple_hash()})

    def current_ripple(self, manifest: Manifest, stats: CouplingStats) -> Optional[tuple[RippleSummary | BenchmarkSummary, list]]:
        """The ripple results when present and made from this run's gradients and coupling; None when absent.

        Raises:
            ArtifactError: present but stale (the message names what changed).
        """
        if not self.has_ripple():
            return None
        summary, rows = self.load_ripple()
        now = Inputs(values={"gradients": manifest.fingerprint(), "coupling": stats.matrix_sha256})
        was = Inputs(values={k: v for k, v in summary.inputs.values.items() if k in now.values})
        changed = stale_inputs(was, now)
        if changed:
            raise ArtifactError(f"{self.ripple_summary_path}: stale ripple results ({'; '.join(changed)}); rerun "
                                f"`gradcouple ripple --run {self.root}` or delete {self.ripple_dir}.")
        return summary, rows

    def check_pieces_match(self, ids: list[str], what: Path) -> None:
        """Raises ArtifactError when ``ids`` (of ``what``) are not the run's pieces in order."""
        if ids != [p.id for p in self.load_pieces()]:
            raise ArtifactError(f"{what} does not match {self.pieces_path}; rerun `gradcouple couple --run {self.root}`.")


class EditJournal:
    """Append-only record of ripple's finished edits, so an interrupted ripple resumes.

    One JSON line per finished edit, flushed and fsynced before the next edit starts, written
    only after the model's weights are restored. A line cut short by SIGKILL is ignored on
    reading. ``done[k]`` is edit ``k``'s payload when its ``key`` (which edit it was) matches.
    """

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[int, dict] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self.done[int(entry["edit"])] = entry
                except (ValueError, KeyError, TypeError):
                    continue  # the line being written when the process died
        self._fh = None

    def finished(self, k: int, key: str) -> Optional[dict]:
        """Edit ``k``'s payload from an earlier run, or None when it did not finish (or was another edit)."""
        entry = self.done.get(k)
        return entry["payload"] if entry and entry.get("key") == key else None

    def append(self, k: int, key: str, payload: dict) -> None:
        """Record edit ``k`` (identified by ``key``) as finished; durable when this returns."""
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
            if self._fh.tell() and not self.path.read_bytes().endswith(b"\n"):
                self._fh.write("\n")  # end a line cut short, so the new one parses
        self._fh.write(json.dumps({"edit": k, "key": key, "payload": payload}) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def locked(stage: str):
    """Decorator of a stage ``fn(cfg, run_dir, ...)``: it runs holding ``RunDir(run_dir).lock(stage)``."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(cfg, run_dir, *args, **kwargs):
            with RunDir(run_dir).lock(stage, create=stage in ("extract", "run")):
                return fn(cfg, run_dir, *args, **kwargs)
        return inner
    return wrap


def default_run_dir(model: str, cfg: RunConfig) -> Path:
    """``runs/<model>-<extraction hash>``: where ``couple --model`` works when no run directory is given."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_")
    return Path("runs") / f"{slug}-{cfg.extract_hash()[:8]}"


def load_data_pieces(cfg: RunConfig) -> list[KnowledgePiece]:
    """The first ``data.limit`` pieces of ``data.pieces``.

    Raises:
        ConfigError: no pieces file configured.
        DataError: unreadable pieces file.
    """
    if cfg.data.pieces is None:
        raise ConfigError("no pieces file: pass --data PIECES.jsonl (make one with `gradcouple download`).")
    pieces = read_pieces(cfg.data.pieces)
    return pieces[: cfg.data.limit] if cfg.data.limit else pieces


__all__ = ["RunDir", "EditJournal", "stale_inputs", "locked", "default_run_dir", "load_data_pieces"]
