"""One exception hierarchy.  Each class also subclasses the builtin that fits, so
callers can catch ``ValueError`` / ``FileNotFoundError`` / ``RuntimeError`` as usual."""
from __future__ import annotations


class MpiCellposeError(Exception):
    """Base class of every error raised on purpose by mpicellpose."""


class ConfigError(MpiCellposeError, ValueError):
    """A user-supplied value is invalid (names the value and what was expected)."""


class InputError(MpiCellposeError, ValueError):
    """The input volume, mask or output location cannot be used."""


class InputNotFoundError(MpiCellposeError, FileNotFoundError):
    """The input or mask path does not exist."""


class OutputExistsError(MpiCellposeError, FileExistsError):
    """The output exists and was not made by this run (use overwrite)."""


class UnsafeOutputError(MpiCellposeError, ValueError):
    """The output (or work directory) would put the user's files at risk; nothing was written."""


class OutputInUseError(MpiCellposeError, RuntimeError):
    """Another run holds the output's lock."""


class ModelNotFoundError(MpiCellposeError, FileNotFoundError):
    """Model weights are missing and cannot be downloaded."""


class BackendError(MpiCellposeError, RuntimeError):
    """The segmentation backend failed on a block."""


class DependencyError(MpiCellposeError, ImportError):
    """An optional dependency is missing (message carries the install hint)."""


class ResumeMismatchError(MpiCellposeError, ValueError):
    """The work directory belongs to a run with another configuration."""


class DistributedError(MpiCellposeError, RuntimeError):
    """Raised on every rank when one or more ranks failed.

    Attributes
    ----------
    failures : list of (rank, message)
    """

    def __init__(self, message, failures=()):
        super().__init__(message)
        self.failures = list(failures)


class Interrupted(MpiCellposeError, RuntimeError):
    """The run was stopped by a signal (walltime); re-run the same command to resume."""


def needs(package: str, extra: str | None = None) -> DependencyError:
    """Build an install hint for a missing optional dependency."""
    hint = f"pip install 'mpicellpose[{extra}]'" if extra else f"pip install {package}"
    return DependencyError(f"{package} is required for this feature but is not installed; try: {hint}")


def agreed(exc: BaseException) -> BaseException:
    """Mark an exception that every rank of a run raises alike (after a collective decision).

    :func:`mpicellpose.runner.driver.run` ends the whole job (``MPI_Abort``) when an exception that
    is *not* marked leaves a multi-rank run: the other ranks would otherwise wait for ever.
    """
    exc.agreed = True
    return exc
