"""The terms text syntax: parsing, error positions, and parse(format(t)) == t."""

from __future__ import annotations

import pytest

from gcfg_core.syntax import TermSyntaxError, format_terms, parse_terms
from gcfg_core.terms import GuidanceTerm, StepWindow


def test_parses_weights_models_windows_and_prompts():
    text = """
# decoupled prompt
+4 in Van Gogh style
-2 @prior {0-0.5} blurry, lowres
  +2.5 @concept
-1.5 @myModel_v2.safetensors {0.25-1} (masterpiece:1.2), [cat:dog:0.5] AND tree
"""
    assert parse_terms(text) == (
        GuidanceTerm("main", "in Van Gogh style", 4.0),
        GuidanceTerm("prior", "blurry, lowres", -2.0, StepWindow(0.0, 0.5)),
        GuidanceTerm("concept", None, 2.5),
        GuidanceTerm("myModel_v2.safetensors", "(masterpiece:1.2), [cat:dog:0.5] AND tree", -1.5,
                     StepWindow(0.25, 1.0)),
    )


def test_prompt_is_passed_through_untouched():
    prompt = "(a:1.3) [b|c] {red|blue} #ff0000 <lora:x:0.5>, BREAK  end"
    assert parse_terms(f"+1 {prompt}") == (GuidanceTerm("main", prompt, 1.0),)


def test_empty_prompt_is_the_empty_prompt_except_for_concept():
    assert parse_terms("-1\n+1 @CONCEPT") == (GuidanceTerm("main", "", -1.0), GuidanceTerm("concept", None, 1.0))


@pytest.mark.parametrize(("text", "line", "column", "expected", "found"), [
    ("+1 ok\n\n  abc def", 3, 3, "a signed weight such as +4 or -1.5", "abc"),
    ("4 cats", 1, 1, "a signed weight such as +4 or -1.5", "4"),
    ("+4cats", 1, 1, "a signed weight such as +4 or -1.5", "+4cats"),
    ("+1 @ cat", 1, 5, "a model name after '@'", ""),
    ("+1 @main {0.5} cat", 1, 10, "a step window such as {0-0.5}", "{0.5}"),
    ("+1 {0.6-0.2} cat", 1, 4, "a step window such as {0-0.5}", "{0.6-0.2}"),
    ("+1 {0-0.5}cat", 1, 11, "a space before the prompt", "cat"),
])
def test_errors_name_line_column_and_what_was_expected(text, line, column, expected, found):
    with pytest.raises(TermSyntaxError) as caught:
        parse_terms(text)
    error = caught.value
    assert (error.line, error.column, error.found) == (line, column, found)
    assert error.expected.startswith(expected)
    assert str(error).startswith(f"line {line}, column {column}: expected {expected}")


def test_error_message_format():
    with pytest.raises(TermSyntaxError, match=r"^line 3, column 7: expected a signed weight such as \+4 or -1\.5, "
                                              r"found 'abc'$"):
        parse_terms("# c\n\n      abc")


@pytest.mark.parametrize("term", [
    GuidanceTerm("main", "in Van Gogh style", 4.0),
    GuidanceTerm("main", "", -1.0),
    GuidanceTerm("prior", "blurry, lowres", -2.0, StepWindow(0.0, 0.5)),
    GuidanceTerm("concept", None, 2.5, StepWindow(0.1, 0.9)),
    GuidanceTerm("main", "@not a tag", 0.1),
    GuidanceTerm("main", "{0-0.5} braces first", 1e-20),
    GuidanceTerm("ckpt.safetensors", "x: (y:1.1), [a:b:3]", -12.345678901234),
    GuidanceTerm("main", "# not a comment", 0.0),
])
def test_parse_of_format_is_identity(term):
    assert parse_terms(format_terms([term])) == (term,)


def test_format_rejects_what_the_syntax_cannot_hold():
    for term in (GuidanceTerm("main", "two\nlines", 1.0), GuidanceTerm("main", " padded", 1.0),
                 GuidanceTerm("main", None, 1.0), GuidanceTerm("my model", "x", 1.0)):
        with pytest.raises(ValueError, match="cannot be written"):
            format_terms([term])


@pytest.mark.parametrize(("text", "message"), [
    ("+1e30 a dog", "line 1, column 1: weight 1e+30 is outside [-30, 30]"),
    ("+1 ok\n  -30.5 b", "line 2, column 3: weight -30.5 is outside [-30, 30]"),
])
def test_weights_beyond_the_range_are_refused_with_the_settings_message(text, message):
    with pytest.raises(TermSyntaxError) as caught:
        parse_terms(text)
    assert str(caught.value) == message
    assert parse_terms("+30 a\n-30 b")[1].weight == -30.0  # the bounds themselves are fine


def test_a_broken_window_is_prompt_text_with_a_warning_naming_its_column():
    from gcfg_core.syntax import term_warnings

    assert parse_terms("+1 {0.5- dog") == (GuidanceTerm("main", "{0.5- dog", 1.0),)
    (warning,) = term_warnings("# c\n+1 {0.5- dog")
    assert (warning.line, warning.column) == (2, 4)
    assert str(warning).startswith("line 2, column 4: '{0.5-' starts like a step window but is not one")
    assert term_warnings("+1 {red|blue} dog\n+1 {0-0.5} ok\n+1 plain") == ()
