"""A stderr that says it is a terminal, so a progress bar left to tqdm's default draws into it."""

from __future__ import annotations


class Terminal:
    """Collects what is written (``text``) and answers ``isatty()`` with True."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True
