"""A retraining job's status where an annotation lead sees it: the project's ML backend in Label Studio.

Label Studio 1.23's *Settings -> Model* card shows an ML backend's title and its connection
state; the state is re-read from the backend's `/setup` on every visit, so it cannot carry a
job's progress. The title can: the job writes "<title> · <status>" on every ML backend of the
project whose title starts with `TITLE_PREFIX` (the one `toothseg bootstrap` connects is titled
"toothseg"), keeping the part before " · ". The status is the stage with the time budget while
training, and at the end the outcome: the new version and its validation figures, or why no model
was promoted and what to do next. The same text goes to the backend's description. An update
that fails is logged and the job goes on: the status is a courtesy, the registry is the record.
"""
from __future__ import annotations

import logging
import time

from backend.settings import Settings

logger = logging.getLogger(__name__)

TITLE_PREFIX = "toothseg"
SEPARATOR = " · "
MIN_INTERVAL_S = 30.0
"""Least seconds between two progress updates (stage changes and the outcome are always written)."""
MAX_TITLE = 180


class LabelStudioStatus:
    """Writes a project's retrain status onto its toothseg ML backends (module docstring)."""

    def __init__(self, client, project: int):
        self.client = client
        self.project = project
        self.last = 0.0
        self.failed = False

    @classmethod
    def for_project(cls, settings: Settings, project: str) -> "LabelStudioStatus | None":
        """None when the worker has no Label Studio to talk to."""
        if not settings.label_studio_url:
            return None
        from label_studio_sdk import LabelStudio

        return cls(LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key, timeout=10),
                   int(project))

    def report(self, text: str, force: bool = False) -> None:
        """Show `text` on the project's toothseg ML backends (at most every MIN_INTERVAL_S unless `force`)."""
        now = time.monotonic()
        if self.failed or (not force and now - self.last < MIN_INTERVAL_S):
            return
        self.last = now
        try:
            for backend in self.client.ml.list(project=self.project):
                base = (backend.title or "").split(SEPARATOR, 1)[0]
                if not base.startswith(TITLE_PREFIX):
                    continue
                # Label Studio validates an update as a new connection (health check, /setup): it needs
                # the URL, the project and, with basic auth, the user (an empty password keeps the stored one)
                auth = {"basic_auth_user": backend.basic_auth_user, "basic_auth_pass": ""} \
                    if backend.auth_method == "BASIC_AUTH" else {}
                self.client.ml.update(id=backend.id, url=backend.url, project=self.project,
                                      auth_method=backend.auth_method, title=f"{base}{SEPARATOR}{text}"[:MAX_TITLE],
                                      description=text, **auth)
        except Exception as exc:  # Label Studio down or refusing: the job must not fail for its status line
            self.failed = True
            logger.warning("project %s: cannot show the job's status in Label Studio (%s: %s)", self.project,
                           exc.__class__.__name__, exc)
