"""Wire a Label Studio instance to toothseg (idempotent): `toothseg bootstrap`.

1. wait until Label Studio answers /health;
2. find the project by title, or create it from label_studio_config.xml;
3. add the images folder as Local Files import storage (unless already added) and sync it;
4. connect the ML backend (unless a backend with the same URL is connected; a toothseg backend
   connected under another URL gets the new one), interactive on;
5. make sure the project has its webhook to the backend's /webhook (Label Studio skips it for some
   URLs), with the WEBHOOK_SECRET header if one is configured;
6. set "start training after N annotations" (START_TRAINING webhooks).

Running it again changes nothing that is already in place, so it is safe in `docker compose up`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import httpx

from backend.settings import Settings
from training.ops.ls_status import TITLE_PREFIX

logger = logging.getLogger(__name__)


TRAIN_AFTER_DEFAULT = 10
"""Label Studio's "start training after N annotations" when TRAIN_AFTER_ANNOTATIONS is not set."""


@dataclass(frozen=True)
class BootstrapConfig:
    label_studio_url: str
    api_key: str
    backend_url: str
    label_config: str
    project_title: str = "toothseg"
    images_dir: Path | None = None  # as Label Studio sees it (must be below its LOCAL_FILES_DOCUMENT_ROOT)
    train_after: int = 0  # Label Studio's min_annotations_to_start_training (0 = off)
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    webhook_secret: str = ""
    webhook_secret_header: str = "X-Toothseg-Webhook-Secret"

    @classmethod
    def from_env(cls, env: Mapping[str, str], settings: Settings, label_config: str) -> "BootstrapConfig":
        """The configuration compose and the native stack give: the backend's own settings
        (`settings`: Label Studio's address and token, basic auth, webhook secret) and the
        bootstrap's variables BACKEND_URL, PROJECT_TITLE, IMAGES_DIR and TRAIN_AFTER_ANNOTATIONS
        (default `TRAIN_AFTER_DEFAULT`, as in compose). ValueError names what is missing."""
        missing = [name for name, value in (("LABEL_STUDIO_URL", settings.label_studio_url),
                                            ("LABEL_STUDIO_API_KEY", settings.label_studio_api_key),
                                            ("BACKEND_URL", env.get("BACKEND_URL"))) if not value]
        if missing:
            raise ValueError(f"set {', '.join(missing)} (see README, configuration)")
        raw = env.get("TRAIN_AFTER_ANNOTATIONS") or str(TRAIN_AFTER_DEFAULT)
        try:
            train_after = int(raw)
        except ValueError:
            raise ValueError(f"TRAIN_AFTER_ANNOTATIONS={raw!r} is not a whole number") from None
        return cls(settings.label_studio_url, settings.label_studio_api_key, env["BACKEND_URL"], label_config,
                   project_title=env.get("PROJECT_TITLE") or "toothseg",
                   images_dir=Path(env["IMAGES_DIR"]) if env.get("IMAGES_DIR") else None, train_after=train_after,
                   basic_auth_user=settings.basic_auth_user, basic_auth_pass=settings.basic_auth_pass,
                   webhook_secret=settings.webhook_secret, webhook_secret_header=settings.webhook_secret_header)


def wait_for_label_studio(url: str, timeout: float = 300.0) -> None:
    """Block until `url`/health says UP; TimeoutError with the last problem otherwise."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url.rstrip('/')}/health", timeout=3)
            if r.status_code == 200 and r.json().get("status") == "UP":
                return
            last = f"HTTP {r.status_code}"
        except (httpx.HTTPError, ValueError) as exc:
            last = exc.__class__.__name__
        time.sleep(1)
    raise TimeoutError(f"Label Studio at {url} not up after {timeout:.0f} s ({last})")


def ensure_webhook(client, project: int, cfg: BootstrapConfig, done: dict) -> None:
    """The project's webhook to the backend's /webhook: annotations reach the retrain queue only through it.
    Label Studio creates it with the ML backend, but silently skips it when its URL check (Django's
    URLValidator) refuses the backend's address, e.g. a host name without a dot (http://backend:9090).
    Then it is created here, and a refusal is an error rather than a project that never retrains.
    It carries the WEBHOOK_SECRET header when one is configured."""
    from label_studio_sdk.core.api_error import ApiError

    hook_url = cfg.backend_url.rstrip("/") + "/webhook"
    headers = {cfg.webhook_secret_header: cfg.webhook_secret} if cfg.webhook_secret else {}
    hook = next((h for h in client.webhooks.list(project=project) if h.url.rstrip("/") == hook_url), None)
    if hook is None:
        try:
            client.webhooks.create(project=project, url=hook_url, send_payload=True, send_for_all_actions=True,
                                   headers=headers)
        except ApiError as exc:
            raise RuntimeError(
                f"Label Studio refused the webhook {hook_url} ({exc.status_code}: {exc.body}), so annotations "
                "would never reach the retrain queue. Give BACKEND_URL a host name with a dot or an IP "
                "address (docker-compose.yml uses http://backend.toothseg.internal:9090)") from exc
        done["created"].append("webhook")
    elif headers and (hook.headers or {}).get(cfg.webhook_secret_header) != cfg.webhook_secret:
        client.webhooks.update(id=hook.id, url=hook.url, headers={**(hook.headers or {}), **headers})
        done["created"].append("webhook_secret")


def bootstrap(cfg: BootstrapConfig, wait: float = 300.0) -> dict:
    """Make the Label Studio side ready; returns what exists now (ids) and what was created."""
    from label_studio_sdk import LabelStudio

    wait_for_label_studio(cfg.label_studio_url, wait)
    client = LabelStudio(base_url=cfg.label_studio_url, api_key=cfg.api_key)
    done: dict = {"created": []}

    project = next((p for p in client.projects.list() if p.title == cfg.project_title), None)
    if project is None:
        project = client.projects.create(title=cfg.project_title, label_config=cfg.label_config,
                                         description="Tooth instance segmentation (FDI), pre-annotated by toothseg")
        done["created"].append("project")
    done["project"] = project.id

    if cfg.images_dir is not None:
        path = str(cfg.images_dir)
        storage = next((s for s in client.import_storage.local.list(project=project.id) if s.path == path), None)
        if storage is None:
            storage = client.import_storage.local.create(project=project.id, path=path, use_blob_urls=True,
                                                         regex_filter=r".*\.(png|jpe?g|tiff?|bmp)$",
                                                         title="toothseg images")
            done["created"].append("storage")
        client.import_storage.local.sync(id=storage.id)
        done["storage"] = storage.id

    connected = client.ml.list(project=project.id)
    backends = [b for b in connected if b.url.rstrip("/") == cfg.backend_url.rstrip("/")]
    # a toothseg backend connected under another address (an older BACKEND_URL, e.g. compose's
    # http://backend:9090 before its webhook fix) is moved to the new one rather than doubled
    moved = [b for b in connected if (b.title or "").startswith(TITLE_PREFIX)]
    if backends:
        done["ml_backend"] = backends[0].id
    elif moved:
        client.ml.update(id=moved[0].id, url=cfg.backend_url, project=project.id)  # LS 1.23 needs the project
        old_hook = moved[0].url.rstrip("/") + "/webhook"  # events must not go on to the old address too
        for hook in client.webhooks.list(project=project.id):
            if hook.url.rstrip("/") == old_hook:
                client.webhooks.delete(id=hook.id)
        done["ml_backend"] = moved[0].id
        done["created"].append("ml_backend_url")
    else:
        kwargs = {}
        if cfg.basic_auth_user:
            kwargs = {"auth_method": "BASIC_AUTH", "basic_auth_user": cfg.basic_auth_user,
                      "basic_auth_pass": cfg.basic_auth_pass}
        ml = client.ml.create(project=project.id, url=cfg.backend_url, title="toothseg", is_interactive=True, **kwargs)
        done["ml_backend"] = ml.id
        done["created"].append("ml_backend")

    ensure_webhook(client, project.id, cfg, done)

    client.projects.update(id=project.id, min_annotations_to_start_training=cfg.train_after,
                           show_collab_predictions=True)
    done["tasks"] = client.projects.get(id=project.id).task_number
    logger.info("bootstrap: project %s (%s tasks), ML backend %s, created: %s", done["project"], done["tasks"],
                done["ml_backend"], ", ".join(done["created"]) or "nothing")
    return done
