"""Errors the glue raises; over the API they become a 422 whose detail names the bad argument."""

from __future__ import annotations

from fastapi import HTTPException


class GCFGRequestError(HTTPException, ValueError):
    """Bad GCFG input or an unsupported setup, named by `argument`.

    The WebUI's API error handler (`modules/api/api.py` handle_exception) answers with the exception's
    `status_code` and `detail`, and prints a traceback for everything that is not an `HTTPException`; being one
    keeps a user's bad input out of the server log as a crash. `str()` is the detail, as for a ValueError.
    """

    def __init__(self, argument: str, message: str) -> None:
        detail = f"GCFG {argument}: {message}"
        Exception.__init__(self, detail)  # starlette's HTTPException leaves args empty, so str() would be ""
        HTTPException.__init__(self, status_code=422, detail=detail)
        self.argument = argument

    def __str__(self) -> str:
        return self.detail
