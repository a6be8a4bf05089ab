"""Edit methods, one registered class per module: ``ft`` (fine-tuning, FT-L with --max-delta) and
``rome`` (a simplified ROME). :func:`edited` applies one and restores the weights bit for bit."""

from . import ft, rome  # noqa: F401  (each registers its method)
from .base import (
                   ALIASES,
                   METHODS,
                   EditContext,
                   EditMethod,
                   Hparams,
                   Rewrite,
                   edit_norm,
                   edited,
                   method_class,
                   register_method,
                   restore,
                   restored,
                   snapshot,
                   zero_delta,
)
from .ft import ft_edit
from .rome import rome_edit

__all__ = ["ALIASES", "METHODS", "EditContext", "EditMethod", "Hparams", "Rewrite", "edit_norm", "edited", "ft_edit",
           "method_class", "register_method", "restore", "restored", "rome_edit", "snapshot", "zero_delta"]
