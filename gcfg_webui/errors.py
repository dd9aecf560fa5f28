"""Errors the glue raises; over the API they become a 422 whose detail names the bad argument."""

from __future__ import annotations


class GCFGRequestError(ValueError):
    """Bad GCFG input or an unsupported setup, named by `argument`.

    The WebUI's API error handler reads `status_code` and `detail` from the exception's attributes
    (`modules/api/api.py` handle_exception), so raising this on the sampling path gives the client a 422.
    """

    def __init__(self, argument: str, message: str) -> None:
        self.argument = argument
        self.status_code = 422
        self.detail = f"GCFG {argument}: {message}"
        super().__init__(self.detail)
