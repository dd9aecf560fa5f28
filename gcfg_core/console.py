"""The command lines' stdout without the `ldm` code's build messages (shown with --verbose).

`ldm` (the Stability/CompVis model code the WebUI ships) `print`s while it is imported and while it builds models:
"No module 'xformers'. Proceeding without it.", "making attention of type 'vanilla' with 512 in_channels",
"Working with z of shape (1, 4, 32, 32) = 4096 dimensions." — every command would open with them. The command
lines run with stdout behind `ChatterFilter`, which drops exactly those lines (known patterns, whole lines) and
passes everything else through unchanged. Only the command lines use it: a library must not replace `sys.stdout`
inside the WebUI's process, where other threads print too.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Iterator
from typing import TextIO

LDM_CHATTER = re.compile(
    r"^(No module 'xformers'\. Proceeding without it\."
    r"|making attention of type '[\w-]+'( with \d+ in_channels)?"
    r"|Working with z of shape \(.*\) = \d+ dimensions\."
    r"|building MemoryEfficientAttnBlock with \d+ in_channels\.\.\."
    r"|Setting up \w+\. Query dim is \d+, context_dim is \w+ and using \d+ heads.*)\s*$")


def is_chatter(line: str) -> bool:
    return bool(LDM_CHATTER.match(line))


class ChatterFilter(io.TextIOBase):
    """A text stream that forwards whole lines to `target`, except `ldm` build messages (unless `keep`)."""

    def __init__(self, target: TextIO, *, keep: bool = False):
        super().__init__()
        self.target, self.keep = target, keep
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if self.keep or not is_chatter(line):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending and (self.keep or not is_chatter(self._pending)):
            self.target.write(self._pending)
        self._pending = ""
        self.target.flush()

    def isatty(self) -> bool:
        return self.target.isatty()


@contextlib.contextmanager
def ldm_chatter_filtered(*, verbose: bool = False, target: TextIO | None = None) -> Iterator[ChatterFilter]:
    """Run a command with `sys.stdout` behind a `ChatterFilter` (to `target`, default the current stdout)."""
    stream = ChatterFilter(target if target is not None else sys.stdout, keep=verbose)
    try:
        with contextlib.redirect_stdout(stream):
            yield stream
    finally:
        stream.flush()
