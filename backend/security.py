"""Access control for the backend and secrets kept out of logs.

- Basic auth (BASIC_AUTH_USER / BASIC_AUTH_PASS): every route but /health needs it; Label
  Studio sends it when the ML backend is connected with "Basic Authentication".
- Webhook secret (WEBHOOK_SECRET): /webhook needs the header WEBHOOK_SECRET_HEADER with that
  value; `toothseg bootstrap` adds the header to the project's webhook in Label Studio.
- Redaction: a logging filter replaces tokens (Authorization headers, access_token fields,
  passwords, API keys) in every log record with "***", whatever the log level; label-studio-ml
  logs request headers and bodies at DEBUG.
"""
from __future__ import annotations

import hmac
import logging
import re

from flask import Flask, jsonify, request

from backend.settings import Settings

OPEN_PATHS = ("/health", "/")

_PATTERNS = [
    (re.compile(r"(?i)\b(Token|Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{4,}"), r"\1 ***"),
    (re.compile(r"(?i)(['\"]?(?:access_token|api_key|refresh|password|token|secret|authorization)['\"]?\s*[:=]\s*"
                r"[b]?['\"])[^'\"]+(['\"])"), r"\1***\2"),
    (re.compile(r"(?i)(access_token|api_key|token|secret|password)=([^&\s'\"]+)"), r"\1=***"),
]


def redact(text: str) -> str:
    """`text` with credentials replaced by ***."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record's message with `redact` (arguments are merged in first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler
            return True
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True


def install_redaction() -> None:
    """Add the filter to every handler of the root logger (and gunicorn's, if present)."""
    filt = RedactingFilter()
    for name in ("", "gunicorn.error", "gunicorn.access"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(filt)


def _unauthorized(message: str, basic: bool):
    response = jsonify({"error": message, "status": 401})
    response.status_code = 401
    if basic:
        response.headers["WWW-Authenticate"] = 'Basic realm="toothseg"'
    return response


def install_access_control(app: Flask, settings: Settings) -> None:
    """Require basic auth and the webhook secret where configured."""

    @app.before_request
    def _check():  # noqa: ANN202 (Flask hook)
        if request.path in OPEN_PATHS:
            return None
        if settings.basic_auth_user:
            auth = request.authorization
            if auth is None or not (hmac.compare_digest(auth.username or "", settings.basic_auth_user)
                                    and hmac.compare_digest(auth.password or "", settings.basic_auth_pass)):
                return _unauthorized("basic authentication required (BASIC_AUTH_USER / BASIC_AUTH_PASS)", True)
        if settings.webhook_secret and request.path == "/webhook":
            given = request.headers.get(settings.webhook_secret_header, "")
            if not hmac.compare_digest(given, settings.webhook_secret):
                return _unauthorized(f"missing or wrong {settings.webhook_secret_header} header", False)
        return None
