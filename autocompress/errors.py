"""One exception type for every user-facing failure.

The CLI prints ``str(error)`` as a single line and exits non-zero; library users catch it.
Messages say what is wrong and what to do about it.
"""


class AutocompressError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2
