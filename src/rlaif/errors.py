"""The one exception type for user mistakes: the CLI prints it as one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (file, field, key, model), reported without a traceback.

    The message should name the file and the line or field, and say what was expected.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()) if "\n" in message else message)


class TrainingDiverged(UserError):
    """A NaN or inf in a loss or gradient: the run stops, the last good checkpoint is kept."""

    exit_code = 3
