"""Suffix execution: an edit of blocks >= L leaves blocks 0..L-1, and so the residual stream entering
block L, unchanged; that residual is computed once per scored sequence and every later forward runs
blocks L..end and the head only.

:class:`SuffixExecution` is a context manager over a causal LM. Inside it, every call of the model's
base model (``model.base_model(input_ids=..., attention_mask=..., use_cache=False)``, the way
gradcouple scores and fine-tunes; the value optimisation of ROME, MEMIT and AlphaEdit runs its prompts'
tails against a KV cache instead, :class:`~gradcouple.edits.value.PrefixKV`, and so whole) looks each row up by its unpadded tokens and
where they start; a row seen before gets its residual from memory, the others have it computed in
one forward that stops at block L. The blocks below L then return their input untouched and block L
receives the stored residual; embeddings, rotary positions, attention and sliding-window masks are
computed by the model's own forward as always, so the suffix is the model's own code, and its
log-probabilities equal the full model's to float32 rounding.

The cache is only valid while the weights below L stay as they are. Every in-place change of a
tensor bumps its version counter; the versions of every parameter outside blocks L..end are read at
each call and the cache is emptied when one moved. (Writes through ``param.data`` bypass the
counter: gradcouple never makes them, and code that does must leave the context first.) Calls the
cache cannot serve exactly (a KV cache, ``inputs_embeds``, explicit positions, a mask that is not one
contiguous run per row, a hook on a module outside blocks L..end, or inside :meth:`bypassed`) run the
full model unchanged.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .artifacts import SuffixReport
from .layers import find_blocks

#: default bound of the residuals kept in memory (bytes): least recently used rows are dropped past it
DEFAULT_MAX_BYTES = 2 << 30


class _Stop(Exception):
    """Raised at block L's input: the prefix forward needs nothing above it."""


class SuffixExecution:
    """Run ``model``'s base model from block ``block`` on, for sequences whose residual stream entering
    that block is known (see the module docstring).

    Args:
        model: a causal LM whose blocks :func:`gradcouple.layers.find_blocks` finds.
        block: L, the lowest block whose weights may change inside the context (0: nothing to save,
            every call runs whole).
        max_bytes: bound on the residuals kept (float32, ``n_tokens * d * 4`` bytes per row), in bytes.

    The residuals are float32 on the model's device; a bfloat16 or float16 model gets them back in its
    dtype exactly (they were that dtype before). Use as ``with SuffixExecution(model, L) as sx: ...``;
    ``sx.stats`` counts what it did.

    Raises:
        ModelError: the model's blocks cannot be found.
    """

    def __init__(self, model: nn.Module, block: int, max_bytes: int = DEFAULT_MAX_BYTES):
        self.model = model
        self.base = model.base_model
        self.blocks = find_blocks(model)[1]
        self.block = max(0, min(int(block), len(self.blocks)))
        self.max_bytes = int(max_bytes)
        self.stats = SuffixReport(from_block=self.block or None)
        self._rows: OrderedDict[tuple[int, bytes], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._out_len: Optional[int] = None  # lower blocks' output: None unknown, 0 a tensor, n a tuple of n
        suffix = {id(p) for b in self.blocks[self.block:] for p in b.parameters()}
        self._frozen = [p for p in model.parameters() if id(p) not in suffix]
        self._versions = self._read_versions()
        above = {id(m) for b in self.blocks[self.block:] for m in b.modules()}
        # modules whose hooks the stored residual would skip: all but the suffix blocks and the base model itself
        self._lower_modules = [m for m in self.base.modules() if id(m) not in above and m is not self.base]
        self._orig = None
        self._saved = None
        self._depth = 0
        self._bypass = 0

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "SuffixExecution":
        """Serve the base model's calls from block L (re-entrant: an inner ``with`` keeps the residuals)."""
        if self._depth == 0 and self.block > 0:
            self._orig, self._saved = self.base.forward, vars(self.base).get("forward")
            self.base.forward = self._forward
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            if self._orig is not None:
                _put_forward(self.base, self._saved)
                self._orig = None
            self.clear()

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        """Run every call whole inside this block and keep no residual: for one-off passes over text that is
        never scored again (the key covariance's Wikipedia tokens)."""
        self._bypass += 1
        try:
            yield
        finally:
            self._bypass -= 1

    def clear(self) -> None:
        """Forget every stored residual."""
        self._rows.clear()
        self._bytes = 0

    @property
    def n_bytes(self) -> int:
        """Bytes of residuals held now."""
        return self._bytes

    # ------------------------------------------------------------------ internals
    def _read_versions(self) -> list[int]:
        return [p._version for p in self._frozen]

    def _servable(self, input_ids, kw: dict[str, Any]) -> bool:
        if self._bypass or input_ids is None or kw.get("use_cache", True) is not False:
            return False
        if any(kw.get(k) is not None for k in ("inputs_embeds", "position_ids", "past_key_values", "cache",
                                               "cache_position", "token_type_ids")):
            return False
        # a hook below L (a key captured at a lower layer, a hook on the embeddings) must see the real forward
        return not any(m._forward_hooks or m._forward_pre_hooks for m in self._lower_modules)

    def _layout(self, input_ids: torch.Tensor, mask: torch.Tensor) -> Optional[list[tuple[int, int, bytes]]]:
        """Per row (start, length, key bytes) of its one contiguous run of real tokens; None otherwise."""
        out = []
        m = mask.bool().cpu()
        ids = input_ids.cpu()
        for b in range(ids.shape[0]):
            real = m[b].nonzero()[:, 0]
            if real.numel() == 0:
                return None
            s, n = int(real[0]), int(real.numel())
            if int(real[-1]) - s + 1 != n:
                return None
            out.append((s, n, ids[b, s:s + n].numpy().tobytes()))
        return out

    def _prefix(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The residual entering block L for rows ``input_ids`` (B, T): (B, T, d) float32, one forward that stops there."""
        got: dict[str, Any] = {}

        def at_block(m, args, kwargs):
            got["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
            raise _Stop

        def out_format(m, args, out):
            self._out_len = len(out) if isinstance(out, tuple) else 0

        handles = [self.blocks[self.block].register_forward_pre_hook(at_block, with_kwargs=True)]
        if self._out_len is None:
            handles.append(self.blocks[0].register_forward_hook(out_format))
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                (self._orig or self.base.forward)(input_ids=input_ids, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        self.stats.prefix_seconds += time.perf_counter() - t0
        self.stats.prefix_tokens += int(mask.sum())
        return got["h"].float()

    def _store(self, key: tuple[int, bytes], h: torch.Tensor) -> None:
        self._rows[key] = h
        self._bytes += h.numel() * h.element_size()
        while self._bytes > self.max_bytes and len(self._rows) > 1:
            _, old = self._rows.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
            self.stats.evicted += 1

    def residual(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The residual stream entering block L for a batch, from memory or computed now: (B, T, d) in
        the model's dtype on its device, zero at padded positions; None when the mask is not one
        contiguous run of real tokens per row."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        layout = self._layout(input_ids, mask)
        if layout is None:
            return None
        versions = self._read_versions()
        if versions != self._versions:
            self.clear()
            self._versions = versions
            self.stats.invalidated += 1
        keys = [(s, key) for s, _, key in layout]
        missing = [b for b, k in enumerate(keys) if k not in self._rows]
        if missing:
            sel = torch.tensor(missing, device=input_ids.device)
            h = self._prefix(input_ids[sel], mask[sel])
            for j, b in enumerate(missing):
                s, n, _ = layout[b]
                self._store(keys[b], h[j, s:s + n].clone())
        self.stats.rows_computed += len(missing)
        self.stats.rows_reused += len(keys) - len(missing)
        dtype = next(self.base.parameters()).dtype
        d = next(iter(self._rows.values())).shape[-1]
        out = torch.zeros(*input_ids.shape, d, dtype=dtype, device=input_ids.device)
        for b, (s, n, _) in enumerate(layout):
            row = self._rows.get(keys[b])
            if row is None:  # evicted by this very batch (a bound smaller than one batch): computed again
                row = self._prefix(input_ids[b:b + 1], mask[b:b + 1])[0, s:s + n]
            else:
                self._rows.move_to_end(keys[b])
            out[b, s:s + n] = row.to(dtype)
        return out

    def _forward(self, input_ids=None, attention_mask=None, **kw):
        if not self._servable(input_ids, kw):
            self.stats.full_calls += 1
            return self._orig(input_ids=input_ids, attention_mask=attention_mask, **kw)
        hidden = self.residual(input_ids, attention_mask)
        if hidden is None or self._out_len is None:
            self.stats.full_calls += 1
            return self._orig(input_ids=input_ids, attention_mask=attention_mask, **kw)
        self.stats.suffix_calls += 1
        n_out = self._out_len

        def skip(*args, **kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            return (h, *([None] * (n_out - 1))) if n_out else h

        def enter(m, args, kwargs):
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        lower = list(self.blocks[:self.block])
        saved = [vars(b).get("forward") for b in lower]  # accelerate's device-map hooks live there
        handle = None
        try:
            for b in lower:
                b.forward = skip
            if self.block < len(self.blocks):  # first, so a pre-hook already on block L sees the residual too
                handle = self.blocks[self.block].register_forward_pre_hook(enter, with_kwargs=True, prepend=True)
            return self._orig(input_ids=input_ids, attention_mask=attention_mask, **kw)
        finally:
            for b, f in zip(lower, saved):
                _put_forward(b, f)
            if handle is not None:
                handle.remove()


def _put_forward(module: nn.Module, forward) -> None:
    """Give ``module`` back the instance ``forward`` it had (None: its class's)."""
    if forward is None:
        vars(module).pop("forward", None)
    else:
        module.forward = forward


def lowest_block(targets) -> Optional[int]:
    """The lowest block among ``targets`` (:class:`~gradcouple.layers.Target`), None when one has no block
    (chosen by a module regex outside the blocks): then nothing below it is known to stay unchanged."""
    blocks = [t.block for t in targets]
    return None if not blocks or any(b is None for b in blocks) else min(blocks)


def suffix_execution(model: nn.Module, block: Optional[int], enabled: bool = True,
                     max_bytes: int = DEFAULT_MAX_BYTES) -> "SuffixExecution | _Whole":
    """:class:`SuffixExecution` from ``block``, or, when ``block`` is None or ``enabled`` is False, a context
    that runs the model whole (same interface, ``stats`` counting nothing)."""
    if block is None or not enabled or block <= 0:
        return _Whole()
    return SuffixExecution(model, block, max_bytes)


class _Whole:
    """The full-model path with :class:`SuffixExecution`'s interface."""

    block = 0

    def __init__(self):
        self.stats = SuffixReport()

    def __enter__(self) -> "_Whole":
        return self

    def __exit__(self, *exc) -> None:
        return None


__all__ = ["DEFAULT_MAX_BYTES", "SuffixExecution", "lowest_block", "suffix_execution"]
