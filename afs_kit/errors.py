"""The kit's exception and warning types: the command line maps each error to its exit code by type, never by
message text; a finding the kit reports and goes on from is one `AfsKitWarning` line.

Each subclasses the built-in a caller would catch without knowing the kit (`BadInput` is a ValueError,
`RunInUse` a RuntimeError), so `except ValueError` in users' code keeps working."""
import warnings


class AfsKitError(Exception):
    """An error the kit raises on purpose, with a message that names the argument and the value."""

    exit_code = 2  # the command line's exit status for it (argparse's for a usage error)


class BadInput(AfsKitError, ValueError):
    """An argument, setting, file or data set the kit cannot use."""


class CheckpointMismatch(BadInput):
    """A checkpoint that is damaged, foreign, of another format, or made for other settings or data."""


class RunInUse(AfsKitError, RuntimeError):
    """Another process or object holds the run directory's writer lock."""


class AfsKitWarning(RuntimeWarning):
    """A finding the kit reports and keeps going (a failed masking check, an unhealthy training, a merger below
    its floor): shown as one line, without a source path (`warn`)."""


def warn(message: str) -> None:
    """Warn once per call in one line, `afs-kit: AfsKitWarning: ...`: the finding is about the user's model,
    not about the kit's source line, so none is shown (`warnings.warn` would print a path and a line of code)."""
    warnings.warn_explicit(message, AfsKitWarning, filename="afs-kit", lineno=0, module="afs_kit")
