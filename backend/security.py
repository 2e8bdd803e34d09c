"""Secrets kept out of logs (access control is the front door's, `backend.front_door`).

A logging filter replaces tokens (Authorization headers, access_token fields, passwords, API
keys) with "***" in every log record, whatever the log level (label-studio-ml logs request
headers and bodies at DEBUG), and in the traceback of a record that carries one (a
`logger.exception` of an error whose message holds a token).
"""
from __future__ import annotations

import logging
import re

_PATTERNS = [
    (re.compile(r"(?i)\b(Token|Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{4,}"), r"\1 ***"),
    (re.compile(r"(?i)(['\"]?(?:access_token|api_key|refresh|password|token|secret|authorization)['\"]?\s*[:=]\s*"
                r"[b]?['\"])[^'\"]+(['\"])"), r"\1***\2"),
    (re.compile(r"(?i)(access_token|api_key|token|secret|password)=([^&\s'\"]+)"), r"\1=***"),
    (re.compile(r"(?im)^([\w-]*(?:secret|token|api-key|password)[\w-]*:[ \t]*)\S.*$"), r"\1***"),
]


def redact(text: str) -> str:
    """`text` with credentials replaced by ***."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


_FORMATTER = logging.Formatter()


class RedactingFilter(logging.Filter):
    """Rewrites each record's message with `redact` (arguments are merged in first), and its
    traceback and stack: formatted here, redacted and cached in the record, where every
    formatter takes them from instead of formatting them again."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler
            return True
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_redaction() -> None:
    """Add the filter to every handler of the root logger (and gunicorn's, if present)."""
    filt = RedactingFilter()
    for name in ("", "gunicorn.error", "gunicorn.access"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(filt)
