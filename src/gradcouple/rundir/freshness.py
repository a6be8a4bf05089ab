"""The one freshness rule: an artifact is current when the fingerprints of its inputs, recorded
when it was made, equal the current ones. Every stage asks here, never compares hashes itself."""

from __future__ import annotations

from typing import Optional

from ..artifacts import Inputs

#: what each input fingerprint stands for, in messages
INPUT_LABELS = {"pieces": "pieces file (sha256)", "config": "settings (config hash)", "model": "model weights (fingerprint)",
                "gradients": "gradients (manifest fingerprint)", "coupling": "coupling matrix (sha256)",
                "method": "edit method and its knobs"}


def stale_inputs(recorded: Inputs, current: Inputs) -> list[str]:
    """Every input whose recorded fingerprint differs from the current one.

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


__all__ = ["INPUT_LABELS", "stale_inputs"]
