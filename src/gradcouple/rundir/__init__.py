"""The run directory: every path of a run, loading and saving each artifact, the one freshness
rule and the lock. One module per family of files (see :mod:`.layout` for the whole layout)."""

from .freshness import INPUT_LABELS, stale_inputs
from .journal import EditJournal
from .layout import RunDir, default_run_dir
from .lock import locked
from .ripple import RippleResults

__all__ = ["RunDir", "EditJournal", "RippleResults", "INPUT_LABELS", "default_run_dir", "locked", "stale_inputs"]
