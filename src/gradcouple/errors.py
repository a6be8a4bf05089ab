"""One exception family. Every message names the cause (file, line, field or flag) and the fix."""

from __future__ import annotations


class GradcoupleError(Exception):
    """Base class: the CLI prints ``str(err)`` as one red line and exits with ``exit_code``."""

    exit_code = 1


class DataError(GradcoupleError):
    """Bad or unreadable input data (a file, a line, a field)."""

    exit_code = 2


class ConfigError(GradcoupleError):
    """An invalid option, or artifacts made under an incompatible configuration."""

    exit_code = 2


class ModelError(GradcoupleError):
    """A model that cannot be found, loaded, or has no recognised target layers."""

    exit_code = 3


class NetworkError(GradcoupleError):
    """A download that needs the network while none is reachable."""

    exit_code = 4


class ResourceError(GradcoupleError):
    """Out of memory or out of disk space: the input is fine, the machine is not big enough as set up."""

    exit_code = 6


class ArtifactError(GradcoupleError):
    """A missing, corrupt or mismatched artifact (manifest, shard, matrix)."""

    exit_code = 5
