"""Stage modules that can be called: ``gradcouple.extract(...)`` runs the notebook API's
:func:`gradcouple.api.extract` although ``gradcouple.extract`` is also the stage's module (Python
binds a package attribute to a submodule once it is imported, so a function of the same name
could not stay reachable)."""

from __future__ import annotations

import sys
import types


class _StageModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from . import api

        return getattr(api, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    """Let calling the module ``module_name`` call the API function of the same name."""
    sys.modules[module_name].__class__ = _StageModule
