"""The one error type for what the user can fix or asked for, and its kinds.

main.py prints a UserError as one line (its message) and exits with its `exit_code`; every other exception
is a bug and keeps its traceback (as does every error with --debug).
"""


def first_line(err):
    """A short reason for a one-line error: the first line of `err`'s message, or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class UserError(Exception):
    """A mistake the user can fix (config, data, checkpoint, device, output folder), or a stop they asked for."""

    exit_code = 2


class ConfigError(UserError):
    """A config file, key or value, or a command-line argument, that cannot be used."""


class DataConfigError(ConfigError, ValueError):
    """A data set or its description is unusable; the message names the file, key or value at fault."""


class DeviceError(ConfigError, ValueError):
    """trainer.device names a device this machine does not have."""


class CheckpointError(UserError):
    """A checkpoint file that is missing, unreadable or does not fit the model."""


class OutputError(UserError, OSError):
    """An output location that cannot be written (missing permission, read-only, disk full)."""


class TrainingInterrupted(UserError):
    """SIGINT, SIGTERM or SIGUSR2 stopped training after checkpoint_latest.pt was saved; exit status 128 + signal."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum

    def __reduce__(self):  # pickled from a worker process: message and signal both
        return type(self), (str(self), self.exit_code - 128)


class NonFiniteTraining(UserError):
    """Too many non-finite steps in a row, or weights that are no longer finite; nothing was saved."""

    exit_code = 1
