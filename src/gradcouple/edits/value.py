"""What ROME, MEMIT and AlphaEdit share: a rewrite's prompts with context templates, the key at the
subject's last token, and the value vector optimised to make the new target the model's answer.

The value is ROME's v* (Meng et al. 2022, §3.1, eq. 4; kmeng01/rome rome/compute_v.py) and MEMIT's
z (Meng et al. 2023, "Mass-Editing Memory in a Transformer", §4.2; kmeng01/memit
memit/compute_z.py): a vector δ added at the lookup token of every templated prompt, at one site
(the MLP output for ROME, the block output for MEMIT), optimised by Adam for

    mean over prompts of the new target's per-token NLL
    + kl_factor · KL at the subject of "{subject} is a"
    + v_weight_decay · |δ| / |v_init|²,

stopping when that loss is under 0.05, with |δ| kept within clamp_norm_factor · |v_init|. The
value is v_init + δ, v_init being the site's output at the lookup token of the bare prompt.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..layers import Target, find_blocks
from ..scoring import EncodedPiece, encode, final_logits, subject_position
from pydantic import Field

from .base import EditContext, Hparams, Layers, Rewrite

log = logging.getLogger(__name__)

V_LOSS_LAYER = ("Block whose output the value's loss is read from; none: the last (the model's output, as in every "
                "published setting)")


class ValueHparams(Hparams):
    """The knobs ROME, MEMIT and AlphaEdit share: where they edit and how the target value is optimised
    (:func:`optimise_value`), named as in kmeng01/rome's compute_v; defaults are EasyEdit's
    hparams/ROME/llama-7b.yaml and hparams/MEMIT/llama-7b.yaml, which agree on them."""

    layers: Layers = Field(default=None, description="Blocks whose MLP output projections the method edits, e.g. 4-8; none: the "
                           "model's published setting (gradcouple/hparams)", json_schema_extra={"flag": "--edit-layers"})
    fact_token: str = Field(default="subject_last", description="Where the fact is looked up: subject_last or last")
    v_num_grad_steps: int = Field(default=25, ge=1, description="Adam steps of the value optimisation",
                                  json_schema_extra={"flag": "--v-num-grad-steps"})
    v_lr: float = Field(default=0.5, gt=0, description="Adam learning rate of the value optimisation",
                        json_schema_extra={"flag": "--v-lr"})
    v_loss_layer: Optional[int] = Field(default=None, description=V_LOSS_LAYER)
    v_weight_decay: float = Field(default=1e-3, ge=0, description="Weight of |delta| / |initial value|^2 in the value's loss")
    clamp_norm_factor: float = Field(default=4.0, gt=0, description="Largest |delta| of the value, as a multiple of its initial norm",
                                     json_schema_extra={"flag": "--clamp-norm-factor"})
    kl_factor: float = Field(default=0.0625, ge=0, description="Weight of the KL term at '{subject} is a'")

#: the loss under which the value optimisation stops (ROME's and MEMIT's compute_v/compute_z)
STOP_LOSS = 5e-2
FACT_TOKENS = ("subject_last", "last")


@dataclass
class Prompts:
    """A rewrite's templated prompts, encoded with the new target: ``encoded[k]`` is
    ``prefixes[k] + prompt + answer`` and ``lookup[k]`` its lookup token (the subject's last token,
    or the last prompt token); ``kl_ids``/``kl_lookup`` the KL prompt "{subject} is a" (None
    without a subject). ``found``: whether the subject was found in the bare prompt."""

    encoded: list[EncodedPiece]
    lookup: list[int]
    kl_ids: Optional[list[int]]
    kl_lookup: Optional[int]
    found: bool


def lookup_index(tokenizer, enc: EncodedPiece, subject: Optional[str], fact_token: str) -> tuple[int, bool]:
    """The token where the fact is looked up (ROME's ``find_fact_lookup_idx``): the last token of the
    subject ('subject_last') or the last prompt token ('last', or a prompt that does not name the
    subject). Returns (index into ``enc.ids``, whether the subject was found)."""
    if fact_token == "subject_last" and subject:
        pos = subject_position(tokenizer, enc, subject)
        if pos is not None:
            return pos, True
    return enc.answer_start - 1, False


def templated_prompts(tokenizer, rewrite: Rewrite, prefixes: Sequence[str], fact_token: str,
                      max_length: int) -> Prompts:
    """Encode ``rewrite`` behind every prefix (the first prefix is "" for the bare prompt) and its KL prompt.

    Raises:
        ConfigError: an unknown ``fact_token``.
    """
    if fact_token not in FACT_TOKENS:
        raise ConfigError(f"fact_token {fact_token!r}: use one of {', '.join(FACT_TOKENS)}.")
    new = rewrite.new
    encoded = [new if not p else encode(tokenizer, p + new.prompt, new.answer, max_length) for p in prefixes]
    found = [lookup_index(tokenizer, e, rewrite.subject, fact_token) for e in encoded]
    kl_ids = kl_lookup = None
    if rewrite.subject:
        text = f"{rewrite.subject} is a"
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        end = len(rewrite.subject)
        kl_ids = list(enc["input_ids"])
        hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end <= b]
        kl_lookup = hits[0] if hits and fact_token == "subject_last" else len(kl_ids) - 1
    return Prompts(encoded, [i for i, _ in found], kl_ids, kl_lookup, found[0][1])


def _pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), 1
    return ids.to(device), mask.to(device)


def _by_row(t: torch.Tensor, batch: int) -> torch.Tensor:
    """A module's (B, T, d) input or output; OPT's MLP works on (B * T, d), viewed here as (B, T, d)."""
    return t.view(batch, -1, t.shape[-1]) if t.dim() == 2 else t


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def capture(model, modules: dict[str, nn.Module], rows: list[list[int]], positions: list[int],
            pad_id: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each module's input and output at ``positions[b]`` of row ``b``: {name: ((B, d_in), (B, d_out))
    float64 on the CPU}, from one no-grad forward of the right-padded rows."""
    ids, mask = _pad(rows, pad_id, next(model.parameters()).device)
    got: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    b = torch.arange(len(rows))
    pos = torch.tensor(positions)

    def hook(name):
        def fn(m, args, out):
            x, y = _by_row(args[0], len(rows)), _by_row(_first(out), len(rows))
            got[name] = tuple(t.detach()[b.to(t.device), pos.to(t.device)].double().cpu() for t in (x, y))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return got


def block_module(model, block: int) -> nn.Module:
    """The transformer block ``block`` of ``model`` (MEMIT's ``layer_module_tmp``)."""
    return find_blocks(model)[1][block]


def last_block(model) -> int:
    """Index of the model's last transformer block (the reference's ``v_loss_layer``)."""
    return len(find_blocks(model)[1]) - 1


class PrefixKV:
    """A batch of rows split at their lookup tokens: what precedes a row's lookup token never sees δ
    (it enters at the lookup token, and attention is causal), so its keys and values at every block are
    computed once, in one no-grad forward of the left-padded prefixes, and each optimisation step runs
    only the tails (the lookup token and what follows it) against them, as batched generation does.

    Row b's tail holds its tokens ``cut[b]:``: ``input_ids`` and ``position_ids`` (B, T_tail) int64 are the
    tail call's, ``mask`` (B, P + T_tail) int64 covers prefix and tail, P = max(cut). Positions are each
    row's own (0 at its first real token), so rotary, learned and ALiBi positions and sliding windows see
    what the whole row would. ``cache`` is the prefixes' transformers ``DynamicCache`` (or, in older
    transformers, tuples of (B, heads, P, head_dim) tensors). ``usable`` is False when the model made another
    kind of cache (a fixed-length one, which a tail would overflow) or a key or value that is not finite
    (a padding row attending to nothing, on kernels that give NaN for it): the caller then runs whole rows.
    The same scores as the whole rows to the model dtype's rounding (tests/test_suffix.py compares them in
    float32 for every family layers.py names).
    """

    def __init__(self, model, rows: list[list[int]], cut: list[int], pad_id: int, device):
        self.model = model
        B, P = len(rows), max(cut)
        tails = [r[c:] for r, c in zip(rows, cut)]
        T = max(len(t) for t in tails)
        pre = torch.full((B, P), pad_id, dtype=torch.long)
        pre_mask = torch.zeros((B, P), dtype=torch.long)
        ids = torch.full((B, T), pad_id, dtype=torch.long)
        tail_mask = torch.zeros((B, T), dtype=torch.long)
        for b, (r, c) in enumerate(zip(rows, cut)):
            if c:
                pre[b, P - c:], pre_mask[b, P - c:] = torch.tensor(r[:c]), 1
            ids[b, :len(tails[b])], tail_mask[b, :len(tails[b])] = torch.tensor(tails[b]), 1
        params = inspect.signature(type(model.base_model).forward).parameters  # the class's: suffix.py patches the instance
        self.positions = "position_ids" in params
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5
        self.input_ids = ids.to(device)
        self.mask = torch.cat([pre_mask, tail_mask], 1).to(device)
        self.position_ids = (torch.tensor(cut)[:, None] + torch.arange(T)[None, :]).to(device)
        kw = {"position_ids": (pre_mask.cumsum(1) - 1).clamp(min=0).to(device)} if self.positions else {}
        with torch.no_grad():
            out = model.base_model(input_ids=pre.to(device), attention_mask=pre_mask.to(device), use_cache=True, **kw)
        self.cache = out[1] if isinstance(out, tuple) else getattr(out, self.cache_kw)
        self.usable = ((isinstance(self.cache, tuple) or type(self.cache).__name__ == "DynamicCache")
                       and all(bool(torch.isfinite(t).all()) for t in _cache_tensors(self.cache)))

    def __call__(self):
        """One forward of the tails (grad as the caller's), against a fresh copy of the prefixes' keys and values."""
        kw = {"position_ids": self.position_ids} if self.positions else {}
        kw[self.cache_kw] = copy.deepcopy(self.cache)
        return self.model.base_model(input_ids=self.input_ids, attention_mask=self.mask, use_cache=True, **kw)


def _cache_tensors(cache) -> list[torch.Tensor]:
    """Every key and value tensor of a KV cache: a transformers Cache (``layers``, or the older
    ``key_cache``/``value_cache`` lists) or nested tuples."""
    if isinstance(cache, torch.Tensor):
        return [cache]
    if isinstance(cache, (tuple, list)):
        return [t for c in cache for t in _cache_tensors(c)]
    out = []
    for layer in getattr(cache, "layers", None) or []:
        out += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor)]
    for name in ("key_cache", "value_cache"):
        out += [t for t in getattr(cache, name, None) or [] if isinstance(t, torch.Tensor)]
    for name in ("self_attention_cache", "cross_attention_cache"):  # an encoder-decoder wrapper
        if getattr(cache, name, None) is not None:
            out += _cache_tensors(getattr(cache, name))
    return out


def optimise_value(ctx: EditContext, site: nn.Module, width: int, prompts: Prompts, v_num_grad_steps: int, v_lr: float,
                   kl_factor: float, v_weight_decay: float, clamp_norm_factor: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """ROME's compute_v / MEMIT's compute_z: the δ added to ``site``'s output at every prompt's lookup
    token that makes the new target likely (see the module docstring for the loss).

    ``site`` is a module whose output (or the first element of it) is (B, T, ``width``). Runs on the
    model as it is (earlier edits included) and leaves it unchanged. With ``ctx.prefix_cache`` each step
    runs only the positions from each prompt's lookup token on (:class:`PrefixKV`), the same loss to
    float32 rounding at a quarter of the tokens on RippleEdits prompts.

    Returns (v_init, δ, trace): v_init and δ (d,) float32 on the model's device; trace holds the
    final loss terms (nats) and the steps taken.
    """
    model, pad_id = ctx.model, ctx.pad_id
    device = next(model.parameters()).device
    n_rw = len(prompts.encoded)
    rows = [list(e.ids[:e.n_inputs]) for e in prompts.encoded] + ([prompts.kl_ids] if prompts.kl_ids else [])
    lookup = list(prompts.lookup) + ([prompts.kl_lookup] if prompts.kl_ids else [])
    cut = lookup if ctx.prefix_cache and max(lookup) > 0 else [0] * len(rows)
    prefix = PrefixKV(model, rows, cut, pad_id, device) if any(cut) else None
    if prefix is not None and not prefix.usable:
        prefix, cut = None, [0] * len(rows)
    if prefix is not None:
        forward = prefix
    else:
        ids, mask = _pad(rows, pad_id, device)

        def forward():
            return model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert all(c <= e.answer_start - 1 for c, e in zip(cut, prompts.encoded)), "a lookup token after the prompt"
    ans_b = torch.tensor([b for b, e in enumerate(prompts.encoded) for _ in range(e.answer_start, len(e.ids))], device=device)
    ans_t = torch.tensor([k - 1 - cut[b] for b, e in enumerate(prompts.encoded) for k in range(e.answer_start, len(e.ids))],
                         device=device)
    ans_y = torch.tensor([e.ids[k] for e in prompts.encoded for k in range(e.answer_start, len(e.ids))], device=device)
    n_tok = torch.tensor([e.n_answer_tokens for e in prompts.encoded], dtype=torch.float32, device=device)
    look_b = torch.arange(len(rows), device=device)
    look = [at - c for at, c in zip(lookup, cut)]
    look_t = torch.tensor(look, device=device)
    delta = torch.zeros(width, device=device, requires_grad=True)
    state: dict[str, torch.Tensor] = {}

    def hook(m, args, out):
        flat = _first(out)
        h = _by_row(flat, len(rows))
        if "init" not in state:  # recorded on the bare prompt, on the first forward (δ = 0)
            state["init"] = h[0, look[0]].detach().float().clone()
        h = h.index_put((look_b.to(h.device), look_t.to(h.device)),
                        delta.to(h.dtype).expand(len(rows), -1), accumulate=True).reshape(flat.shape)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    opt = torch.optim.Adam([delta], lr=v_lr)
    kl_init = None
    trace: dict = {}
    handle = site.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            for it in range(v_num_grad_steps):
                opt.zero_grad(set_to_none=True)
                out = forward()
                hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
                lp = final_logits(model, hidden[ans_b, ans_t]).log_softmax(-1).gather(1, ans_y[:, None])[:, 0]
                nll_each = -torch.zeros(n_rw, device=lp.device, dtype=lp.dtype).index_add(0, ans_b, lp) / n_tok
                nll = nll_each.mean()
                kl = torch.zeros((), device=lp.device)
                if prompts.kl_ids:
                    kl_lp = final_logits(model, hidden[n_rw:n_rw + 1, look[n_rw]]).log_softmax(-1)
                    if kl_init is None:
                        kl_init = kl_lp.detach().clone()
                    kl = kl_factor * F.kl_div(kl_init, kl_lp, log_target=True, reduction="batchmean")
                init = state["init"]
                wd = v_weight_decay * (delta.norm() / init.norm() ** 2)
                loss = nll + kl + wd
                trace = {"loss": loss.item(), "nll": nll.item(), "kl": kl.item(), "weight_decay": wd.item(), "steps": it,
                         "p_new": torch.exp(-nll_each).mean().item()}
                if trace["loss"] < STOP_LOSS or it == v_num_grad_steps - 1:
                    break
                loss.backward()
                opt.step()
                max_norm = clamp_norm_factor * init.norm()
                if delta.norm() > max_norm:
                    with torch.no_grad():
                        delta.mul_(max_norm / delta.norm())
    finally:
        handle.remove()
    return state["init"], delta.detach().clone(), trace


def module_io_at(ctx: EditContext, target: Target, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """``target``'s input and output at the lookup token of the bare prompt, on the model as it
    is (ROME's ``get_module_input_output_at_word``): ((d_in,), (d_out,)) float64 on the CPU."""
    e = prompts.encoded[0]
    x, y = capture(ctx.model, {"m": target.module}, [list(e.ids[:e.answer_start])], [prompts.lookup[0]], ctx.pad_id)["m"]
    return x[0], y[0]


def prompt_rows(prompts: Prompts) -> tuple[list[list[int]], list[int]]:
    """The templated prompts without their answers, as token rows, and their lookup tokens."""
    return [list(e.ids[:e.answer_start]) for e in prompts.encoded], list(prompts.lookup)


__all__ = ["FACT_TOKENS", "PrefixKV", "Prompts", "STOP_LOSS", "V_LOSS_LAYER", "ValueHparams", "block_module", "capture", "last_block", "lookup_index",
           "module_io_at", "optimise_value", "prompt_rows", "templated_prompts"]
