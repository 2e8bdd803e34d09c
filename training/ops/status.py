"""`toothseg status`: queues, running jobs with their stage and progress, current model versions."""
from __future__ import annotations

from typing import Any

import redis
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from backend.queues import project_of_key, project_redis_key
from backend.registry import Registry
from backend.settings import Settings


def _job_line(job: Job) -> str:
    meta = job.meta or {}
    progress = f" {meta['progress'] * 100:.0f}%" if isinstance(meta.get("progress"), (int, float)) else ""
    detail = f" {meta.get('detail')}" if meta.get("detail") else ""
    detail += f" ({meta['budget']})" if meta.get("budget") else ""
    status = job.get_status()
    return f"{job.id} {getattr(status, 'value', status)} [{meta.get('stage', 'queued')}{progress}]{detail}"


def collect(settings: Settings, queues: list[str]) -> dict[str, Any]:
    """Everything `status` prints, as data."""
    conn = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2)
    conn.ping()
    out: dict[str, Any] = {"redis": settings.redis_url, "queues": {}, "projects": {}}
    for name in queues:
        q = Queue(name, connection=conn)
        started = StartedJobRegistry(name, connection=conn)
        started.cleanup()
        failed = FailedJobRegistry(name, connection=conn)
        jobs = [j for j in Job.fetch_many(started.get_job_ids() + q.get_job_ids()[:20], connection=conn) if j]
        last_failed = [j for j in Job.fetch_many(failed.get_job_ids()[-3:], connection=conn) if j]
        out["queues"][name] = {
            "queued": len(q), "running": started.count, "failed": failed.count,
            "finished": FinishedJobRegistry(name, connection=conn).count,
            "jobs": [_job_line(j) for j in jobs],
            "recent_failures": [f"{j.id}: {(j.meta or {}).get('error') or (j.exc_info or '').strip().splitlines()[-1:]}"
                                for j in last_failed],
        }
    registry = Registry(settings.model_dir)
    projects = set(registry.projects())
    projects |= {project_of_key(k) for k in conn.scan_iter(project_redis_key("*", "active"))}
    for project in sorted(projects, key=int):
        active = conn.get(project_redis_key(project, "active"))
        events = conn.scard(project_redis_key(project, "changed"))
        out["projects"][project] = {
            "current_version": registry.current_version(project) or "-",
            "versions": len(registry.versions(project)),
            "active_job": active.decode() if active else None,
            "changed_annotations": int(events),
        }
    return out


def format_status(data: dict[str, Any]) -> str:
    lines = [f"Redis {data['redis']}: up"]
    for name, q in data["queues"].items():
        lines.append(f"queue {name}: {q['queued']} queued, {q['running']} running, {q['finished']} finished, "
                     f"{q['failed']} failed")
        lines += [f"  {line}" for line in q["jobs"]]
        lines += [f"  failed {line}" for line in q["recent_failures"]]
    for project, p in data["projects"].items():
        lines.append(f"project {project}: current model {p['current_version']} ({p['versions']} stored), "
                     f"{p['changed_annotations']} changed annotations since the last export, "
                     f"active job {p['active_job'] or '-'}")
    return "\n".join(lines)
