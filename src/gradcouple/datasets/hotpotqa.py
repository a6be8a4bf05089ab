"""HotpotQA (Yang et al., EMNLP 2018): supporting sentences become cloze knowledge pieces.

Reads the native release (``hotpot_dev_distractor_v1.json`` / ``hotpot_dev_fullwiki_v1.json``:
``_id``, ``question``, ``answer``, ``supporting_facts`` = [[title, sentence index], ...],
``context`` = [[title, [sentence, ...]], ...], ``type``, ``level``), the Hugging Face layout
(``hotpotqa/hotpot_qa``: ``id``, and dicts of parallel lists ``supporting_facts`` =
{title, sent_id}, ``context`` = {title, sentences}) and FlashRAG records (the same fields under
``metadata``, the answer in ``golden_answers``). Reference: https://hotpotqa.github.io and
https://github.com/hotpotqa/hotpot (README, "Data format").

Per record:

- each supporting sentence that mentions the answer or the bridge entity becomes a cloze
  piece (hop = the supporting fact's 0-based position in ``supporting_facts``): the sentence
  prefix before the first mention is the prompt (at least 3 words; a dangling opening quote or
  bracket dropped), the mention as written in the sentence is the answer, the sentence is the
  support. The answer is tried first, then the bridge entity.
- the bridge entity (bridge questions only) is the supporting paragraph title (disambiguation
  dropped) that the other supporting paragraph mentions; failing that, the title of the one
  supporting paragraph that does not contain the answer.
- yes/no answers (comparison questions) are never matched as spans: such sentences yield a
  piece only through a real span, else they are counted as skipped.
- the multi-hop question is a piece (hop None, id ``...:q``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

from ..pieces import PieceKind
from ._common import (
    RecordContext,
    RecordError,
    clean,
    entity_name,
    gold_answer,
    has,
    lookup,
    mention_pattern,
    record_id,
    req_dict,
    req_list,
    req_str,
)

FORMAT = "hotpotqa"
ID_KEYS = ("_id", "id")

NO_MENTION = "supporting sentence mentions neither the answer nor the bridge entity"
YES_NO = "yes/no answer: no answer span in the supporting sentence"
OPENS = "mention opens the sentence (empty cloze prefix)"
GLUED = "mention glued to the preceding word"
SHORT = "cloze prefix shorter than 3 words"
MISSING_PARAGRAPH = "supporting fact names a paragraph missing from the context"
MISSING_SENTENCE = "supporting fact points past the paragraph's last sentence"

_OPENERS = "\"'“‘«([{"
#: Shorter prefixes ("The", "Kasper") say nothing about the fact, or cut a name in two.
MIN_PREFIX_WORDS = 3


def sniff(record: Mapping) -> bool:
    """True when ``record`` looks like a HotpotQA record."""
    return has(record, "supporting_facts") and has(record, "context") and not has(record, "evidences")


def _title_pairs(record: Mapping, field: str, second: str, noun: str) -> tuple[list[tuple[Any, Any]], str]:
    """[(title, value), ...] of ``field`` in either layout: the native list of [title, value]
    pairs, or the Hub's dict of parallel lists {"title": [...], second: [...]}."""
    value, path = lookup(record, field)
    if isinstance(value, Mapping) or (isinstance(value, str) and value.startswith("{")):
        value = req_dict(value, path)
        titles = req_list(value.get("title"), f"{path}.title")
        seconds = req_list(value.get(second), f"{path}.{second}")
        if len(titles) != len(seconds):
            raise RecordError(path, f"{len(titles)} titles but {len(seconds)} {noun}s", f"title/{second} length mismatch: {path}")
        return list(zip(titles, seconds)), path
    pairs = []
    for i, item in enumerate(req_list(value, path)):
        item = req_list(item, f"{path}[{i}]")
        if len(item) != 2:
            raise RecordError(f"{path}[{i}]", f"expected [title, {noun}]")
        pairs.append((item[0], item[1]))
    return pairs, path


def paragraphs(record: Mapping) -> dict[str, list[str]]:
    """``context`` as {title: [sentence, ...]} from either layout (native list of pairs, or
    the Hub's {title: [...], sentences: [[...]]})."""
    pairs, path = _title_pairs(record, "context", "sentences", "sentence list")
    out: dict[str, list[str]] = {}
    for i, (title, sentences) in enumerate(pairs):
        if not isinstance(title, str):
            raise RecordError(f"{path}[{i}].title", "expected a string")
        out.setdefault(title, [str(s) for s in req_list(sentences, f"{path}[{i}].sentences")])
    return out


def context_texts(record: Mapping) -> list[str]:
    """Each context paragraph's sentences joined into one text, in record order (either layout)."""
    pairs, path = _title_pairs(record, "context", "sentences", "sentence list")
    return ["".join(str(s) for s in req_list(sentences, f"{path}[{i}].sentences")) for i, (_, sentences) in enumerate(pairs)]


def supporting_facts(record: Mapping) -> list[tuple[str, int]]:
    """``supporting_facts`` as [(title, sentence index), ...] from either layout."""
    pairs, path = _title_pairs(record, "supporting_facts", "sent_id", "sentence index")
    out = []
    for i, (title, idx) in enumerate(pairs):
        if not isinstance(title, str) or isinstance(idx, bool) or not isinstance(idx, int):
            raise RecordError(f"{path}[{i}]", "expected [title (string), sentence index (integer)]")
        out.append((title, idx))
    return out


def _is_yes_no(answer: str) -> bool:
    return answer.casefold() in {"yes", "no"}


def bridge_entity(
    answer: str, support: dict[str, list[str]], answer_pat: Optional[re.Pattern]
) -> Optional[str]:
    """The bridge entity of a bridge question, from its supporting sentences by title.

    The title mentioned in another supporting paragraph's sentences (the link between the two
    hops) wins; otherwise the title of the single supporting paragraph without the answer.
    """
    titles = list(support)
    names = {t: entity_name(t) for t in titles}
    linked = [
        t
        for t in titles
        if names[t].casefold() != answer.casefold()
        and any(mention_pattern(names[t]).search(s) for u in titles if u != t for s in support[u])
    ]
    if linked:
        return names[linked[0]]

    def has_answer(t: str) -> bool:
        if names[t].casefold() == answer.casefold():
            return True
        return bool(answer_pat) and any(answer_pat.search(s) for s in support[t])

    without = [t for t in titles if not has_answer(t)]
    return names[without[0]] if len(without) == 1 and len(titles) > 1 else None


def _cloze(sentence: str, target: str) -> tuple[Optional[tuple[str, str]], Optional[str]]:
    """(prompt, mention) for the first mention of ``target`` in ``sentence``, or a skip reason
    (None when ``target`` is not mentioned at all)."""
    m = mention_pattern(target).search(sentence)
    if m is None:
        return None, None
    before = sentence[: m.start()]
    prompt = before.rstrip()
    stripped_opener = False
    while prompt and prompt[-1] in _OPENERS:
        # Drop a dangling opening quote or bracket: the answer is scored after a space.
        prompt = prompt[:-1].rstrip()
        stripped_opener = True
    if not prompt:
        return None, OPENS
    if before and not before[-1].isspace() and not stripped_opener:
        return None, GLUED
    if len(prompt.split()) < MIN_PREFIX_WORDS:
        return None, SHORT
    return (prompt, m.group(0)), None


def parse(record: Mapping, ctx: RecordContext) -> None:
    """Add the cloze pieces and the multi-hop question piece of one HotpotQA record.

    Raises:
        RecordError: a required field (id, question, answer, context, supporting_facts) is
            missing, empty or malformed.
    """
    ctx.record_id = record_id(record, ID_KEYS, ctx.index)
    question = req_str(record, "question")
    answer, aliases, answer_field = gold_answer(record)
    context = paragraphs(record)
    facts = supporting_facts(record)
    qtype = clean(record.get("type") or (record.get("metadata") or {}).get("type") or "")

    yes_no = _is_yes_no(answer)
    answer_pat = None if yes_no else mention_pattern(answer)
    support: dict[str, list[str]] = {}
    for title, idx in facts:
        if title in context and 0 <= idx < len(context[title]):
            support.setdefault(title, []).append(clean(context[title][idx]))
    bridge = bridge_entity(answer, support, answer_pat) if qtype in ("bridge", "") and not yes_no else None

    for hop, (title, idx) in enumerate(facts):
        if title not in context:
            ctx.skip(MISSING_PARAGRAPH)
            continue
        if not 0 <= idx < len(context[title]):
            ctx.skip(MISSING_SENTENCE)
            continue
        sentence = clean(context[title][idx])
        targets = ([] if yes_no else [(answer, aliases + [answer])]) + ([(bridge, [bridge])] if bridge else [])
        first_reason = None
        for target, target_aliases in targets:
            found, reason = _cloze(sentence, target)
            if found:
                prompt, mention = found
                ctx.add(hop, PieceKind.cloze, prompt, mention, field=f"supporting_facts[{hop}]",
                        aliases=target_aliases, support=sentence)
                break
            first_reason = first_reason or reason
        else:
            ctx.skip(first_reason or (YES_NO if yes_no and not bridge else NO_MENTION))

    ctx.add(None, PieceKind.multi_hop, question, answer, field=answer_field, aliases=aliases)
