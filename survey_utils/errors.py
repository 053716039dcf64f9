"""The one error type users see.

Bad input (rank 0, a target module the model lacks, an unknown model name, a corrupt data file, a prompt
longer than the context) raises :class:`SurveyError` with a one-line message that names the bad value.
The CLI prints it and exits 2; widgets show it in their message area instead of a traceback.
"""

from __future__ import annotations


class SurveyError(ValueError):
    """A user-facing error whose message is one line naming the bad value."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def closest(name: str, choices: list[str] | tuple[str, ...], limit: int = 12) -> str:
    """Format ``choices`` for an error message, nearest matches to ``name`` first."""
    import difflib

    near = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    rest = [c for c in choices if c not in near]
    shown = near + rest
    more = f", ... ({len(shown) - limit} more)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more
