"""The backend's front door: one WSGI layer in front of Flask and label-studio-ml.

It runs before anything else reads the request (label-studio-ml's before-request hook reads the
whole body, and Werkzeug 2.0 ignores MAX_CONTENT_LENGTH there), and decides, in this order:

1. Route: only the routes toothseg serves exist, `ROUTES` (method and path); anything else,
   label-studio-ml's own /train, /versions, /is_training and /metrics included, is a 404.
2. Access: every route but /health needs basic auth when BASIC_AUTH_USER / BASIC_AUTH_PASS are
   set, and /webhook the WEBHOOK_SECRET header when that is set. Credentials are compared as
   bytes in constant time, user and password both (no short cut on the user).
3. Body: a Content-Length above MAX_REQUEST_BYTES is refused before a byte is read; a chunked
   body is read in chunks and refused as soon as it passes the limit. An accepted body is handed
   on in memory with its length, so nothing behind the door reads the socket.
4. Errors: every refusal, and any exception that escapes the app, is a JSON body
   {"error": ..., "status": ...} without a traceback (the traceback goes to the log, redacted).

Refusals that leave a body unread say `Connection: close`. gunicorn (27) then discards at most
64 KB of what the client still sends, within 5 s, and closes the connection, so memory stays flat
(bench/bench_front_door.py measures it).
"""
from __future__ import annotations

import base64
import hmac
import io
import json
import logging
import sys
from typing import Callable, Iterable

from backend.settings import Settings

logger = logging.getLogger(__name__)

ROUTES: dict[str, tuple[str, ...]] = {
    "/health": ("GET",),
    "/setup": ("POST",),
    "/predict": ("POST",),
    "/webhook": ("POST",),
}
"""Path -> allowed methods: what toothseg serves."""
OPEN_ROUTES = ("/health",)
"""Routes without basic auth (Label Studio's health check, load balancers)."""
CHUNK = 64 * 1024


def _same(given: bytes, expected: bytes) -> bool:
    return hmac.compare_digest(given, expected)


class FrontDoor:
    """WSGI middleware (module docstring): `FrontDoor(app.wsgi_app, settings)`."""

    def __init__(self, app: Callable, settings: Settings):
        self.app = app
        self.settings = settings
        self.user = settings.basic_auth_user.encode()
        self.password = settings.basic_auth_pass.encode()
        self.secret = settings.webhook_secret.encode()
        self.secret_header = "HTTP_" + settings.webhook_secret_header.upper().replace("-", "_")

    # --- checks -------------------------------------------------------------------------
    def _authorized(self, environ: dict) -> bool:
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, encoded = header.partition(" ")
        user = password = b""
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
            except ValueError:
                user = password = b""
        user_ok, password_ok = _same(user, self.user), _same(password, self.password)  # both, always
        return user_ok and password_ok

    def _read_body(self, environ: dict) -> bytes | None:
        """The request body, or None if it exceeds MAX_REQUEST_BYTES (read no further than that)."""
        limit = self.settings.max_request_bytes
        stream = environ["wsgi.input"]
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        length = environ.get("CONTENT_LENGTH") or ""
        if not chunked:
            size = int(length) if length.isdigit() else 0
            if size > limit:
                return None
            return stream.read(size) if size else b""
        parts, total = [], 0
        while True:  # never ask for more than one byte past the limit: a read waits until it has them all
            part = stream.read(min(CHUNK, limit + 1 - total))
            if not part:
                return b"".join(parts)
            total += len(part)
            if total > limit:
                return None
            parts.append(part)

    # --- the layer ------------------------------------------------------------------------
    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        body_pending = bool(environ.get("CONTENT_LENGTH", "") not in ("", "0")
                            or "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower())
        if path not in ROUTES:
            return _refuse(start_response, 404, f"no such route: {method} {path}", body_pending)
        if method not in ROUTES[path]:
            return _refuse(start_response, 405, f"{path} takes {', '.join(ROUTES[path])}, not {method}", body_pending,
                           [("Allow", ", ".join(ROUTES[path]))])
        if path not in OPEN_ROUTES and self.user and not self._authorized(environ):
            return _refuse(start_response, 401, "basic authentication required (BASIC_AUTH_USER / BASIC_AUTH_PASS)",
                           body_pending, [("WWW-Authenticate", 'Basic realm="toothseg"')])
        if path == "/webhook" and self.secret and \
                not _same(environ.get(self.secret_header, "").encode("latin-1", "replace"), self.secret):
            return _refuse(start_response, 401, f"missing or wrong {self.settings.webhook_secret_header} header",
                           body_pending)
        body = self._read_body(environ)
        if body is None:
            return _refuse(start_response, 413, f"request body exceeds MAX_REQUEST_BYTES "
                                                f"({self.settings.max_request_bytes} bytes)", True)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ["wsgi.input_terminated"] = True
        try:
            return self.app(environ, start_response)
        except Exception as exc:  # the app's own handlers answer its errors; this is the last resort
            logger.exception("unexpected error on %s %s", method, path)
            return _refuse(start_response, 500, f"internal error ({exc.__class__.__name__}); see the backend log",
                           False, exc_info=sys.exc_info())


def _refuse(start_response: Callable, status: int, message: str, close: bool,
            headers: list[tuple[str, str]] | None = None, exc_info=None) -> list[bytes]:
    from http import HTTPStatus

    body = json.dumps({"error": message, "status": status}).encode()
    head = [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *(headers or [])]
    if close:
        head.append(("Connection", "close"))
    start_response(f"{status} {HTTPStatus(status).phrase}", head, exc_info)
    return [body]
