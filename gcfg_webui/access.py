"""Who may call the /gcfg/v1 REST routes, derived from the WebUI's command-line flags.

    routes exist   only with --api or --nowebui, like the WebUI's own /sdapi routes (the tabs call Python, not
                   HTTP, so they work in every configuration)
    read routes    (lists, a job's status, log, plots, term validation) follow /sdapi: HTTP Basic with the
                   --api-auth credentials when that flag is set, open otherwise
    state changes  (create, stop, cancel, resume, delete a job; free the cached models) need HTTP Basic with the
                   --api-auth or the gradio-auth credentials (--gradio-auth, --gradio-auth-path) whenever any of
                   them is set; with none set they answer only when the server is reachable from this machine
                   alone, and 403 otherwise, naming the flag that enables them

"Reachable from this machine alone" is judged from the flags, as the WebUI judges it for its extension installer
(`webui_is_non_local`), except that a --server-name that is a loopback address (127.x, ::1, localhost) stays local:
--listen, --share and --ngrok always count as reaching the network, and so does --nowebui without --server-name
(uvicorn then binds every interface), and GRADIO_SERVER_NAME when no flag names the address.

A state change from a web page of another origin is refused (403) whatever the credentials: a browser sends such
a POST without asking (no CORS preflight for a form post), and may even attach cached Basic credentials.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from secrets import compare_digest
from typing import Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials

logger = logging.getLogger("gcfg.access")

Credentials = tuple[tuple[str, str], ...]


def parse_api_auth(api_auth: str | None) -> Credentials:
    """`--api-auth` text to (user, password) pairs, split as the WebUI splits it (",", then ":")."""
    pairs = []
    for item in (api_auth or "").split(","):
        if item:
            user, _, password = item.partition(":")
            pairs.append((user, password))
    return tuple(pairs)


def parse_gradio_auth(gradio_auth: str | None, lines: Sequence[str] = ()) -> Credentials:
    """`--gradio-auth` text plus the lines of the `--gradio-auth-path` file to (user, password) pairs, as the
    WebUI reads them for gradio's login: comma-separated, each stripped and split at its first ':'."""
    pairs = []
    for chunk in [gradio_auth or "", *lines]:
        for item in chunk.strip().split(","):
            item = item.strip()
            if item:
                user, _, password = item.partition(":")
                pairs.append((user, password))
    return tuple(pairs)


def is_loopback_name(name: str) -> bool:
    """Whether a server name binds the loopback interface only (an address literal or "localhost")."""
    name = name.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def network_exposure(cmd_opts: Any, environ: Mapping[str, str] = os.environ) -> str | None:
    """The flag that makes the server reachable from other machines, or None when it listens on loopback only."""
    for flag, value in (("--share", getattr(cmd_opts, "share", False)), ("--ngrok", getattr(cmd_opts, "ngrok", None)),
                        ("--listen", getattr(cmd_opts, "listen", False))):
        if value:
            return flag
    server_name = getattr(cmd_opts, "server_name", None)
    if server_name:
        return None if is_loopback_name(server_name) else f"--server-name {server_name}"
    if getattr(cmd_opts, "nowebui", False):
        return "--nowebui without --server-name (binds every interface)"
    env_name = environ.get("GRADIO_SERVER_NAME")
    if env_name and not is_loopback_name(env_name):
        return f"GRADIO_SERVER_NAME={env_name}"
    return None


@dataclass(frozen=True)
class AccessPolicy:
    api_enabled: bool  # --api or --nowebui: the routes exist
    api_credentials: Credentials  # --api-auth
    ui_credentials: Credentials  # --gradio-auth, --gradio-auth-path
    exposure: str | None  # see network_exposure
    unreadable_auth_file: str | None = None  # a --gradio-auth-path that could not be read: refuse state changes

    @classmethod
    def from_cmd_opts(cls, cmd_opts: Any, environ: Mapping[str, str] = os.environ) -> AccessPolicy:
        lines: list[str] = []
        unreadable = None
        path = getattr(cmd_opts, "gradio_auth_path", None)
        if path:
            try:
                with open(path, encoding="utf8") as f:
                    lines = f.readlines()
            except OSError as e:
                unreadable = f"--gradio-auth-path {path!r} cannot be read ({e.strerror or e})"
        return cls(api_enabled=bool(getattr(cmd_opts, "api", False) or getattr(cmd_opts, "nowebui", False)),
                   api_credentials=parse_api_auth(getattr(cmd_opts, "api_auth", None)),
                   ui_credentials=parse_gradio_auth(getattr(cmd_opts, "gradio_auth", None), lines),
                   exposure=network_exposure(cmd_opts, environ), unreadable_auth_file=unreadable)

    @property
    def write_credentials(self) -> Credentials:
        return self.api_credentials + self.ui_credentials

    def describe(self) -> str:
        """One line for the WebUI log: which routes answer whom."""
        if not self.api_enabled:
            return "GCFG: REST routes under /gcfg/v1 are off (like /sdapi they need --api); the tabs work without them"
        reads = "need the --api-auth credentials" if self.api_credentials else "are open"
        if self.unreadable_auth_file:
            writes = f"answer 403: {self.unreadable_auth_file}"
        elif self.write_credentials:
            flags = " or ".join(f for f, c in (("--api-auth", self.api_credentials),
                                              ("gradio-auth", self.ui_credentials)) if c)
            writes = f"need the {flags} credentials (HTTP Basic)"
        elif self.exposure is None:
            writes = "are open to this machine only (loopback)"
        else:
            writes = (f"answer 403: the server is reachable from the network ({self.exposure}) and has no credentials;"
                      " set --api-auth user:password (or --gradio-auth) to enable them")
        return f"GCFG: REST routes under /gcfg/v1: reads {reads}; state changes {writes}"


_BASIC = HTTPBasic(auto_error=False)


def _matches(given: HTTPBasicCredentials | None, credentials: Credentials) -> bool:
    if given is None:
        return False
    ok = False
    for user, password in credentials:  # compare every pair: the time does not tell which user exists
        ok |= compare_digest(given.username.encode(), user.encode()) & compare_digest(given.password.encode(),
                                                                                       password.encode())
    return ok


def _unauthorized() -> HTTPException:
    # The WebUI's own answer for a bad --api-auth login.
    return HTTPException(status_code=401, detail="Incorrect username or password",
                         headers={"WWW-Authenticate": "Basic"})


def cross_origin(request: Request) -> str | None:
    """The Origin of a browser request from another site, or None (no Origin header, or this server's own host,
    as the client or a reverse proxy names it)."""
    origin = request.headers.get("origin")
    if not origin:
        return None
    hosts = {request.headers.get(name, "").lower() for name in ("host", "x-forwarded-host")} - {""}
    return None if urlsplit(origin).netloc.lower() in hosts else origin


def read_guard(policy: AccessPolicy) -> Callable:
    def check(given: HTTPBasicCredentials | None = Depends(_BASIC)) -> None:  # noqa: B008 - FastAPI style
        if policy.api_credentials and not _matches(given, policy.api_credentials):
            raise _unauthorized()

    return check


def write_guard(policy: AccessPolicy) -> Callable:
    def check(request: Request, given: HTTPBasicCredentials | None = Depends(_BASIC)) -> None:  # noqa: B008
        what = f"{request.method} {request.url.path}"
        origin = cross_origin(request)
        if origin is not None:
            raise HTTPException(status_code=403, detail=f"GCFG: {what} changes state and is refused from a page of "
                                                        f"another origin ({origin})")
        if policy.unreadable_auth_file:
            raise HTTPException(status_code=403, detail=f"GCFG: {what} changes state and is refused: "
                                                        f"{policy.unreadable_auth_file}")
        if policy.write_credentials:
            if not _matches(given, policy.write_credentials):
                raise _unauthorized()
            return
        if policy.exposure is not None:
            raise HTTPException(status_code=403, detail=(
                f"GCFG: {what} changes state and is refused: this WebUI is reachable from the network "
                f"({policy.exposure}) and has no credentials. Start it with --api-auth user:password (or "
                "--gradio-auth user:password) to enable it, and send them with HTTP Basic authentication."))

    return check


Route = tuple[str, Callable, list[str], bool]  # (path, endpoint, methods, changes state)


def add_routes(app: FastAPI, policy: AccessPolicy, routes: Sequence[Route]) -> int:
    """Register `routes` with the guard each needs; nothing without --api/--nowebui. Returns how many were added."""
    if not policy.api_enabled:
        return 0
    reads, writes = [Depends(read_guard(policy))], [Depends(write_guard(policy))]
    for path, endpoint, methods, changes_state in routes:
        app.add_api_route(path, endpoint, methods=methods, dependencies=writes if changes_state else reads)
    return len(routes)


_logged: set[str] = set()


def log_policy_once(policy: AccessPolicy) -> None:
    """Say once per process (both GCFG scripts register routes) how the routes are protected."""
    line = policy.describe()
    if line not in _logged:
        _logged.add(line)
        (logger.warning if "403" in line else logger.info)(line)
