"""The one exception type users see for bad input or configuration.

Every check that rejects user input raises :class:`FreeALError` with a message that names the
file, the row and the problem, so the CLI can print it as one line instead of a traceback.
"""

from __future__ import annotations


class FreeALError(ValueError):
    """Bad input, configuration or environment, explained in one sentence.

    The message is kept on one line (a parser's multi-line text folded in), so a CLI error, a log
    line or a pipeline's error field shows all of it."""

    def __init__(self, message: object = "") -> None:
        super().__init__(" ".join(str(message).split()))
