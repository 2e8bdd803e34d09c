"""`toothseg bootstrap`'s webhook step on a real Label Studio: the project's webhook to the backend is
what carries annotations to the retrain queue. Label Studio creates it with the ML backend but skips
it without a word when its URL check refuses the backend's address (docker compose's
http://backend:9090 did: the compose test found it)."""
from dataclasses import replace

import pytest

from backend.label_config import render_label_config
from conftest import LS_TOKEN
from training.ops.bootstrap import BootstrapConfig, bootstrap, ensure_webhook

pytestmark = pytest.mark.e2e


def config(label_studio: str, backend_url: str, **kw) -> BootstrapConfig:
    return BootstrapConfig(**{"label_studio_url": label_studio, "api_key": "", "backend_url": backend_url,
                              "label_config": "", **kw})


def hooks(client, project: int) -> dict[str, dict]:
    return {h.url: (h.headers or {}) for h in client.webhooks.list(project=project)}


def test_a_missing_webhook_is_created_once_and_given_the_secret(ls_client, label_studio):
    project = ls_client.projects.create(title="bootstrap webhook").id
    cfg = config(label_studio, "http://127.0.0.1:9")
    done = {"created": []}
    ensure_webhook(ls_client, project, cfg, done)
    assert done["created"] == ["webhook"] and hooks(ls_client, project) == {"http://127.0.0.1:9/webhook": {}}
    ensure_webhook(ls_client, project, cfg, done)  # idempotent
    assert done["created"] == ["webhook"] and len(hooks(ls_client, project)) == 1

    secret = config(label_studio, "http://127.0.0.1:9/", webhook_secret="s3cret")
    ensure_webhook(ls_client, project, secret, done)
    assert done["created"] == ["webhook", "webhook_secret"]
    assert hooks(ls_client, project) == {"http://127.0.0.1:9/webhook": {"X-Toothseg-Webhook-Secret": "s3cret"}}


@pytest.mark.scenario("Bootstrap with a backend address Label Studio refuses for webhooks (`http://backend:9090`: "
                      "no dot in the host name)",
                      "the bootstrap fails with the reason and the fix instead of leaving a project whose annotations "
                      "never retrain")
def test_an_address_label_studio_refuses_for_webhooks_is_an_error(ls_client, label_studio):
    project = ls_client.projects.create(title="bootstrap webhook refused").id
    done = {"created": []}
    with pytest.raises(RuntimeError, match="host name with a dot"):
        ensure_webhook(ls_client, project, config(label_studio, "http://backend:9090"), done)
    assert hooks(ls_client, project) == {} and done["created"] == []


def test_a_toothseg_backend_under_an_old_address_is_moved_not_doubled(ls_client, label_studio, start_backend,
                                                                      redis_url):
    """An upgrade that changes BACKEND_URL (compose's backend moved to backend.toothseg.internal)
    must leave one connected backend, at the new address."""
    backend = start_backend(REDIS_URL=redis_url)
    old_url, new_url = backend.url, backend.url.replace("127.0.0.1", "localhost")
    project = ls_client.projects.create(title="bootstrap moved backend", label_config=render_label_config())
    ls_client.ml.create(project=project.id, url=old_url, title="toothseg", is_interactive=True)
    assert list(hooks(ls_client, project.id)) == [f"{old_url}/webhook"]  # Label Studio's own, for the old address
    cfg = config(label_studio, new_url, project_title="bootstrap moved backend", label_config=render_label_config())
    cfg = replace(cfg, api_key=LS_TOKEN)
    done = bootstrap(cfg, wait=30)
    backends = ls_client.ml.list(project=project.id)
    assert [b.url for b in backends] == [new_url] and "ml_backend_url" in done["created"]
    assert list(hooks(ls_client, project.id)) == [f"{new_url}/webhook"]
