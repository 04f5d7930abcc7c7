"""The one exception type users see for bad input or configuration.

Every check that rejects user input raises :class:`FreeALError` with a message that names the
file, the row and the problem, so the CLI can print it as one line instead of a traceback.
"""

from __future__ import annotations


class FreeALError(ValueError):
    """Bad input, configuration or environment, explained in one sentence."""
