"""The one error type that data loading shows to users."""
from __future__ import annotations


class DataError(ValueError):
    """A problem with the user's data; ``str()`` is one line naming the culprit (file, key or value).

    The CLI prints it as a single line on stderr and exits with code 2, so any newline in the
    message (e.g. from a decoder's exception text) is folded into a space here, at the source.
    """

    def __init__(self, message: object) -> None:
        text = str(message)
        if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep our line
            text = text.strip().splitlines()[-1].split("DataError: ", 1)[-1]
        one_line = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
        super().__init__(one_line)
