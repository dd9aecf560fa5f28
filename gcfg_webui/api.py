"""REST routes under /gcfg/v1/ for the guidance side: model lists, term validation, freeing the model cache, the
last run's statistics. Who may call them is decided by gcfg_webui.access (the WebUI's --api / --api-auth rules;
freeing models is a state change).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI
from pydantic import BaseModel

from gcfg_core.syntax import TermSyntaxError, format_terms, parse_terms, term_warnings
from gcfg_webui import access

logger = logging.getLogger("gcfg.api")

PREFIX = "/gcfg/v1"
class TermsRequest(BaseModel):
    terms: str


def validate_terms(text: str) -> dict:
    """The body of POST /gcfg/v1/terms/validate: the parsed terms or the syntax error's position, and warnings
    for lines that parse but look like typos (a broken step window)."""
    try:
        terms = parse_terms(text)
    except TermSyntaxError as error:
        return {"valid": False, "error": {"line": error.line, "column": error.column, "expected": error.expected,
                                          "message": str(error)}, "warnings": []}
    warnings = [{"line": warning.line, "column": warning.column, "message": str(warning)}
                for warning in term_warnings(text)]
    return {"valid": True, "error": None, "warnings": warnings, "normalised": format_terms(terms),
            "terms": [{"weight": term.weight, "model": term.model, "prompt": term.cond,
                       "window": None if term.window is None else [term.window.start, term.window.end]}
                      for term in terms]}


def add_routes(app: FastAPI, policy: access.AccessPolicy, *, priors: Callable[[], list[str]],
               concepts: Callable[[], list[str]], free_models: Callable[[], int],
               last_run: Callable[[], dict]) -> None:
    """Register the routes on `app` as `policy` allows (none without --api)."""

    def list_priors() -> dict:
        return {"priors": ["None", *priors()]}

    def list_concepts() -> dict:
        return {"concepts": ["None", *concepts()]}

    def validate(request: TermsRequest) -> dict:
        return validate_terms(request.terms)

    def free() -> dict:
        return {"freed": free_models()}

    def stats() -> dict:
        return last_run()

    access.add_routes(app, policy, [
        (PREFIX + "/priors", list_priors, ["GET"], False),
        (PREFIX + "/concepts", list_concepts, ["GET"], False),
        (PREFIX + "/terms/validate", validate, ["POST"], False),  # reads nothing, changes nothing
        (PREFIX + "/models/free", free, ["POST"], True),
        (PREFIX + "/last-run", stats, ["GET"], False),
    ])
    access.log_policy_once(policy)
