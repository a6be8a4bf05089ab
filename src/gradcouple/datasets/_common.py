"""Helpers shared by the dataset parsers: field access with located errors, text clean-up,
the answer-leak check, relation templates, and cross-record deduplication.

String matching is defined once, here:

- *mention*: a name occurs in a text case-insensitively (whitespace runs match any
  whitespace) and not inside a longer word: no letter or digit directly before or after it.
  "Kansas" is mentioned in "University of Kansas" but not in "Arkansas"; "no" is not
  mentioned in "Freakonomics".
- *leak*: a piece's answer is mentioned in its own prompt. Such pieces are skipped and
  counted under "answer appears in its own prompt".

Deduplication merges pieces with identical (prompt, answer), except that pieces of a
knowledge-edit benchmark (a ``role`` or an ``edit_id``) only merge with pieces of the same role
and the same edit, and edit pieces never merge: each edit keeps its own linked pieces.
"""

from __future__ import annotations

import functools
import html
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

from ..pieces import KnowledgePiece, PieceKind, PieceRole, Triple

LEAK = "answer appears in its own prompt"

_WS = re.compile(r"\s+")


class RecordError(Exception):
    """A record that cannot be converted: names the field and what is wrong with it.

    ``reason`` is the short, index-free text under which ``skip_bad`` counts the record.
    """

    def __init__(self, field: str, problem: str, reason: Optional[str] = None):
        self.field = field
        self.problem = problem
        self.reason = reason or f"{problem}: {_generic(field)}"
        super().__init__(f"field '{field}': {problem}")


class SkipRecord(Exception):
    """A well-formed record that by design yields no pieces (e.g. an unanswerable MuSiQue
    question); always counted under ``reason``, whatever ``skip_bad`` says."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def clean(text: Any) -> str:
    """Strip a string and collapse whitespace runs (newlines included) to single spaces."""
    return _WS.sub(" ", str(text)).strip()


def leaks(prompt: str, answer: str) -> bool:
    """True when ``answer`` is mentioned in ``prompt`` (see the module docstring)."""
    return mention_pattern(answer).search(prompt) is not None


@functools.lru_cache(maxsize=4096)
def mention_pattern(name: str) -> re.Pattern:
    """Regex for ``name`` as a whole mention: case-insensitive, flexible whitespace, not
    glued to a letter or digit on either side."""
    body = r"\s+".join(re.escape(w) for w in name.split())
    return re.compile(rf"(?<![^\W_]){body}(?![^\W_])", re.IGNORECASE)


def entity_name(title: str) -> str:
    """Wikipedia title to the entity's surface name: HTML entities decoded and a trailing
    disambiguation in parentheses dropped ("Ed Wood (film)" -> "Ed Wood")."""
    name = clean(html.unescape(title))
    stripped = re.sub(r"\s*\([^()]*\)$", "", name)
    return stripped or name


# ----------------------------------------------------------------------------- field access


def _decoded(value: Any) -> Any:
    # Some CSV/parquet exports store nested fields as JSON text.
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def has(record: Mapping, key: str) -> bool:
    """True when ``record`` (or its FlashRAG-style ``metadata``) holds ``key``."""
    meta = record.get("metadata")
    return key in record or (isinstance(meta, Mapping) and key in meta)


def lookup(record: Mapping, key: str) -> tuple[Any, str]:
    """Value and field path of ``key`` in ``record``, falling back to ``record['metadata']``."""
    if key in record:
        return record[key], key
    meta = _decoded(record.get("metadata"))
    if isinstance(meta, Mapping) and key in meta:
        return meta[key], f"metadata.{key}"
    raise RecordError(key, "missing")


def req_str(obj: Mapping, key: str, where: str = "", *, allow_empty: bool = False) -> str:
    """``obj[key]`` as a cleaned non-empty string (numbers are accepted and formatted)."""
    path = f"{where}.{key}" if where else key
    if not isinstance(obj, Mapping) or key not in obj or obj[key] is None:
        raise RecordError(path, "missing")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RecordError(path, f"expected a string, got {type(value).__name__}", f"not a string: {_generic(path)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RecordError(path, f"expected a string, got {value} (a JSON NaN or Infinity, not text)",
                          f"not a string: {_generic(path)}")
    text = clean(value)
    if not text and not allow_empty:
        raise RecordError(path, "empty", f"empty: {_generic(path)}")
    return text


def req_list(value: Any, path: str, *, allow_empty: bool = True) -> list:
    """``value`` as a list (JSON text holding a list is decoded), else a located RecordError."""
    value = _decoded(value)
    if value is None:
        raise RecordError(path, "missing")
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise RecordError(path, f"expected a list, got {type(value).__name__}", f"not a list: {_generic(path)}")
    if not value and not allow_empty:
        raise RecordError(path, "empty list", f"empty: {_generic(path)}")
    return value


def req_dict(value: Any, path: str) -> Mapping:
    """``value`` as a mapping (JSON text holding an object is decoded), else a RecordError."""
    value = _decoded(value)
    if value is None:
        raise RecordError(path, "missing")
    if not isinstance(value, Mapping):
        raise RecordError(path, f"expected an object, got {type(value).__name__}", f"not an object: {_generic(path)}")
    return value


def str_list(value: Any, path: str) -> list[str]:
    """A list of strings (``None`` -> empty); blank entries dropped."""
    if value is None:
        return []
    out = []
    for i, v in enumerate(req_list(value, path)):
        if v is None:
            continue
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise RecordError(f"{path}[{i}]", f"expected a string, got {type(v).__name__}")
        if isinstance(v, float) and not math.isfinite(v):
            raise RecordError(f"{path}[{i}]", f"expected a string, got {v} (a JSON NaN or Infinity, not text)")
        if clean(v):
            out.append(clean(v))
    return out


def _generic(path: str) -> str:
    return re.sub(r"\[\d+\]", "[]", path)


def record_id(record: Mapping, keys: Sequence[str], index: int, *, required: bool = True) -> str:
    """The record's own id from the first present key in ``keys``; the 0-based ``index`` when
    the format has no id field and ``required`` is false."""
    for key in keys:
        if key in record and record[key] is not None and clean(record[key]):
            rid = clean(record[key])
            if ":" in rid:
                # ':' separates the parts of a piece id, so it cannot appear inside one part.
                rid = rid.replace(":", "_")
            return rid
    if required:
        raise RecordError(keys[0], "missing")
    return str(index)


# ----------------------------------------------------------------------------- relation templates

#: Wikidata relation label -> natural question, ``{X}`` being the subject. Covers the relations
#: of MuSiQue's "X >> relation" steps, 2WikiMultiHopQA's evidence triples and WikiHop queries.
RELATION_TEMPLATES: dict[str, str] = {
    "author": "Who is the author of {X}?",
    "performer": "Who is the performer of {X}?",
    "spouse": "Who is the spouse of {X}?",
    "child": "Who is the child of {X}?",
    "father": "Who is the father of {X}?",
    "mother": "Who is the mother of {X}?",
    "sibling": "Who is the sibling of {X}?",
    "relative": "Who is a relative of {X}?",
    "country": "Which country does {X} belong to?",
    "country of citizenship": "What is the country of citizenship of {X}?",
    "country of origin": "What is the country of origin of {X}?",
    "place of birth": "Where was {X} born?",
    "place of death": "Where did {X} die?",
    "place of burial": "Where was {X} buried?",
    "date of birth": "When was {X} born?",
    "date of death": "When did {X} die?",
    "cause of death": "What was the cause of death of {X}?",
    "located in the administrative territorial entity": "In which administrative territorial entity is {X} located?",
    "located in or next to body of water": "Which body of water is {X} located in or next to?",
    "located on terrain feature": "On which terrain feature is {X} located?",
    "location": "Where is {X} located?",
    "headquarters location": "Where is the headquarters of {X}?",
    "location of formation": "Where was {X} formed?",
    "shares border with": "What shares a border with {X}?",
    "capital": "What is the capital of {X}?",
    "capital of": "What is {X} the capital of?",
    "continent": "On which continent is {X}?",
    "crosses": "What does {X} cross?",
    "mouth of the watercourse": "What does {X} flow into?",
    "cast member": "Who is a cast member of {X}?",
    "director": "Who is the director of {X}?",
    "director / manager": "Who is the director or manager of {X}?",
    "screenwriter": "Who is the screenwriter of {X}?",
    "producer": "Who is the producer of {X}?",
    "composer": "Who is the composer of {X}?",
    "lyrics by": "Who wrote the lyrics of {X}?",
    "editor": "Who is the editor of {X}?",
    "creator": "Who is the creator of {X}?",
    "developer": "Who is the developer of {X}?",
    "manufacturer": "Who is the manufacturer of {X}?",
    "publisher": "Who is the publisher of {X}?",
    "distributed by": "Who distributed {X}?",
    "presenter": "Who is the presenter of {X}?",
    "record label": "What is the record label of {X}?",
    "publication date": "When was {X} published?",
    "inception": "When was {X} founded?",
    "founded by": "Who founded {X}?",
    "owned by": "Who owns {X}?",
    "parent organization": "What is the parent organization of {X}?",
    "employer": "Who is the employer of {X}?",
    "educated at": "Where was {X} educated?",
    "occupation": "What is the occupation of {X}?",
    "position held": "What position did {X} hold?",
    "award received": "What award did {X} receive?",
    "notable work": "What is a notable work of {X}?",
    "member of": "What is {X} a member of?",
    "member of sports team": "Which sports team is {X} a member of?",
    "member of political party": "Which political party is {X} a member of?",
    "part of": "What is {X} part of?",
    "has part": "What is a part of {X}?",
    "instance of": "What is {X} an instance of?",
    "subclass of": "What is {X} a subclass of?",
    "parent taxon": "What is the parent taxon of {X}?",
    "present in work": "In which work does {X} appear?",
    "characters": "Who is a character in {X}?",
    "followed by": "What followed {X}?",
    "follows": "What did {X} follow?",
    "replaces": "What did {X} replace?",
    "replaced by": "What replaced {X}?",
    "occupant": "Who is the occupant of {X}?",
    "named after": "What is {X} named after?",
    "league": "Which league does {X} play in?",
    "sport": "Which sport does {X} play?",
    "position played on team / speciality": "What position does {X} play?",
    "genre": "What is the genre of {X}?",
    "movement": "Which movement is {X} associated with?",
    "instrument": "What instrument does {X} play?",
    "licensed to broadcast to": "Where is {X} licensed to broadcast to?",
    "original network": "What is the original network of {X}?",
    "original language of film or tv show": "What is the original language of {X}?",
    "original language of work": "What is the original language of {X}?",
    "language of work or name": "What is the language of {X}?",
    "languages spoken, written or signed": "Which language does {X} speak?",
    "official language": "What is the official language of {X}?",
    "religion": "What is the religion of {X}?",
    "head of government": "Who is the head of government of {X}?",
    "head of state": "Who is the head of state of {X}?",
    "chairperson": "Who is the chairperson of {X}?",
    "chief executive officer": "Who is the chief executive officer of {X}?",
    "military branch": "Which military branch did {X} serve in?",
    "conflict": "Which conflict did {X} take part in?",
    "participant of": "What did {X} participate in?",
    "stock exchange": "On which stock exchange is {X} listed?",
    "industry": "What industry is {X} in?",
    "product or material produced": "What does {X} produce?",
    "twinned administrative body": "What is a twin city of {X}?",
    "home venue": "What is the home venue of {X}?",
    "dissolved, abolished or demolished": "When was {X} dissolved or demolished?",
    "platform": "On which platform does {X} run?",
    "series": "Which series is {X} part of?",
    "based on": "What is {X} based on?",
    "from fictional universe": "Which fictional universe is {X} from?",
    "voice type": "What is the voice type of {X}?",
}


def normalize_relation(relation: str) -> str:
    """Relation label as used for lookup: underscores to spaces, lower case, single spaces."""
    return clean(relation.replace("_", " ")).lower()


def relation_question(subject: str, relation: str) -> str:
    """A natural single-hop question for (subject, relation); unknown relations read
    "What is the {relation} of {subject}?"."""
    rel = normalize_relation(relation)
    template = RELATION_TEMPLATES.get(rel, "What is the " + rel.replace("{", "").replace("}", "") + " of {X}?")
    return template.replace("{X}", clean(subject))


# ----------------------------------------------------------------------------- building pieces


@dataclass
class RecordContext:
    """Collects the knowledge pieces of one record and the pieces it had to leave out.

    ``dataset`` prefixes every piece id (``dataset:record:hop``); ``index`` is the record's
    0-based position in the input.
    """

    dataset: str
    index: int
    record_id: Optional[str] = None
    pieces: list[KnowledgePiece] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        """Count one piece that this record could not yield, under ``reason``."""
        self.skipped[reason] += 1

    def add(
        self,
        hop: Optional[int],
        kind: PieceKind,
        prompt: str,
        answer: str,
        *,
        field: str,
        aliases: Iterable[str] = (),
        support: Optional[str] = None,
        triple: Optional[tuple[str, str, str]] = None,
        counterfactual: Optional[str] = None,
        piece_id: Optional[str] = None,
        question_id: Optional[str] = None,
        role: Optional[PieceRole] = None,
        edit_id: Optional[str] = None,
        criterion: Optional[str] = None,
        answer_before: Optional[str] = None,
        condition_id: Optional[str] = None,
    ) -> Optional[KnowledgePiece]:
        """Add one knowledge piece; return it, or None when it leaks its answer (counted).

        ``role``, ``edit_id``, ``criterion``, ``answer_before`` and ``condition_id`` are the
        benchmark fields of :class:`~gradcouple.pieces.KnowledgePiece` (None: a plain fact).

        Raises:
            RecordError: the prompt or the answer is blank (``field`` names where it came from).
        """
        assert self.record_id is not None, "set record_id before adding pieces"
        prompt, answer = clean(prompt), clean(answer)
        if not prompt:
            raise RecordError(field, "empty prompt/question", f"empty question: {_generic(field)}")
        if not answer:
            raise RecordError(field, "empty answer", f"empty answer: {_generic(field)}")
        if leaks(prompt, answer):
            self.skip(LEAK)
            return None
        seen = {answer.casefold()}
        alias_list = []
        for a in aliases:
            a = clean(a)
            if a and a.casefold() not in seen:
                seen.add(a.casefold())
                alias_list.append(a)
        cf = clean(counterfactual) if counterfactual is not None else None
        qid = question_id or self.record_id
        piece = KnowledgePiece(
            id=piece_id or f"{self.dataset}:{self.record_id}:{'q' if hop is None else hop}",
            dataset=self.dataset,
            question_id=qid,
            hop=hop,
            kind=kind,
            prompt=prompt,
            answer=answer,
            aliases=alias_list,
            support=clean(support) if support else None,
            triple=Triple(subject=clean(triple[0]), relation=clean(triple[1]), object=clean(triple[2])) if triple else None,
            counterfactual=cf or None,
            owners=[qid],
            role=role,
            edit_id=edit_id,
            criterion=clean(criterion) if criterion else None,
            answer_before=clean(answer_before) if answer_before and clean(answer_before) else None,
            condition_id=condition_id,
        )
        self.pieces.append(piece)
        return piece


def dedup_key(piece: KnowledgePiece) -> tuple:
    """What makes two pieces the same for :func:`deduplicate`: (prompt, answer) for a plain
    fact; for a benchmark piece also its role and its edit (an edit piece is its own edit, so
    two edits never merge, and no piece merges across edits or roles)."""
    if piece.role is None and piece.edit_id is None:
        return (piece.prompt, piece.answer)
    edit = piece.id if piece.role == PieceRole.edit else piece.edit_id
    return (piece.prompt, piece.answer, piece.role.value if piece.role else None, edit)


def deduplicate(pieces: Iterable[KnowledgePiece]) -> tuple[list[KnowledgePiece], Counter, int]:
    """Merge pieces with the same :func:`dedup_key` (identical prompt and answer; for benchmark
    pieces also the same role and edit), keeping the first one's id, hop, kind and support, the
    union of owners and aliases, the first counterfactual given, and the first criterion,
    answer_before and condition_id given. References to a merged-away piece (``edit_id``,
    ``condition_id``) are redirected to the piece it was merged into.

    Returns the kept pieces (in first-seen order), per kind how many were merged away, and how
    many merged pieces carried a counterfactual different from the kept one (the first wins).
    """
    kept: dict[tuple, KnowledgePiece] = {}
    merged_into: dict[str, str] = {}
    merged: Counter = Counter()
    conflicts = 0
    for p in pieces:
        key = dedup_key(p)
        first = kept.get(key)
        if first is None:
            kept[key] = p.model_copy(deep=True)
            continue
        merged[p.kind.value] += 1
        merged_into[p.id] = first.id
        for o in p.owners:
            if o not in first.owners:
                first.owners.append(o)
        known = {a.casefold() for a in first.aliases} | {first.answer.casefold()}
        for a in p.aliases:
            if a.casefold() not in known:
                first.aliases.append(a)
                known.add(a.casefold())
        if first.counterfactual is None:
            first.counterfactual = p.counterfactual
        elif p.counterfactual is not None and p.counterfactual != first.counterfactual:
            conflicts += 1
        if first.support is None and p.support is not None:
            first.support = p.support
        if first.triple is None and p.triple is not None:
            first.triple = p.triple
        for name in ("criterion", "answer_before", "condition_id"):
            if getattr(first, name) is None and getattr(p, name) is not None:
                setattr(first, name, getattr(p, name))
    out = list(kept.values())
    if merged_into:
        for p in out:
            if p.edit_id in merged_into:
                p.edit_id = merged_into[p.edit_id]
            if p.condition_id in merged_into:
                p.condition_id = merged_into[p.condition_id]
    return out, merged, conflicts


def gold_answer(record: Mapping) -> tuple[str, list[str], str]:
    """The record's gold answer, its aliases and the field it came from.

    Reads ``answer`` (+ ``answer_aliases`` / ``answer_alias``), or FlashRAG's
    ``golden_answers`` (the answer first, then its aliases), at top level or in ``metadata``.

    Raises:
        RecordError: no answer field, or an empty answer.
    """
    for key in ("answer", "Answer"):
        if key in record:
            answer = req_str(record, key)
            aliases: list[str] = []
            for akey in ("answer_aliases", "answer_alias"):
                if akey in record:
                    aliases = str_list(record[akey], akey)
            return answer, aliases, key
    if has(record, "golden_answers"):
        value, path = lookup(record, "golden_answers")
        golden = str_list(value, path)
        if not golden:
            raise RecordError(path, "empty answer list", f"empty answer: {path}")
        return golden[0], golden[1:], f"{path}[0]"
    raise RecordError("answer", "missing")
