"""The kit's exception types: the command line maps each to its exit code by type, never by message text.

Each subclasses the built-in a caller would catch without knowing the kit (`BadInput` is a ValueError,
`RunInUse` a RuntimeError), so `except ValueError` in users' code keeps working."""


class AfsKitError(Exception):
    """An error the kit raises on purpose, with a message that names the argument and the value."""

    exit_code = 2  # the command line's exit status for it (argparse's for a usage error)


class BadInput(AfsKitError, ValueError):
    """An argument, setting, file or data set the kit cannot use."""


class CheckpointMismatch(BadInput):
    """A checkpoint that is damaged, foreign, of another format, or made for other settings or data."""


class RunInUse(AfsKitError, RuntimeError):
    """Another process or object holds the run directory's writer lock."""
