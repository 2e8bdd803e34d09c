"""The WSGI app: label-studio-ml's Flask app with toothseg's manager and views.

Serve with gunicorn:  gunicorn --bind 0.0.0.0:9090 --threads 4 'backend.app:create_app()'

label-studio-ml 1.0.9 is used as it ships, with these fixes made here rather than in the package:
- `/setup` answers from the registry's current-version pointer (no model load: Label Studio
  allows 3 s) and `/predict` builds a request-local model wrapper, so concurrent requests for
  different projects do not share the package's one global "current model".
- `/predict`, `/setup` and `/webhook` validate their JSON: malformed input is a 400 with a
  message, never a 500 with a traceback.
- `/webhook` enqueues coalesced retrain jobs (`backend.webhooks`), START_TRAINING included;
  the package ignores START_TRAINING and names jobs by the second.
- `/health` says UP without the model directory, and where SAM's image encoder runs once SAM is
  loaded (`sam_encoder_runtime`: torch or openvino; null before).
- In front of it all, `backend.front_door.FrontDoor`: only toothseg's four routes exist,
  basic auth and the webhook secret are checked, and bodies are capped before anything reads
  them. Credentials are redacted from every log line and traceback (`backend.security`).
"""
from __future__ import annotations

import logging
import os
from typing import Any

from flask import Flask, jsonify, request
from label_studio_ml import api
from label_studio_ml.api import init_app
from label_studio_ml.model import LabelStudioMLManager, ModelWrapper
from rq.exceptions import NoSuchJobError
from werkzeug.exceptions import BadRequest, HTTPException

from backend.formats import LabelConfigError, find_target
from backend.front_door import FrontDoor
from backend.images import ImageLoader
from backend.model import ToothSegBackend
from backend.registry import project_key
from backend.runtime import get_runtime
from backend.security import install_redaction

logger = logging.getLogger(__name__)


class ToothSegManager(LabelStudioMLManager):
    """label-studio-ml's manager, with per-request, per-project models (see module docstring)."""

    connections: dict[str, dict[str, str]] = {}  # project -> hostname/access_token sent by /setup
    _ignored: set[str] = set()  # hostnames already logged as not trusted (at most _IGNORED_MAX, cut to 200 chars)
    _IGNORED_MAX = 100

    @classmethod
    def fetch(cls, project=None, label_config=None, force_reload=False, **kwargs):
        key = project_key(project)
        hostname, token = kwargs.get("hostname") or "", kwargs.get("access_token") or ""
        if hostname and not ImageLoader.trusted_hostname(get_runtime().settings, hostname):
            shown = hostname.split("?")[0][:200]
            if shown not in cls._ignored and len(cls._ignored) < cls._IGNORED_MAX:  # sent before every batch: once
                cls._ignored.add(shown)
                logger.warning("/setup named %r as Label Studio; that hostname is ignored (not LABEL_STUDIO_URL's "
                               "origin and not in IMAGE_HOST_ALLOWLIST); its token is only ever sent to "
                               "LABEL_STUDIO_URL", shown)
            hostname = ""
        if hostname or token:
            cls.connections[key] = {"hostname": hostname, "access_token": token}
        conn = cls.connections.get(key, {})
        model = cls.model_class(label_config=label_config, project=key, **conn)
        return ModelWrapper(model=model, model_version=model.model_version)

    @classmethod
    def predict(cls, tasks, project=None, label_config=None, force_reload=False, try_fetch=True, **kwargs):
        wrapper = cls.fetch(project, label_config)
        return wrapper.model.predict(tasks, **kwargs), wrapper


def _json_body() -> dict[str, Any]:
    """The request's JSON object (its size was checked by the front door)."""
    data = request.get_json(force=True, silent=True)
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def _project(data: dict[str, Any]) -> str:
    try:
        return project_key(data.get("project"))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def _label_config(text: Any, field: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise BadRequest(f"'{field}' (the project's labeling config) is missing")
    try:
        find_target(text)
    except LabelConfigError as exc:
        raise BadRequest(f"this labeling config cannot hold tooth masks: {exc}") from None
    return text


def setup_view():
    data = _json_body()
    project = _project(data)
    _label_config(data.get("schema"), "schema")
    wrapper = ToothSegManager.fetch(project, data.get("schema"), hostname=data.get("hostname", ""),
                                    access_token=data.get("access_token", ""))
    return jsonify({"model_version": wrapper.model_version})


def predict_view():
    data = _json_body()
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise BadRequest("'tasks' must be a list of task objects")
    project = _project(data)
    label_config = _label_config(data.get("label_config"), "label_config")
    params = data.get("params") or {}
    context = params.get("context") if isinstance(params, dict) else None
    limit = get_runtime().settings.predict_batch_limit
    if not context and 0 < limit < len(tasks):
        # Label Studio's own fallback: one result for several tasks makes it resend them one per
        # request, each within its own ML_TIMEOUT_PREDICT; a big batch in one request would time out.
        version = ToothSegManager.fetch(project, label_config).model_version
        logger.info("project %s: %d tasks in one /predict (PREDICT_BATCH_LIMIT %d): asking Label Studio to send "
                    "them one at a time", project, len(tasks), limit)
        return jsonify({"results": [{"result": [], "score": 0.0, "model_version": version}], "model_version": version})
    predictions, wrapper = ToothSegManager.predict(tasks, project, label_config, context=context)
    return jsonify({"results": predictions, "model_version": wrapper.model_version})


def webhook_view():
    from backend.webhooks import handle_webhook

    body, status = handle_webhook(_json_body(), get_runtime().settings)
    return jsonify(body), status


def _http_error(exc: HTTPException):
    return jsonify({"error": exc.description, "status": exc.code}), exc.code


_LABEL_STUDIO_ML_HANDLED = (FileNotFoundError, AssertionError, IndexError, NoSuchJobError)
"""Exceptions label-studio-ml's app answers itself, as plain text that can hold file paths."""


def _server_error(exc: Exception):
    logger.exception("unexpected error on %s %s", request.method, request.path)
    return jsonify({"error": f"internal error ({exc.__class__.__name__}); see the backend log", "status": 500}), 500


def health_view():
    return jsonify({"status": "UP", "model_class": ToothSegBackend.__name__,
                    "sam_encoder_runtime": get_runtime().sam_encoder_runtime()})


def create_app() -> Flask:
    """Build the app (the gunicorn entry point). Models are not loaded here."""
    os.environ.setdefault("LABEL_STUDIO_ML_BACKEND_V2", "1")
    runtime = get_runtime()
    logging.basicConfig(level=runtime.settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api._manager = ToothSegManager()
    app = init_app(ToothSegBackend, model_dir=str(runtime.settings.model_dir))
    app.view_functions["_setup"] = setup_view
    app.view_functions["_predict"] = predict_view
    app.view_functions["webhook"] = webhook_view
    app.view_functions["health"] = health_view
    app.register_error_handler(HTTPException, _http_error)
    for specific in (Exception, *_LABEL_STUDIO_ML_HANDLED):  # Flask prefers the most specific handler
        app.register_error_handler(specific, _server_error)
    app.wsgi_app = FrontDoor(app.wsgi_app, runtime.settings)
    install_redaction()
    return app
