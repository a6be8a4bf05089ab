"""Multi-hop QA datasets -> knowledge pieces (``pieces.jsonl``), the ``download`` stage.

:data:`SOURCES` is the registry (name -> :class:`Source`); :func:`download` reads a source from
the Hugging Face Hub, a local file or dataset directory, or the small real sample bundled with
the package, converts every record with its format's parser (one module per format:
``hotpotqa``, ``musique``, ``twowiki``, ``wikihop``, ``bamboogle``, ``mquake``,
``rippleedits``, ``counterfact``, ``easyedit``, ``plain``), deduplicates, and writes ``out_dir/pieces.jsonl`` and
``out_dir/download.json`` (a :class:`DownloadMeta`), each atomically.

Knowledge-edit benchmarks (RippleEdits, MQuAKE) and edit requests (CounterFact, EasyEdit) also yield pieces that carry their edits: a
``role`` (edit, original, test, condition), the ``edit_id`` linking each to its edit, and for
tests their ``criterion``; ``download.json`` counts them per role and per criterion.

Bad input raises a :class:`~gradcouple.errors.DataError` naming the file, line (record number
for JSON arrays, parquet and Hub datasets) and field, unless ``skip_bad`` is set: then the record
is skipped and counted by reason. Records skipped by design (unanswerable MuSiQue questions) and
pieces left out (answer leaks, HotpotQA sentences without a usable mention) are always counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field

from .._version import __version__
from ..errors import DataError
from ..io import check_directory, sha256_file, write_json
from ..pieces import KnowledgePiece, PieceRole, write_pieces
from . import hotpotqa, hub, musique
from ._common import RELATION_TEMPLATES, RecordContext, RecordError, SkipRecord, deduplicate, relation_question
from .hub import PARSERS, BadRecord, sniff_format

__all__ = [
    "SOURCES",
    "ALIASES",
    "FORMATS",
    "Source",
    "DownloadMeta",
    "DownloadResult",
    "download",
    "list_sources",
    "resolve_source",
    "sample_path",
    "sample_files",
    "wikipedia_paragraphs",
    "sniff_format",
    "read_file",
    "RELATION_TEMPLATES",
    "relation_question",
]

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
#: bundled sample file -> the split its records were taken from, in the registry's split names
#: (see gradcouple/NOTICE: dev sets are "validation"; RippleEdits' sample is from POPULAR).
SAMPLE_SPLITS = {
    "hotpotqa_dev_distractor.sample.jsonl": "validation",
    "musique_ans_dev.sample.jsonl": "validation",
    "musique_dev.flashrag.sample.jsonl": "validation",
    "2wikimultihopqa_dev.sample.jsonl": "validation",
    "wikihop_dev.sample.jsonl": "validation",
    "bamboogle_test.sample.jsonl": "test",
    "mquake_hard.sample.jsonl": "all",
    "rippleedits_compositional.sample.jsonl": "popular",
}
#: Parser names accepted by ``format=`` / ``--format``.
FORMATS = tuple(PARSERS)
SKIP_HINT = "Fix the record, or pass --skip-bad (skip_bad=True) to skip bad records; they are counted in {counts}."
SKIP_UNDECODABLE = "or pass --skip-bad (skip_bad=True) to skip undecodable records; they are counted in {counts}."

_MQUAKE_RAW = "https://raw.githubusercontent.com/princeton-nlp/MQuAKE/{revision}/datasets/"
# The RippleEdits benchmark files are Git LFS objects: raw.githubusercontent.com serves only
# their pointers, media.githubusercontent.com their contents. One file per subset (= split).
_RIPPLE_MEDIA = "https://media.githubusercontent.com/media/edenbiran/RippleEdits/{revision}/data/benchmark/{split}.json"


@dataclass(frozen=True)
class Source:
    """One downloadable dataset: where it lives on the Hub, and how its records are parsed.

    ``hub_id`` is a Hugging Face Hub dataset id (``data_files`` picks a repository's files per
    split). Datasets published only as files (MQuAKE, RippleEdits on GitHub) have ``url`` instead,
    a template with ``{revision}`` (and ``{split}`` where each split is a file); ``hub`` and
    ``hub_file`` then say where, for people.
    """

    name: str
    format: str
    hub_id: Optional[str]
    hub_config: Optional[str]
    splits: tuple[str, ...]
    default_split: Optional[str]
    license: str
    #: approximate number of records per split, in the order of ``splits``
    size: str
    description: str
    sample: Optional[str] = None
    data_files: Optional[Mapping[str, Mapping[str, str]]] = None
    aliases: tuple[str, ...] = ()
    hub: Optional[str] = None
    hub_file: Optional[str] = None
    url: Optional[str] = None

    @property
    def location(self) -> str:
        """Where the data comes from, for people."""
        if self.hub:
            return self.hub + (f"/{self.hub_file}" if self.hub_file else "")
        if not self.hub_id:
            return self.url.format(revision="main", split=self.default_split) if self.url else "(local files only)"
        return self.hub_id + (f" ({self.hub_config})" if self.hub_config else "")


def _musique_files(kind: str) -> dict[str, dict[str, str]]:
    return {s: {s: f"musique_{kind}_v1.0_{f}.jsonl"} for s, f in (("train", "train"), ("validation", "dev"))}


_TABLE = [
    Source("hotpotqa", "hotpotqa", "hotpotqa/hotpot_qa", "distractor", ("train", "validation"), "validation",
           "CC BY-SA 4.0", "90,447 / 7,405", "HotpotQA, distractor setting",
           "hotpotqa_dev_distractor.sample.jsonl", aliases=("hotpotqa-distractor", "hotpot_qa")),
    Source("hotpotqa-fullwiki", "hotpotqa", "hotpotqa/hotpot_qa", "fullwiki", ("train", "validation", "test"), "validation",
           "CC BY-SA 4.0", "90,447 / 7,405 / 7,405", "HotpotQA, full-wiki setting (test: no answers)"),
    Source("musique", "musique", "bdsaglam/musique", None, ("train", "validation"), "validation",
           "CC BY 4.0", "19,938 / 2,417", "MuSiQue-Answerable (native format)",
           "musique_ans_dev.sample.jsonl", data_files=_musique_files("ans"), aliases=("musique-ans",)),
    Source("musique-full", "musique", "bdsaglam/musique", None, ("train", "validation"), "validation",
           "CC BY 4.0", "39,876 / 4,834", "MuSiQue-Full: answerable + unanswerable (skipped)",
           data_files=_musique_files("full")),
    Source("2wikimultihopqa", "2wikimultihopqa", "framolfese/2WikiMultihopQA", None, ("train", "validation", "test"), "validation",
           "Apache-2.0", "167,454 / 12,576 / 12,576", "2WikiMultiHopQA",
           "2wikimultihopqa_dev.sample.jsonl", aliases=("2wiki", "2wikimultihop")),
    Source("wikihop", "wikihop", "qangaroo", "wikihop", ("train", "validation"), "validation",
           "CC BY-SA 3.0", "43,738 / 5,129", "QAngaroo WikiHop (unmasked)",
           "wikihop_dev.sample.jsonl", aliases=("qangaroo",)),
    Source("bamboogle", "bamboogle", "chiayewken/bamboogle", None, ("test",), "test",
           "MIT (unverified)", "125", "Bamboogle (Self-Ask)",
           "bamboogle_test.sample.jsonl"),
    Source("mquake", "mquake", None, None, ("all",), "all",
           "MIT", "3,000", "MQuAKE-CF-3k-v2 (bundled sample: see mquake-hard, same format)",
           url=_MQUAKE_RAW + "MQuAKE-CF-3k-v2.json",
           hub="github:princeton-nlp/MQuAKE", hub_file="MQuAKE-CF-3k-v2.json"),
    Source("mquake-cf-3k", "mquake", None, None, ("all",), "all", "MIT", "3,000", "MQuAKE-CF-3k",
           url=_MQUAKE_RAW + "MQuAKE-CF-3k.json", hub="github:princeton-nlp/MQuAKE", hub_file="MQuAKE-CF-3k.json"),
    Source("mquake-cf-3k-v2", "mquake", None, None, ("all",), "all", "MIT", "3,000", "MQuAKE-CF-3k-v2",
           url=_MQUAKE_RAW + "MQuAKE-CF-3k-v2.json", hub="github:princeton-nlp/MQuAKE", hub_file="MQuAKE-CF-3k-v2.json"),
    Source("mquake-t", "mquake", None, None, ("all",), "all", "MIT", "1,825", "MQuAKE-T (temporal updates)",
           url=_MQUAKE_RAW + "MQuAKE-T.json", hub="github:princeton-nlp/MQuAKE", hub_file="MQuAKE-T.json"),
    Source("mquake-hard", "mquake", None, None, ("all",), "all",
           "MIT (MQuAKE)", "429", "MQuAKE-hard (DeepEdit), 4 edits per case",
           "mquake_hard.sample.jsonl",
           url="https://raw.githubusercontent.com/wangywUST/DeepEdit/{revision}/datasets/MQuAKE-hard.json",
           hub="github:wangywUST/DeepEdit", hub_file="MQuAKE-hard.json"),
    Source("rippleedits", "rippleedits", None, None, ("popular", "random", "recent"), "popular",
           "MIT", "885 / 1,922 / 1,948",
           "RippleEdits: edits with six ripple-effect criteria (bundled sample: restructured Compositionality-I records of POPULAR)",
           "rippleedits_compositional.sample.jsonl", aliases=("ripple-edits", "ripple_edits", "ripple"),
           url=_RIPPLE_MEDIA, hub="github:edenbiran/RippleEdits",
           hub_file="data/benchmark/popular.json, random.json, recent.json"),
    Source("counterfact", "counterfact", None, None, ("all",), "all", "MIT (ROME)", "21,919",
           "CounterFact edit requests (ROME, MEMIT): each rewrite with paraphrase and neighbourhood prompts; needs --from",
           hub="rome.baulab.info/data/dsets", hub_file="counterfact.json"),
    Source("easyedit", "easyedit", None, None, ("all",), "all", "per file (KnowEdit: MIT)", "-",
           "EasyEdit / KnowEdit edit requests (prompt, subject, target_new, ground_truth, portability, locality); "
           "needs --from", aliases=("knowedit",), hub="github:zjunlp/EasyEdit", hub_file="examples/KnowEdit.md"),
    Source("pieces", "pieces", None, None, (), None, "yours", "-",
           "Plain pieces file (prompt, answer, ...): your own facts; needs --from"),
]

#: name -> Source, one row per dataset.
SOURCES: dict[str, Source] = {s.name: s for s in _TABLE}
#: alternative name -> canonical name.
ALIASES: dict[str, str] = {a: s.name for s in _TABLE for a in s.aliases}


def resolve_source(name: str) -> Source:
    """The Source called ``name`` (case-insensitive; aliases accepted).

    Raises:
        DataError: no such source; the message lists the known ones.
    """
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(SOURCES)} (aliases: {', '.join(ALIASES)}). See `gradcouple download --list`.")
    return SOURCES[key]


def _resolve_format(name: str) -> str:
    key = name.strip().lower()
    if key in PARSERS:
        return key
    key = ALIASES.get(key, key)
    if key in SOURCES:
        return SOURCES[key].format
    raise DataError(f"unknown format {name!r}; use one of {', '.join(FORMATS)} (or a dataset name from `gradcouple download --list`).")


def list_sources() -> list[dict[str, Any]]:
    """One row per source for ``gradcouple download --list``: name, aliases, Hub location,
    splits, default split, license, approximate size, bundled sample, description."""
    return [
        {
            "name": s.name,
            "aliases": list(s.aliases),
            "hub": s.hub or s.location,
            "hub_file": s.hub_file,
            "hub_id": s.hub_id,
            "url": s.url,
            "config": s.hub_config,
            "splits": list(s.splits),
            "default_split": s.default_split,
            "license": s.license,
            "size": s.size,
            "sample": s.sample,
            "format": s.format,
            "description": s.description,
        }
        for s in _TABLE
    ]


def sample_files() -> list[str]:
    """File names of the bundled real samples (12 records each, 60 of RippleEdits; sources and licenses in ``gradcouple/NOTICE``)."""
    return sorted(p.name for p in SAMPLE_DIR.glob("*.jsonl"))


def sample_path(name: str) -> Path:
    """Path of the bundled real sample of source ``name`` (or of a bundled file by its name).

    Raises:
        DataError: the source has no bundled sample, or no such file.
    """
    if (SAMPLE_DIR / name).is_file() and name.endswith(".jsonl"):
        return SAMPLE_DIR / name
    source = resolve_source(name)
    if not source.sample:
        have = ", ".join(s.name for s in _TABLE if s.sample)
        raise DataError(f"{source.name} has no bundled sample; bundled samples exist for: {have}. Use --from PATH for a local copy.")
    return SAMPLE_DIR / source.sample


def wikipedia_paragraphs() -> Iterator[str]:
    """Wikipedia paragraphs of the bundled HotpotQA (each context paragraph's sentences joined) and
    MuSiQue samples, in file order: tens of thousands of tokens of real text with no network (the
    text of ROME's key covariance, :mod:`gradcouple.keys`)."""
    for name, texts in (("hotpotqa", hotpotqa.context_texts), ("musique", musique.paragraph_texts)):
        for _, _, record in hub.iter_local_file(sample_path(name)):
            yield from texts(record)


LEAK_RULE = "answer mentioned in its prompt: case-insensitive, not inside a longer word"
PIECES_FILE = "pieces.jsonl"
META_FILE = "download.json"


class DownloadMeta(BaseModel):
    """The contents of ``download.json``: where the records came from and what became of them.

    Counts are numbers of records or pieces; mappings of reason (or kind) to count are sorted by
    key, except ``pieces_per_kind``, which follows single_hop, cloze, multi_hop, and
    ``pieces_per_role``, which follows edit, original, test, condition.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Optional[str] = Field(description="Registry name of the dataset; None when only a format was known.")
    format: str = Field(description="Parser the records were read with (given, the source's, or sniffed).")
    dataset: str = Field(description="First part of every piece id: the source name, else the format.")
    input: dict[str, Any] = Field(description="Provenance: kind (sample, file, dataset_dir, url, hub), path/URL/Hub id, sha256 of a read file.")
    split: Optional[str] = Field(description="Split read: the Hub's, URL's or dataset directory's, or the one the bundled sample was taken from; None for a file (read whole).")
    revision: Optional[str] = Field(description="Hub or release revision asked for; None for the default.")
    limit: Optional[int] = Field(description="Most records to read, as asked (records); None for all.")
    skip_bad: bool = Field(description="Whether malformed records were skipped and counted instead of failing.")
    records_read: int = Field(description="Records read from the input (records).")
    records_used: int = Field(description="Records that were converted into pieces (records).")
    records_skipped: dict[str, int] = Field(description="Records not converted, per reason (records).")
    pieces_made: int = Field(description="Pieces written to pieces.jsonl, after deduplication (pieces).")
    pieces_per_kind: dict[str, int] = Field(description="Pieces written, per kind; kinds with none left out (pieces).")
    pieces_merged_as_duplicates: dict[str, int] = Field(
        description="Pieces merged into an earlier one with the same prompt and answer, per kind (pieces).")
    counterfactual_conflicts_first_kept: int = Field(
        description="Merged pieces whose counterfactual differed from the kept one's, which wins (pieces).")
    pieces_skipped: dict[str, int] = Field(description="Pieces the converted records could not yield, per reason (pieces).")
    leak_rule: str = Field(default=LEAK_RULE, description="When a piece counts as leaking its answer (and is skipped).")
    package_version: str = Field(default=__version__, description="Version of gradcouple that wrote the file.")
    pieces_per_role: dict[str, int] = Field(
        default_factory=dict, description="Pieces written, per benchmark role (edit, original, test, condition); empty when no piece carries an edit (pieces).")
    pieces_per_criterion: dict[str, int] = Field(
        default_factory=dict, description="Test pieces written, per benchmark criterion (e.g. Compositionality_I, multi_hop); empty without tests (pieces).")


class DownloadResult(BaseModel):
    """What :func:`download` did: the output paths, the pieces written, and ``download.json``."""

    model_config = ConfigDict(frozen=True)

    out_dir: Path = Field(description="Output directory.")
    pieces_path: Path = Field(description="out_dir/pieces.jsonl: the pieces, one JSON object a line.")
    meta_path: Path = Field(description="out_dir/download.json: ``meta`` as written.")
    pieces: list[KnowledgePiece] = Field(description="The pieces written, in file order.")
    meta: DownloadMeta = Field(description="Provenance and counts, as in download.json.")


class _Rejected(Exception):
    """A record that cannot be used: ``problem`` goes into the error, ``reason`` is its count key,
    ``fix`` the repair when it is not fixing the record (re-encoding the file)."""

    def __init__(self, problem: str, reason: str, fix: Optional[str] = None, looks_like: Optional[str] = None):
        self.problem, self.reason, self.fix, self.looks_like = problem, reason, fix, looks_like
        super().__init__(problem)


@dataclass
class _Tally:
    """What the parse step made of the records: the pieces (before deduplication) and the counts."""

    fmt: Optional[str]
    pieces: list[KnowledgePiece] = field(default_factory=list)
    made_by: dict[str, str] = field(default_factory=dict)  # piece id -> location of its record
    records_read: int = 0
    records_used: int = 0
    records_skipped: Counter = field(default_factory=Counter)
    pieces_skipped: Counter = field(default_factory=Counter)

    def use(self, ctx: RecordContext, where: str) -> None:
        """Take one record's pieces.

        Raises:
            _Rejected: one of its piece ids was already made by an earlier record.
        """
        dup = next((p.id for p in ctx.pieces if p.id in self.made_by), None)
        if dup is not None:
            raise _Rejected(f"field 'id': duplicate piece id {dup!r} (already made by {self.made_by[dup]}); record ids must be unique", "duplicate id")
        self.made_by.update(dict.fromkeys((p.id for p in ctx.pieces), where))
        self.pieces.extend(ctx.pieces)
        self.pieces_skipped.update(ctx.skipped)
        self.records_used += 1

    def counts(self, kept: list[KnowledgePiece], merged: Counter, conflicts: int) -> dict[str, Any]:
        """The count fields of :class:`DownloadMeta`, given the deduplicated pieces."""
        per_kind = Counter(p.kind.value for p in kept)
        per_role = Counter(p.role.value for p in kept if p.role is not None)
        per_criterion = Counter(p.criterion for p in kept if p.role == PieceRole.test and p.criterion)
        return {
            "records_read": self.records_read,
            "records_used": self.records_used,
            "records_skipped": dict(sorted(self.records_skipped.items())),
            "pieces_made": len(kept),
            "pieces_per_kind": {k: per_kind[k] for k in ("single_hop", "cloze", "multi_hop") if per_kind[k]},
            "pieces_merged_as_duplicates": dict(sorted(merged.items())),
            "counterfactual_conflicts_first_kept": conflicts,
            "pieces_skipped": dict(sorted(self.pieces_skipped.items())),
            "pieces_per_role": {r.value: per_role[r.value] for r in PieceRole if per_role[r.value]},
            "pieces_per_criterion": dict(sorted(per_criterion.items())),
        }


def _open_input(
    source: Optional[Source], from_path: Optional[str], split: Optional[str], revision: Optional[str]
) -> tuple[Iterator[tuple[int, str, Any]], dict[str, Any], str]:
    """Records (index, location, record), provenance, and the label of the input for messages.

    The provenance holds ``split`` where the input has one: the split asked for (Hub, URL), the
    one found (dataset directory), or the one a bundled sample was taken from.

    Raises:
        DataError: ``"sample"`` without a source, a source with nothing to download, an unknown
            split, a split other than the bundled sample's, a split with a file (read whole), or
            an unreadable dataset directory or file (files raise when first read).
        NetworkError: the Hub or the file's host is needed but unreachable.
    """
    if from_path is not None and (from_path == "sample" or from_path.startswith("sample:")):
        if from_path == "sample" and source is None:
            raise DataError("--sample needs a dataset name, e.g. `gradcouple download musique --sample`.")
        path = sample_path(from_path[7:] if from_path.startswith("sample:") else source.name)  # type: ignore[union-attr]
        sample_split = SAMPLE_SPLITS.get(path.name)
        # Asking for another split and getting the sample's would mislabel every piece downstream.
        if split is not None and split != sample_split:
            raise DataError(f"--split {split}: the bundled sample {path.name} holds {sample_split or 'unknown'}-split records only; "
                            f"drop --split to read it, or drop --sample to download the {split} split.")
        info = {"kind": "sample", "path": str(path), "sha256": sha256_file(path), "split": sample_split}
        return hub.iter_local_file(path), info, str(path)
    if from_path is not None:
        path = Path(from_path).expanduser()
        if split is not None and path.is_file():
            raise DataError(f"--split {split}: {path} is a file, read whole; --split picks a split of the Hub, "
                            f"a dataset directory or the bundled sample. Drop --split.")
        if path.is_dir():
            recs, info = hub.load_records(
                str(path), config=source.hub_config if source else None, split=split or (source.default_split if source else None),
                split_given=split is not None,
            )
            return recs, {"kind": "dataset_dir", "path": str(path.resolve()), **info}, str(path)
        return hub.iter_local_file(path), {"kind": "file", "path": str(path.resolve()), "sha256": sha256_file(path) if path.is_file() else None}, str(path)
    if source is None:
        raise DataError("name a dataset (see `gradcouple download --list`) or pass --from PATH.")
    if not source.hub_id and not source.url:
        raise DataError(f"{source.name}: there is nothing to download; pass your file with --from PATH.")
    split = split or source.default_split
    if source.splits and split not in source.splits:
        raise DataError(f"{source.name} has no split {split!r}; choose one of {', '.join(source.splits)}.")
    sample_name = next((s.name for s in (source, *_TABLE) if s.sample and s.format == source.format), None)
    if source.url:
        url = source.url.format(revision=revision or "main", split=split)
        path = hub.fetch_file(url, sample_name=sample_name)
        info = {"kind": "url", "url": url, "path": str(path), "sha256": sha256_file(path), "split": split}
        return hub.iter_local_file(path), info, url
    data_files = source.data_files.get(split) if source.data_files else None
    recs, info = hub.load_records(source.hub_id, config=source.hub_config, split=split, revision=revision,
                                  data_files=data_files, sample_name=sample_name)
    if source.hub:
        info["hub"] = source.hub
    return recs, {"kind": "hub", **info}, source.location


def _resolve_request(name: Optional[str], format: Optional[str], limit: Optional[int]) -> tuple[Optional[Source], Optional[str]]:
    """The source and the format (None: sniff it) that ``download`` was asked for.

    Raises:
        DataError: unknown source or format, a format the source's records are not in, or a
            limit below 1.
    """
    source = resolve_source(name) if name else None
    fmt = _resolve_format(format) if format else None
    if source and fmt and fmt != source.format:
        raise DataError(f"--format {format} does not match {source.name}, whose records are in the {source.format} format; drop one of them.")
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1, got {limit}.")
    return source, fmt or (source.format if source else None)


def _as_object(rec: Any) -> Mapping:
    """``rec`` if it is a decoded JSON object.

    Raises:
        _Rejected: the record could not be decoded, or is not an object.
    """
    if isinstance(rec, BadRecord):
        raise _Rejected(rec.problem, rec.reason, rec.fix)
    if not isinstance(rec, Mapping):
        raise _Rejected(f"expected a JSON object, got {type(rec).__name__}", "not a JSON object")
    return rec


def _sniff_or_fail(rec: Mapping, where: str) -> str:
    """The format of the first record, when none was given.

    Raises:
        DataError: no parser recognises the record's keys.
    """
    sniffed = sniff_format(rec)
    if sniffed is None:
        keys = ", ".join(list(rec)[:12]) or "none"
        raise DataError(f"{where}: unknown record format (keys: {keys}); pass --format with one of {', '.join(FORMATS)}.")
    return sniffed


def _parse_record(rec: Mapping, index: int, fmt: str, dataset: str) -> RecordContext:
    """The pieces (and pieces skipped) of the record at 0-based ``index``, read as ``fmt``.

    Raises:
        _Rejected: the record looks like another format, or its parser rejects it.
        SkipRecord: the record yields no pieces by design.
    """
    parser = PARSERS[fmt]
    sniffed = sniff_format(rec)
    if not parser.sniff(rec) and sniffed not in (None, fmt, "bamboogle"):
        raise _Rejected(f"mixed formats: this record looks like {sniffed}, but the input is read as {fmt}", "mixed formats",
                        looks_like=sniffed)
    ctx = RecordContext(dataset, index)
    try:
        parser.parse(rec, ctx)
    except RecordError as e:
        raise _Rejected(str(e), e.reason) from None
    return ctx


def _parse_records(
    records: Iterator[tuple[int, str, Any]], fmt: Optional[str], dataset: Optional[str], *, limit: Optional[int], skip_bad: bool,
    from_path: Optional[str] = None, counts: str = META_FILE,
) -> _Tally:
    """Parse at most ``limit`` records into pieces; count records and pieces skipped by reason.

    ``fmt`` None: sniffed from the first decodable record. ``dataset`` None: the format names
    the pieces.

    Raises:
        DataError: a bad record (unless ``skip_bad``), or a first record of unknown format.
    """
    tally = _Tally(fmt)
    for index, where, rec in islice(records, limit):
        tally.records_read += 1
        try:
            obj = _as_object(rec)
            tally.fmt = tally.fmt or _sniff_or_fail(obj, where)
            tally.use(_parse_record(obj, index, tally.fmt, dataset or tally.fmt), where)
        except SkipRecord as e:
            tally.records_skipped[e.reason] += 1
        except _Rejected as e:
            if e.looks_like and not tally.pieces and not tally.records_skipped:  # the first record: the wrong format
                how = (f"`gradcouple download --from {from_path} --format {e.looks_like} --out DIR`" if from_path
                       else f"--format {e.looks_like}")
                raise DataError(f"{where}: this record looks like {e.looks_like}, not {tally.fmt}, so every record would be "
                                f"rejected (--skip-bad would skip them all); read it as {e.looks_like}: {how}.") from None
            if not skip_bad:
                hint = f"; {e.fix}, {SKIP_UNDECODABLE.format(counts=counts)}" if e.fix else f". {SKIP_HINT.format(counts=counts)}"
                raise DataError(f"{where}: {e.problem}{hint}") from None
            tally.records_skipped[e.reason] += 1
    return tally


def _deduplicated(tally: _Tally, label: str) -> tuple[list[KnowledgePiece], Counter, int]:
    """:func:`deduplicate` the tally's pieces.

    Raises:
        DataError: no record was read, or no piece was made.
    """
    if tally.records_read == 0:
        raise DataError(f"{label}: no records to read.")
    kept, merged, conflicts = deduplicate(tally.pieces)
    if not kept:
        raise DataError(
            f"{label}: {tally.records_read} record(s) read but no knowledge pieces made "
            f"(records skipped: {dict(tally.records_skipped) or 'none'}; pieces skipped: {dict(tally.pieces_skipped) or 'none'})."
        )
    return kept, merged, conflicts


def read_file(path: str | Path, *, format: Optional[str] = None, skip_bad: bool = False,
              label: str = "--edits") -> tuple[list[KnowledgePiece], str, dict[str, int]]:
    """The knowledge pieces of a local file in any format (sniffed unless ``format`` is given), as
    :func:`download` makes them but without writing anything: (pieces, format, records and pieces
    skipped by reason). ``gradcouple forecast --edits`` reads its edit requests so.

    Raises:
        DataError: as :func:`download` (the message names the file, the record and the field).
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{label} {path}: a directory; pass a .json, .jsonl or .parquet file.")
    if not path.is_file():
        raise DataError(f"{label} {path}: no such file; pass an existing .json, .jsonl or .parquet file.")
    source, fmt = _resolve_request(None, format, None)
    records, _, where = _open_input(source, str(path), None, None)
    tally = _parse_records(records, fmt, None, limit=None, skip_bad=skip_bad, counts="forecast/summary.json")
    kept, _, _ = _deduplicated(tally, where)
    return kept, tally.fmt or "", dict(tally.records_skipped + tally.pieces_skipped)


def _write_outputs(out_dir: Path, pieces: list[KnowledgePiece], meta: DownloadMeta) -> tuple[Path, Path]:
    """Write ``out_dir/pieces.jsonl``, then ``out_dir/download.json`` (each atomically); return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pieces_path, meta_path = out_dir / PIECES_FILE, out_dir / META_FILE
    write_pieces(pieces_path, pieces)
    write_json(meta_path, meta.model_dump(mode="json"))
    return pieces_path, meta_path


def download(
    name: Optional[str],
    out_dir: str | Path,
    *,
    from_path: Optional[str | Path] = None,
    format: Optional[str] = None,
    split: Optional[str] = None,
    revision: Optional[str] = None,
    limit: Optional[int] = None,
    skip_bad: bool = False,
) -> DownloadResult:
    """Convert a multi-hop QA dataset into knowledge pieces: ``out_dir/pieces.jsonl`` + ``download.json``.

    Args:
        name: a source from :data:`SOURCES` (aliases accepted); may be None with ``from_path``,
            the format then coming from ``format`` or sniffed from the first record's keys.
        out_dir: output directory (created).
        from_path: a local ``.json`` (array, or object with a ``data`` list), ``.jsonl`` or
            ``.parquet`` file; a local dataset directory (``save_to_disk`` output or a directory
            of data files, loaded like the Hub); ``"sample"`` for the bundled real sample of
            ``name``; or ``"sample:FILE"`` for a bundled file by name. None downloads from the Hub.
        format: parser to use (``hotpotqa``, ``musique``, ``2wikimultihopqa``, ``wikihop``,
            ``bamboogle``, ``mquake``, ``rippleedits``, ``counterfact``, ``easyedit``, ``pieces``, or a
            source name).
        split, revision: Hub split (default: the source's) and revision; ``split`` also picks
            a dataset directory's split, must be the bundled sample's own (or None) with
            ``"sample"``, and cannot be given with a file.
        limit: read at most this many records (records; at least 1).
        skip_bad: skip and count malformed records instead of failing on the first.

    Returns:
        The output paths, the pieces written and their :class:`DownloadMeta` (as in
        ``download.json``). Nothing is written unless the whole input converts.

    Raises:
        DataError: unknown source/format, unreadable input, input that is not UTF-8 (a JSONL
            line or parquet record is skipped with ``skip_bad``, a JSON document never), a split
            the input does not have, a bad record (without ``skip_bad``), mixed formats in one
            input, or no pieces at all.
        NetworkError: the Hub is needed but unreachable (fails within seconds).
    """
    check_directory(out_dir, "--out")
    source, fmt = _resolve_request(name, format, limit)
    records, provenance, label = _open_input(source, str(from_path) if from_path is not None else None, split, revision)
    dataset = source.name if source else None
    tally = _parse_records(records, fmt, dataset, limit=limit, skip_bad=skip_bad,
                           from_path=str(from_path) if from_path not in (None, "sample") else None)
    kept, merged, conflicts = _deduplicated(tally, label)
    meta = DownloadMeta(
        source=dataset, format=tally.fmt, dataset=dataset or tally.fmt, input=provenance,
        split=provenance.get("split"), revision=revision, limit=limit, skip_bad=skip_bad,
        **tally.counts(kept, merged, conflicts),
    )
    pieces_path, meta_path = _write_outputs(Path(out_dir), kept, meta)
    return DownloadResult(out_dir=Path(out_dir), pieces_path=pieces_path, meta_path=meta_path, pieces=kept, meta=meta)
