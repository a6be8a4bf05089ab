"""What is differentiated: the answer log-probability log P(a | q), summed over all answer tokens.

Prompt and answer are tokenized together and the answer tokens located by character offsets,
because tokenizing them separately gives different tokens at the boundary for BPE and
SentencePiece vocabularies. Logits are computed only at the positions that predict answer
tokens: the LM head is the largest matmul of a small model, and most positions need none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import DataError, ModelError
from .pieces import KnowledgePiece


@dataclass(frozen=True)
class EncodedPiece:
    """Token ids of prompt+answer and where the answer starts.

    ``ids[answer_start:]`` are the answer tokens; ``ids[:answer_start]`` the prompt tokens
    (after left truncation to ``max_length``).
    """

    ids: tuple[int, ...]
    answer_start: int
    prompt: str
    answer: str
    truncated_tokens: int = 0  #: prompt tokens cut from the left to fit max_length

    @property
    def n_prompt_tokens(self) -> int:
        return self.answer_start

    @property
    def n_answer_tokens(self) -> int:
        return len(self.ids) - self.answer_start

    @property
    def n_inputs(self) -> int:
        """Positions fed to the model: the last answer token is only ever a target."""
        return len(self.ids) - 1


def encode(tokenizer, prompt: str, answer: str, max_length: int = 256, where: str = "") -> EncodedPiece:
    """Tokenize ``prompt + answer`` once and locate the answer tokens by offsets.

    A token belongs to the answer when its character span ends after the answer's first
    non-space character, so a word-initial token that carries the separating space
    (" Paris", "▁Paris") counts as an answer token.

    Raises:
        DataError: the answer yields no token, or nothing precedes it.
    """
    text = prompt + answer
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    while ids and ids[-1] in special and offsets[-1][1] <= offsets[-1][0]:
        ids.pop(), offsets.pop()  # trailing EOS some tokenizers append
    a_char = len(prompt) + (len(answer) - len(answer.lstrip()))
    start = next((i for i, (s, e) in enumerate(offsets) if e > a_char and e > s), None)
    if start is None:
        raise DataError(f"{where}answer {answer!r} produced no tokens after prompt {prompt[-40:]!r}.")
    if start == 0:
        raise DataError(f"{where}prompt {prompt!r} produced no token before the answer; give the piece a prompt.")
    if len(ids) > max_length:
        keep = 0  # leading special tokens (BOS) that carry no text stay: some models degrade badly without them
        while keep < start and ids[keep] in special and offsets[keep][1] <= offsets[keep][0]:
            keep += 1
        cut = len(ids) - max_length
        if cut >= start - keep:
            raise DataError(f"{where}answer {answer[:40]!r} is longer than extract.max_length={max_length} tokens; raise --max-length.")
        ids, start = ids[:keep] + ids[keep + cut:], start - cut
        return EncodedPiece(tuple(ids), start, prompt, answer, cut)
    return EncodedPiece(tuple(ids), start, prompt, answer)


def encode_pieces(tokenizer, pieces: list[KnowledgePiece], template: str, max_length: int) -> list[EncodedPiece]:
    """Render each piece with ``template`` and tokenize it (errors name the piece id)."""
    out = []
    for p in pieces:
        prompt, answer = p.render(template)
        out.append(encode(tokenizer, prompt, answer, max_length, where=f"piece {p.id}: "))
    return out


def subject_position(tokenizer, encoded: EncodedPiece, subject: str) -> int | None:
    """Index in ``encoded.ids`` of the last token of the last mention of ``subject`` in the prompt,
    located by character offsets (ROME's key position); None when the prompt does not mention it.

    The match is case-sensitive first, then case-insensitive. Works for any fast tokenizer (BPE
    with "Ġ" word starts and SentencePiece with "▁" alike), since only character spans are used.
    """
    prompt = encoded.prompt
    at = prompt.rfind(subject)
    if at < 0:
        at = prompt.casefold().rfind(subject.casefold())
    if at < 0 or not subject:
        return None
    end = at + len(subject)
    offsets = tokenizer(encoded.prompt + encoded.answer, return_offsets_mapping=True, add_special_tokens=True)["offset_mapping"]
    shift = len(offsets) - len(encoded.ids)  # tokens cut from the left by max_length
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b >= end]
    pos = (hits[0] if hits else None)
    if pos is None or pos - shift < 0 or pos - shift >= encoded.answer_start:
        return None
    return pos - shift


@dataclass
class Batch:
    """Right-padded inputs and the scored positions of a batch of B pieces.

    input_ids, attention_mask: (B, T) int64, T = max n_inputs. pos_b, pos_t, targets: (M,)
    int64, one entry per answer token: logits at (pos_b, pos_t) predict ``targets``.
    lengths: (B,) int64 = n_inputs per piece.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pos_b: torch.Tensor
    pos_t: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.pos_b, self.pos_t, self.targets, self.lengths)))


def collate(pieces: Sequence[EncodedPiece], pad_id: int = 0) -> Batch:
    """Build a right-padded :class:`Batch` (padded positions are masked and never scored)."""
    B = len(pieces)
    T = max(p.n_inputs for p in pieces)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    pb, pt, tg = [], [], []
    for b, p in enumerate(pieces):
        n = p.n_inputs
        input_ids[b, :n] = torch.tensor(p.ids[:n])
        mask[b, :n] = 1
        for k in range(p.answer_start, len(p.ids)):
            pb.append(b), pt.append(k - 1), tg.append(p.ids[k])
    lengths = torch.tensor([p.n_inputs for p in pieces], dtype=torch.long)
    return Batch(input_ids, mask, torch.tensor(pb), torch.tensor(pt), torch.tensor(tg), lengths)


def final_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head (with the model's logit soft-capping and scaling) on final hidden states (..., d) -> (..., V) float32."""
    head = model.get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(model).__name__} has no output embedding (LM head); gradcouple needs a causal LM.")
    logits = head(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(model.config, "logits_scaling", None)
    if scale:
        logits = logits / scale
    return logits


def answer_logprob(model, batch: Batch) -> torch.Tensor:
    """log P(answer | prompt) per piece, in nats: (B,) float32, differentiable.

    Runs the base model (no LM head) over the batch and applies the LM head only at the M
    scored positions: logits (M, V) instead of (B, T, V).
    """
    return score(model, batch)[0]


def _answer_tokens(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log P(answer | prompt) (B,) float32 in nats, differentiable; the argmax token at each of the M
    scored positions (M,) int64; pos_b (M,)), the LM head applied only at the scored positions."""
    out = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    # a model spread over several GPUs (--device auto-map) ends on another device than it starts
    logits = final_logits(model, hidden[batch.pos_b.to(hidden.device), batch.pos_t.to(hidden.device)])
    targets, pos_b = batch.targets.to(logits.device), batch.pos_b.to(logits.device)
    token_lp = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]
    lp = torch.zeros(batch.input_ids.shape[0], dtype=token_lp.dtype, device=token_lp.device).index_add(0, pos_b, token_lp)
    return lp, logits.argmax(-1), pos_b


def score(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log P(answer | prompt) in nats (B,) float32, greedy (B,) bool), differentiable in the first.

    ``greedy`` is True when every answer token is the model's argmax given the prompt and the
    answer tokens before it: the greedy continuation of the prompt begins with the answer.
    """
    lp, top, pos_b = _answer_tokens(model, batch)
    miss = (top != batch.targets.to(top.device)).long()
    misses = torch.zeros(lp.shape[0], dtype=torch.long, device=miss.device).index_add(0, pos_b, miss)
    return lp, misses == 0


def measure_answers(model, encoded: list[EncodedPiece], batch_size: int = 16,
                    pad_id: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """log P(answer | prompt) in nats, (N,) float64, and the model's argmax token at each answer position
    given the prompt and the answer tokens before it (teacher forcing; (n_answer_tokens,) int64 each),
    from one no-grad forward per batch. Identical encodings are scored once; batches are sorted by length,
    so padding is least. The greedy continuation begins with the answer exactly when its argmax tokens
    are the answer's (:func:`is_greedy`)."""
    device = next(model.parameters()).device
    first: dict[tuple, int] = {}
    unique = [first.setdefault((e.ids, e.answer_start), i) for i, e in enumerate(encoded)]
    todo = sorted(set(unique), key=lambda i: encoded[i].n_inputs)
    lp_of: dict[int, float] = {}
    top_of: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for k in range(0, len(todo), batch_size):
            idx = todo[k:k + batch_size]
            lp, top, pos_b = _answer_tokens(model, collate([encoded[i] for i in idx], pad_id).to(device))
            top, pos_b = top.cpu(), pos_b.cpu()
            for b, i in enumerate(idx):
                lp_of[i], top_of[i] = float(lp[b]), top[pos_b == b]
    return torch.tensor([lp_of[u] for u in unique], dtype=torch.float64), [top_of[u] for u in unique]


def is_greedy(encoded: EncodedPiece, argmax: torch.Tensor) -> bool:
    """Whether the argmax tokens (:func:`measure_answers`) are the answer's: the greedy continuation
    of the prompt begins with the answer."""
    return argmax.tolist() == list(encoded.ids[encoded.answer_start:])


def measure_logprobs(model, encoded: list[EncodedPiece], batch_size: int = 16, pad_id: int = 0) -> torch.Tensor:
    """log P(answer | prompt) of every piece in nats, (N,) float64, batched by length, no grad."""
    return measure_answers(model, encoded, batch_size, pad_id)[0]


def answer_argmax(model, encoded: list[EncodedPiece], batch_size: int = 16, pad_id: int = 0) -> list[torch.Tensor]:
    """Per piece, the model's argmax token at each answer position, given the prompt and the answer
    tokens before it (teacher forcing): (n_answer_tokens,) int64 each, no grad."""
    return measure_answers(model, encoded, batch_size, pad_id)[1]


def full_logits_logprob(model, batch: Batch) -> torch.Tensor:
    """Reference log P(answer | prompt) from the model's own full forward (all logits), (B,) float32."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits.float()
    lp = logits[batch.pos_b, batch.pos_t].log_softmax(-1).gather(1, batch.targets[:, None])[:, 0]
    return torch.zeros(batch.input_ids.shape[0], dtype=lp.dtype).index_add(0, batch.pos_b.cpu(), lp.cpu())
