"""Condition decoupling (paper §4.4): split a prompt into independent weighted terms."""

from __future__ import annotations

from gcfg_core.syntax import format_number


def decouple_prompt(prompt: str, weight: float) -> tuple[str, str]:
    """Keep the prompt's first comma-separated part as the prompt; the others become `+weight part` term lines."""
    parts = [part.strip() for part in prompt.split(",")]
    parts = [part for part in parts if part]
    if len(parts) < 2:
        return prompt, ""
    sign = "-" if weight < 0 else "+"
    lines = [f"{sign}{format_number(abs(weight))} {part}" for part in parts[1:]]
    return parts[0], "\n".join(lines)


def merge_terms(existing: str, added: str) -> str:
    if not added:
        return existing
    return f"{existing.rstrip()}\n{added}" if existing.strip() else added
