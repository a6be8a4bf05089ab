"""Edit methods, one registered class per module: ``ft`` (fine-tuning of every target layer),
``ft-l`` (FT-L), ``rome`` (ROME), ``memit`` (MEMIT) and ``alphaedit`` (AlphaEdit), the last four
as their reference code does them. :func:`edited` applies one and restores the weights bit for bit."""

from . import alphaedit, ft, ft_l, memit, rome  # noqa: F401  (each registers its method)
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

__all__ = ["ALIASES", "METHODS", "EditContext", "EditMethod", "Hparams", "Rewrite", "edit_norm", "edited", "ft_edit",
           "method_class", "register_method", "restore", "restored", "snapshot", "zero_delta"]
