"""User-facing errors.

Anything raised as a :class:`UserError` is a mistake the user can fix (a bad key, a bad
path, a malformed row). The command-line entry points print its message as one line and
exit with status 2 instead of showing a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input; the message names the key, file, row or value."""

    exit_code = 2


class ConfigError(UserError):
    """A bad configuration key, type or value."""


class DataError(UserError):
    """A bad dataset, file or row, or data that leaves nothing to train on."""


class TrainingDivergedError(UserError):
    """The loss or the adapter stopped being finite; the last good checkpoint is kept."""

    exit_code = 3


class NonFiniteScoresError(UserError):
    """The base model gave a NaN/inf entropy or log-prob at scoring (a broken or overflowing model)."""

    exit_code = 3
