"""Context templates: short texts the model writes itself, prepended to an edit prompt so that the
key and the value of a rewrite hold whatever precedes the subject (Meng et al. 2022, ROME §3.1;
reference code kmeng01/rome rome/rome_main.py ``get_context_templates``, kmeng01/memit
memit/memit_main.py, zjunlp/EasyEdit easyeditor/models/rome/rome_main.py).

As in EasyEdit and MEMIT, each template is sampled (top-k 5) from one of the five openings
"The", "Therefore", "Because", "I", "You", to ``length`` tokens, braces removed and ". " appended;
the first template of every list is the bare prompt. The samples are seeded and kept in the user's
cache directory, keyed by the model's fingerprint, so every edit of every run on one model sees the
same templates.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from typing import Sequence

import torch

from ..io import atomic_open
from ..models import cache_dir
from ..io import digest

log = logging.getLogger(__name__)

OPENINGS = ("The", "Therefore", "Because", "I", "You")
#: version of the sampling below: part of the cache key
TEMPLATES_VERSION = 1


def _sample(model, tokenizer, opening: str, n: int, length: int, seed: int) -> list[str]:
    """``n`` continuations of ``opening``, ``length`` tokens in all (prompt included), top-k 5
    sampling as ROME's ``generate_fast``; decoded, NFKD-normalised, blank lines joined."""
    device = next(model.parameters()).device
    enc = tokenizer([opening], return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                             do_sample=True, top_k=5, top_p=1.0, temperature=1.0, max_length=max(length, enc["input_ids"].shape[1] + 1),
                             num_return_sequences=n, pad_token_id=pad)
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    return [unicodedata.normalize("NFKD", t).replace("\n\n", " ").replace("<|endoftext|>", "") for t in texts]


def context_templates(model, tokenizer, fingerprint: str, length_params: Sequence[Sequence[int]],
                      seed: int = 0) -> list[list[str]]:
    """Prefixes grouped by length: ``[[""], [p, ...] per (length, n_gen) of length_params]``.

    Each prefix ``p`` ends in ". " and is put before a prompt as ROME's template "p. {}" is
    formatted with it; ``n_gen // 5`` samples of each of the five openings per group
    (EasyEdit and MEMIT). Generated once per model, ``length_params`` and ``seed`` and kept
    (JSON) in ``cache_dir()/context-templates``; a damaged file is generated again.
    """
    params = [[int(a), int(b)] for a, b in length_params]
    key = digest([TEMPLATES_VERSION, fingerprint, params, seed, OPENINGS])
    path = cache_dir() / "context-templates" / f"{key}.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved["key"] == key:
                return [[""]] + saved["groups"]
        except (ValueError, KeyError, TypeError):
            pass
    was_training = model.training
    model.eval()
    groups = []
    try:
        for g, (length, n_gen) in enumerate(params):
            texts = [t for k, opening in enumerate(OPENINGS)
                     for t in _sample(model, tokenizer, opening, max(1, n_gen // len(OPENINGS)), length,
                                      seed * 1000 + g * 10 + k)]
            groups.append([t.replace("{", "").replace("}", "") + ". " for t in texts])
    finally:
        model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump({"key": key, "fingerprint": fingerprint, "length_params": params, "seed": seed, "groups": groups},
                  fh, ensure_ascii=False, indent=1)
    log.info(f"context templates for {fingerprint[:24]}: {sum(map(len, groups))} sampled, kept in {path}")
    return [[""]] + groups


__all__ = ["OPENINGS", "context_templates"]
