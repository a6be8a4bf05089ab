"""``RUN/gradients/``: the manifest, the shard files and the rank journals of an unfinished
torchrun extraction.

    manifest.json             what was extracted, from what, and where each piece lies (Manifest)
    shard-00012.pt            one shard per shard number (gradcouple.stores writes and reads them)
    manifest.rank-R.jsonl     rank R's finished shards of an unfinished torchrun extraction: a
                              header line, then one fsynced line per shard; merged and removed at the end
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pydantic import ValidationError

from ..artifacts import Manifest, PieceRecord, ShardEntry
from ..errors import ArtifactError
from ..io import atomic_open, write_json
from .journal import Journal

if TYPE_CHECKING:
    from .layout import RunDir

RANK_JOURNAL_FORMAT = "gradcouple-rank-manifest"
#: one finished shard of a rank journal: (global shard number, its entry, its pieces' records)
RankEntry = tuple[int, ShardEntry, list[PieceRecord]]


class GradientFiles:
    """The gradient files of one run directory."""

    def __init__(self, run: "RunDir"):
        self.run = run
        self.dir = run.root / "gradients"

    @property
    def manifest_path(self) -> Path: return self.dir / "manifest.json"
    def shard_path(self, k: int) -> Path: return self.dir / f"shard-{k:05d}.pt"
    def shard_file(self, entry: ShardEntry) -> Path: return self.dir / entry.file
    def rank_manifest_path(self, rank: int) -> Path: return self.dir / f"manifest.rank-{rank}.jsonl"
    def rank_manifest_paths(self) -> list[Path]: return sorted(self.dir.glob("manifest.rank-*.jsonl"))

    def has_manifest(self) -> bool:
        return self.manifest_path.is_file()

    def load_manifest(self, complete: bool = True) -> Manifest:
        """The manifest, checked against itself and the run's pieces.jsonl (not against the shard
        files: :class:`~gradcouple.stores.GradientReader` hashes those).

        Raises:
            ArtifactError: absent; unreadable or not JSON; from another gradcouple version; a
                field missing or invalid; a pieces list that does not match the shard list
                (:meth:`Manifest.mismatch`) or the ids of RUN/pieces.jsonl; or (with ``complete``)
                unfinished. Each message names the file and the fix (``extract --overwrite``,
                which recomputes every shard; or, unfinished, the same ``extract`` to resume).
        """
        p, root = self.manifest_path, self.run.root
        fix = f"rerun `gradcouple extract --out {root} --overwrite` (it recomputes every shard)."
        if not p.is_file():
            if (done := self.unfinished()) is not None:
                raise ArtifactError(f"{p}: the extraction under torchrun was interrupted ({done}); rerun `gradcouple "
                                    f"extract --out {root}` (with any number of processes) to finish it.")
            raise ArtifactError(f"{p}: no gradient manifest; make one with `gradcouple extract --data PIECES.jsonl "
                                f"--out {root}`.")
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
            done = sum(r is not None for r in man.pieces)
            raise ArtifactError(f"{p}: the extraction is incomplete ({len(man.shards)} shards, {done} of "
                                f"{len(man.pieces)} pieces); rerun `gradcouple extract --out {root}` to resume it.")
        return man

    def _pieces_mismatch(self, man: Manifest) -> Optional[str]:
        """Where the manifest's piece ids differ from RUN/pieces.jsonl's (None: they agree, or there
        is no readable pieces.jsonl to compare with; ``RunDir.load_pieces`` reports that one)."""
        path = self.run.pieces_path
        try:
            with open(path, encoding="utf-8") as fh:
                ids = [json.loads(line)["id"] for line in fh if line.strip()]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        for i, rec in enumerate(man.pieces):
            if rec is not None and (i >= len(ids) or rec.id != ids[i]):
                there = f"{ids[i]!r}" if i < len(ids) else "absent"
                return f"piece {i} is {rec.id!r} in the manifest but {there} in {path}"
        if len(ids) != len(man.pieces):
            return f"it lists {len(man.pieces)} pieces where {path} has {len(ids)}"
        return None

    def header(self) -> Optional[Manifest]:
        """What the run's extraction, finished or not, was made from: manifest.json, else the header of
        an interrupted torchrun extraction's rank journal; None when there is neither (or neither reads)."""
        if self.has_manifest():
            try:
                return self.load_manifest(complete=False)
            except ArtifactError:
                return None
        for path in self.rank_manifest_paths():
            head, _, why = self.read_rank_journal(path)
            if why is None:
                return head
        return None

    def unfinished(self) -> Optional[str]:
        """How far an interrupted extraction got ('7 of 12 shards', '11 shards in the rank journals'),
        or None when the run has no interrupted extraction."""
        if self.has_manifest():
            try:
                man = self.load_manifest(complete=False)
            except ArtifactError:
                return None
            if man.complete:
                return None
            done = sum(p is not None for p in man.pieces)
            return f"{len(man.shards)} shards ({done} of {len(man.pieces)} pieces) done"
        shards = {k for path in self.rank_manifest_paths() for k, _, _ in self.read_rank_journal(path)[1]}
        return f"{len(shards)} shards done, in {len(self.rank_manifest_paths())} rank journals" if self.rank_manifest_paths() else None

    def save_manifest(self, manifest: Manifest) -> None:
        write_json(self.manifest_path, manifest.model_dump(mode="json"))

    def clear(self) -> None:
        """Remove every gradient file (``--overwrite``, or an extraction from other inputs)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def read_rank_journal(self, path: Path) -> tuple[Optional[Manifest], list[RankEntry], Optional[str]]:
        """(header, finished shards, why it is unusable or None) of the rank journal ``path``.

        A line cut short (the rank died while writing it) is skipped: its shard is recomputed.
        """
        try:
            lines = Journal(path).lines()
        except OSError as e:
            return None, [], f"cannot read it ({e.strerror})"
        try:
            head = lines[0]
            if head.get("journal") != RANK_JOURNAL_FORMAT:
                raise ValueError("not a journal")
            version = head["header"].get("version")
            if version != Manifest.model_fields["version"].default:
                return None, [], f"made by another gradcouple version (manifest version {version})"
            header = Manifest.model_validate(head["header"])
        except (IndexError, ValueError, KeyError, TypeError, AttributeError, ValidationError):
            return None, [], "not a gradcouple rank manifest"
        out = []
        for d in lines[1:]:
            try:
                out.append((int(d["shard"]), ShardEntry.model_validate(d["entry"]),
                            [PieceRecord.model_validate(p) for p in d["pieces"]]))
            except (ValueError, KeyError, TypeError, ValidationError):
                continue
        return header, out, None

    def rank_journal(self, rank: int, world_size: int, header: Manifest) -> Journal:
        """Rank ``rank``'s journal, started with its header line (atomically) when new."""
        path = self.rank_manifest_path(rank)
        if not path.is_file():
            head = header.model_dump(mode="json", exclude={"shards", "pieces", "timing", "complete"})
            with atomic_open(path, "w", encoding="utf-8") as fh:
                fh.write(json.dumps({"journal": RANK_JOURNAL_FORMAT, "rank": rank, "world_size": world_size,
                                     "header": head}, ensure_ascii=False) + "\n")
        return Journal(path)

    @staticmethod
    def journal_line(k: int, entry: ShardEntry, records: list[PieceRecord]) -> dict:
        """The rank journal line of finished shard ``k``."""
        return {"shard": k, "entry": entry.model_dump(mode="json"), "pieces": [r.model_dump(mode="json") for r in records]}


__all__ = ["GradientFiles", "RANK_JOURNAL_FORMAT", "RankEntry"]
