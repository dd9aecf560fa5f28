"""The text syntax of extra GCFG terms, one term per line (the "terms" box, ``--term``, infotext).

Grammar (``[...]`` optional, blanks are spaces or tabs)::

    line    := <weight> [ "@"<model> ] [ "{"<start>"-"<end>"}" ] <prompt>
    weight  := a number with an explicit sign: +4, -1.5, +0.25, -2e-1, within [-30, 30]
    model   := prior | main | concept | any checkpoint name without blanks      (default: main)
    window  := fractions of the schedule, 0 ≤ start < end ≤ 1: {0-0.5}, {0.25-1}  (default: every step)
    prompt  := the rest of the line, passed through untouched (WebUI attention/editing syntax
               such as (word:1.2), [a:b:0.5] and AND included); may be empty

Examples::

    +4 in Van Gogh style
    -2 @prior {0-0.5} blurry, lowres
    +2.5 @concept

* Step window: step ``i`` of ``n`` is active iff ``start ≤ i/n < end`` (see `gcfg_core.terms.StepWindow`).
  Braces were chosen because WebUI prompts use ``[...]`` and ``(...)``; a token is read as a window only if it
  is ``{...}`` holding nothing but digits, ``.``, ``-`` and blanks, so a Dynamic-Prompts ``{red|blue}`` stays
  prompt text.
* An empty prompt means the model's prediction for the empty prompt, except for ``@concept``, where it means
  no text at all (``cond=None``: the concept model is text-free).
* ``#`` starts a comment only as the first non-blank character of a line: inside a prompt it is text
  (``#1``, ``#ff0000``). Blank lines are ignored. The prompt's trailing blanks are dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from gcfg_core.terms import GuidanceTerm, ModelSlot, StepWindow, weight_range_problem

_WEIGHT = re.compile(r"[+-](?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NUMBER = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_WINDOW_LIKE = re.compile(r"\{[\d.\-\s]*\}")
_WINDOW = re.compile(rf"\{{\s*({_NUMBER.pattern})\s*-\s*({_NUMBER.pattern})\s*\}}")
_BLANKS = " \t"

EXPECTED_WEIGHT = "a signed weight such as +4 or -1.5"
EXPECTED_MODEL = "a model name after '@' (prior, main, concept or a checkpoint name)"
EXPECTED_WINDOW = "a step window such as {0-0.5} (fractions with 0 ≤ start < end ≤ 1)"
EXPECTED_BLANK = "a space before the prompt"


class TermSyntaxError(ValueError):
    """A terms line that does not parse; `line` and `column` are 1-based."""

    def __init__(self, line: int, column: int, expected: str, found: str, problem: str | None = None) -> None:
        self.line = line
        self.column = column
        self.expected = expected
        self.found = found
        found_text = f"found {found!r}" if found else "found the end of the line"
        super().__init__(f"line {line}, column {column}: {problem or f'expected {expected}, {found_text}'}")


@dataclass(frozen=True)
class TermWarning:
    """Something in a terms line that parses but is almost certainly a typo; `line` and `column` are 1-based."""

    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}: {self.message}"


def _token_at(text: str, start: int) -> str:
    end = start
    while end < len(text) and text[end] not in _BLANKS:
        end += 1
    return text[start:end]


def _skip_blanks(text: str, start: int) -> int:
    while start < len(text) and text[start] in _BLANKS:
        start += 1
    return start


def _parse_line(text: str, line_number: int) -> GuidanceTerm:
    position = _skip_blanks(text, 0)

    def fail(expected: str, at: int, found: str | None = None) -> TermSyntaxError:
        return TermSyntaxError(line_number, at + 1, expected, _token_at(text, at) if found is None else found)

    weight_match = _WEIGHT.match(text, position)
    if weight_match is None or (weight_match.end() < len(text) and text[weight_match.end()] not in _BLANKS):
        raise fail(EXPECTED_WEIGHT, position)
    weight = float(weight_match.group())
    if not math.isfinite(weight):
        raise fail(EXPECTED_WEIGHT, position)
    problem = weight_range_problem(weight)
    if problem is not None:
        raise TermSyntaxError(line_number, position + 1, EXPECTED_WEIGHT, weight_match.group(),
                              f"weight {problem}")
    position = _skip_blanks(text, weight_match.end())

    model = ModelSlot.MAIN.value
    if text.startswith("@", position):
        name = _token_at(text, position + 1)
        if not name:
            raise fail(EXPECTED_MODEL, position + 1)
        slot_names = {slot.value for slot in ModelSlot}
        model = name.lower() if name.lower() in slot_names else name
        position = _skip_blanks(text, position + 1 + len(name))

    window = None
    window_like = _WINDOW_LIKE.match(text, position)
    if window_like is not None:
        window_match = _WINDOW.fullmatch(window_like.group())
        if window_match is None:
            raise fail(EXPECTED_WINDOW, position, window_like.group())
        try:
            window = StepWindow(float(window_match.group(1)), float(window_match.group(2)))
        except ValueError:
            raise fail(EXPECTED_WINDOW, position, window_like.group()) from None
        after = window_like.end()
        if after < len(text) and text[after] not in _BLANKS:
            raise fail(EXPECTED_BLANK, after)
        position = _skip_blanks(text, after)

    prompt = text[position:].rstrip(_BLANKS)
    cond = None if model == ModelSlot.CONCEPT.value and not prompt else prompt
    return GuidanceTerm(model, cond, weight, window)


def _term_lines(text: str):
    """(1-based line number, line) of every line that holds a term: blank and comment lines left out."""
    for line_number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip(_BLANKS + "\r")
        if stripped and not stripped.startswith("#"):
            yield line_number, line.rstrip("\r")


def parse_terms(text: str) -> tuple[GuidanceTerm, ...]:
    """Parse the terms box (grammar in the module docstring); raise `TermSyntaxError` naming line and column."""
    return tuple(_parse_line(line, line_number) for line_number, line in _term_lines(text))


# A prompt starting like a window: "{" and a number, e.g. "{0.5- dog" or "{0.5-1 dog" (the brace never closed).
_BROKEN_WINDOW = re.compile(r"\{\s*[\d.]")


def term_warnings(text: str) -> tuple[TermWarning, ...]:
    """Lines that parse but look like typos: a prompt that starts like a step window that is not one."""
    warnings = []
    for line_number, line in _term_lines(text):
        try:
            term = _parse_line(line, line_number)
        except TermSyntaxError:
            continue  # reported as an error instead
        prompt = term.cond or ""
        if term.window is None and _BROKEN_WINDOW.match(prompt):
            column = line.index(prompt) + 1
            warnings.append(TermWarning(line_number, column, f"{_token_at(prompt, 0)!r} starts like a step window "
                                        "but is not one, so it is read as prompt text; write {start-end}, "
                                        "e.g. {0.5-1}"))
    return tuple(warnings)


def format_number(value: float) -> str:
    """Shortest text that reads back as exactly `value` (integers without a decimal point)."""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _representable_problem(term: GuidanceTerm) -> str | None:
    if any(blank in term.model for blank in _BLANKS) or "\n" in term.model:
        return "the model name contains a blank"
    is_concept = term.model == ModelSlot.CONCEPT.value
    if term.cond is None:
        return None if is_concept else "only @concept terms can be text-free (cond None)"
    if is_concept and not term.cond:
        return "an empty @concept prompt reads back as text-free (cond None)"
    if "\n" in term.cond or "\r" in term.cond:
        return "the prompt contains a line break"
    if term.cond != term.cond.strip(_BLANKS):
        return "the prompt starts or ends with a blank"
    return None


def format_term(term: GuidanceTerm) -> str:
    """One line of the terms syntax for `term`, such that ``parse_terms(format_term(t)) == (t,)`` (labels aside)."""
    problem = _representable_problem(term)
    if problem is not None:
        raise ValueError(f"term {term!r} cannot be written in the terms syntax: {problem}")
    prompt = term.cond or ""
    weight = format_number(term.weight)
    parts = [weight if weight.startswith("-") else "+" + weight]
    if term.model != ModelSlot.MAIN.value or prompt.startswith("@"):
        parts.append("@" + term.model)
    window = term.window
    if window is None and _WINDOW_LIKE.match(prompt):
        window = StepWindow()  # spelled out so that the prompt's own leading {..} is not read as a window
    if window is not None:
        parts.append(f"{{{format_number(window.start)}-{format_number(window.end)}}}")
    if prompt:
        parts.append(prompt)
    return " ".join(parts)


def format_terms(terms: Iterable[GuidanceTerm]) -> str:
    """The terms box text for `terms`, one line each (inverse of `parse_terms`)."""
    return "\n".join(format_term(term) for term in terms)
