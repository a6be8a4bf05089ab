"""The rules that decide what counts as the same thing: same question, same answer, how an
answer continues its prompt. Each is defined here once; couple, ripple and the report call
these functions, and :data:`RULES` is the text the docs and the report quote.
"""

from __future__ import annotations

import unicodedata
from enum import Enum
from typing import Iterable, Sequence

import torch

RULES: dict[str, str] = {
    "same question": "Two pieces are same-question when their owner sets (the multi-hop question ids that yielded "
                     "the piece, several after deduplication) intersect; otherwise cross-question.",
    "same answer": "Two pieces have the same answer when their answer strings are equal after case-folding and "
                   "collapsing whitespace (the case-folded match).",
    "answer match": "exact: the strings are equal; alias: the candidate equals the answer or one of its aliases "
                    "(each case-folded); case-folded: equal after case-folding and collapsing whitespace.",
    "leading space": "The scored answer starts with one space unless the prompt already ends in whitespace or in a "
                     "script written without spaces between words (Chinese, Japanese, Thai, ...; fullwidth and "
                     "ideographic punctuation too), so BPE and SentencePiece vocabularies see the answer as a "
                     "word start where the prompt's script has word starts.",
    "exact match": "The greedy continuation of the prompt begins with the expected answer or one of its first three "
                   "aliases: every answer token is the argmax given the prompt and the answer tokens before it "
                   "(case-sensitive; RippleEdits' rule, applied to the start of the continuation).",
    "condition known": "A test query's condition fact is known when, on the unedited model, it is an exact match; "
                       "RippleEdits counts a test only then (statistics are given with and without this filter).",
    "stable test": "A test query of a locality criterion (RippleEdits' Relation_Specificity and Forgetfulness, "
                   "EasyEdit's locality, CounterFact's neighborhood) keeps its answer through the edit; every other "
                   "test query's answer is the one the edit should bring about.",
}

#: test criteria whose queries keep their answer through the edit (``RULES['stable test']``)
STABLE_CRITERIA = ("Relation_Specificity", "Relation_Specifity", "Forgetfulness", "neighborhood", "locality")


def stable_test(criterion: str | None) -> bool:
    """``RULES['stable test']``: whether a test of ``criterion`` should keep its answer through the edit."""
    return criterion in STABLE_CRITERIA


class AnswerMatch(str, Enum):
    """How a candidate answer is compared with a reference (see ``RULES['answer match']``)."""

    exact = "exact"
    alias = "alias"
    case_folded = "case-folded"


def normalize_answer(text: str) -> str:
    """Case-folded answer with runs of whitespace collapsed: the key of the case-folded match."""
    return " ".join(text.split()).casefold()


def answers_match(candidate: str, answer: str, aliases: Iterable[str] = (),
                  rule: AnswerMatch = AnswerMatch.case_folded) -> bool:
    """Whether ``candidate`` matches ``answer`` under ``rule`` (aliases count only for ``alias``)."""
    if rule == AnswerMatch.exact:
        return candidate == answer
    if rule == AnswerMatch.alias:
        return normalize_answer(candidate) in {normalize_answer(a) for a in (answer, *aliases)}
    return normalize_answer(candidate) == normalize_answer(answer)


def same_answer(a: str, b: str) -> bool:
    """The same-answer rule: case-folded match of two answer strings."""
    return normalize_answer(a) == normalize_answer(b)


def same_question(owners_a: Iterable[str], owners_b: Iterable[str]) -> bool:
    """The same-question rule: the two pieces share an owning multi-hop question id."""
    return bool(set(owners_a) & set(owners_b))


def same_question_matrix(owners: Sequence[Iterable[str]]) -> torch.Tensor:
    """(N, N) bool: entry (i, j) is :func:`same_question` of pieces i and j (diagonal True)."""
    sets = [set(o) for o in owners]
    col = {q: k for k, q in enumerate(sorted(set().union(*sets)))} if sets else {}
    member = torch.zeros(len(sets), max(1, len(col)))
    for i, qs in enumerate(sets):
        for q in qs:
            member[i, col[q]] = 1.0
    return (member @ member.t()) > 0


def same_answer_matrix(answers: Sequence[str]) -> torch.Tensor:
    """(N, N) bool: entry (i, j) is :func:`same_answer` of pieces i and j."""
    keys = [normalize_answer(a) for a in answers]
    code = {k: c for c, k in enumerate(sorted(set(keys)))}
    ids = torch.tensor([code[k] for k in keys], dtype=torch.long)
    return ids[:, None] == ids[None, :]


#: Unicode character-name prefixes of scripts written without spaces between words, and of their punctuation
UNSPACED_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "IDEOGRAPHIC", "FULLWIDTH", "THAI", "LAO", "KHMER", "MYANMAR",
                    "TIBETAN")


def unspaced(ch: str) -> bool:
    """Whether the character ``ch`` belongs to a script written without spaces between words."""
    return unicodedata.name(ch, "").startswith(UNSPACED_SCRIPTS)


def answer_continuation(prompt: str, answer: str) -> str:
    """The answer string as scored after ``prompt``: the leading-space rule (``RULES['leading space']``)."""
    answer = answer.strip()
    return answer if not prompt or prompt[-1].isspace() or unspaced(prompt[-1]) else " " + answer
