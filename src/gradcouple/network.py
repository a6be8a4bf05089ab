"""Is the network there? The one place gradcouple probes it, for datasets and models alike.

The Hugging Face libraries retry an unreachable host for minutes; a stage that needs the Hub
asks here first and fails within seconds, saying what to do offline.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

#: seconds a probe waits for a TCP connection (DNS included)
PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


def env_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) asks for offline mode."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds (DNS included)."""
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


__all__ = ["PROBE_TIMEOUT_S", "env_offline", "reachable"]
