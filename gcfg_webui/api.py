"""REST routes under /gcfg/v1/, protected like the WebUI's own API routes (`--api-auth`, HTTP Basic).

The WebUI's `Api` object is not reachable from extensions, so its credential check is reimplemented: the
`--api-auth "user:pass,user2:pass2"` list, `secrets.compare_digest`, 401 with `WWW-Authenticate: Basic`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from secrets import compare_digest

from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel

from gcfg_core.syntax import TermSyntaxError, format_terms, parse_terms, term_warnings

logger = logging.getLogger("gcfg.api")

PREFIX = "/gcfg/v1"


def parse_credentials(api_auth: str | None) -> dict[str, str]:
    """`--api-auth` text to {user: password}, split as the WebUI splits it (",", then the first ":")."""
    credentials = {}
    for item in (api_auth or "").split(","):
        if item:
            user, _, password = item.partition(":")
            credentials[user] = password
    return credentials


_BASIC = HTTPBasic()


def auth_dependency(credentials: dict[str, str]) -> Callable:
    # FastAPI declares dependencies as parameter defaults.
    def check(given: HTTPBasicCredentials = Depends(_BASIC)) -> bool:  # noqa: B008
        expected = credentials.get(given.username)
        if expected is not None and compare_digest(given.password, expected):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return check


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


def add_routes(app: FastAPI, api_auth: str | None, *, priors: Callable[[], list[str]],
               concepts: Callable[[], list[str]], free_models: Callable[[], int],
               last_run: Callable[[], dict]) -> None:
    """Register the routes on `app`; every one requires the `--api-auth` credentials when they are set."""
    credentials = parse_credentials(api_auth)
    dependencies = [Depends(auth_dependency(credentials))] if credentials else []

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

    routes = (("/priors", list_priors, ["GET"]), ("/concepts", list_concepts, ["GET"]),
              ("/terms/validate", validate, ["POST"]), ("/models/free", free, ["POST"]),
              ("/last-run", stats, ["GET"]))
    for path, endpoint, methods in routes:
        app.add_api_route(PREFIX + path, endpoint, methods=methods, dependencies=dependencies)
    logger.info("GCFG: API routes under %s%s", PREFIX, " (with --api-auth)" if credentials else "")
