"""The `toothseg` command line.

Each subcommand is a small function that parses nothing itself: `main` builds the parser,
and every expected failure (bad input, unreachable service) ends as one line on stderr and
exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from training.data.dataset_cli import register_dataset_commands
from training.ops import CLIError
from training.simulate import add_arguments as add_simulate_arguments


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1024x512, got {text!r}") from None
    if w < 64 or h < 64:
        raise argparse.ArgumentTypeError(f"image size {w}x{h} is too small (at least 64x64)")
    return w, h


def cmd_synth(args: argparse.Namespace) -> int:
    from training.data.synth import write_dataset

    summary = write_dataset(Path(args.out), n=args.n, seed=args.seed, size=args.size,
                            progress=not args.quiet, url_prefix=args.url_prefix)
    print(summary)
    return 0


def cmd_label_config(args: argparse.Namespace) -> int:
    from backend.label_config import render_label_config

    sys.stdout.write(render_label_config())
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from training.pretrain import pretrain

    record = pretrain(Path(args.out), images=args.images, seed=args.seed, size=args.size, imgsz=args.imgsz,
                      steps=args.steps)
    print(f"{args.out}: {record['images']} synthetic images, {record['steps']} steps at imgsz {record['imgsz']}, "
          f"{record['seconds']:.0f} s, sha256 {record['sha256'][:12]}")
    return 0


def _settings():
    from backend.settings import Settings

    return Settings.from_env()


def _project_arg(registry, project: str | None) -> str:
    """The --project given, or the registry's only project."""
    if project:
        from backend.registry import project_key

        return project_key(project)
    projects = registry.projects()
    if len(projects) != 1:
        raise CLIError(f"--project is required ({'projects: ' + ', '.join(projects) if projects else 'no models yet'})")
    return projects[0]


def cmd_models(args: argparse.Namespace) -> int:
    from backend.registry import Registry
    from training.ops.history import describe, format_table, plot_history, version_rows
    from backend.registry import rollback

    registry = Registry(_settings().model_dir)
    project = _project_arg(registry, args.project)
    if args.action == "list":
        print(format_table(version_rows(registry, project)))
    elif args.action == "show":
        from training.annotator_work import WorkStore, describe_version, summarize

        version = registry.get(project, _need_version(args))
        print(describe(version))
        print(describe_version(summarize(WorkStore(registry.root).records(project), registry), version.version))
    elif args.action == "rollback":
        version = _need_version(args)
        rollback(registry, project, version)
        print(f"project {project}: current model is now {version}")
    elif args.action == "plot":
        out = Path(args.out or f"toothseg-project{project}-history.png")
        print(plot_history(version_rows(registry, project), out, f"project {project}"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import json

    from backend.registry import project_key
    from training.annotator_work import WorkStore, export_records, format_rows, plot_rows, summarize
    from training.export import ExportError

    settings = _settings()
    store = WorkStore(settings.model_dir)
    registry = store.registry
    project = project_key(args.project)
    if args.export:
        try:
            records = export_records(settings, project)
        except (ExportError, RuntimeError) as exc:
            raise CLIError(str(exc)) from None
    else:
        records = store.records(project)
    rows = summarize(records, registry)
    source = "Label Studio's export" if args.export else f"the worker's records in {store.folder(project)}"
    if args.json:
        print(json.dumps({"project": project, "source": source, "rows": rows}, indent=1))
    else:
        print(f"project {project}: annotator work per model version, from {source}")
        print(format_rows(rows))
    if args.plot:
        print(plot_rows(rows, records, Path(args.plot), f"project {project}: annotator work per model version"))
    return 0


def _need_version(args: argparse.Namespace) -> str:
    if not args.version:
        raise CLIError(f"models {args.action} needs a VERSION (see `toothseg models list`)")
    return args.version


def cmd_status(args: argparse.Namespace) -> int:
    import redis

    from training.ops.status import collect, format_status

    settings = _settings()
    try:
        data = collect(settings, [settings.train_queue, settings.preannotate_queue, settings.idle_queue, *args.queue])
    except redis.RedisError as exc:
        raise CLIError(f"Redis at {settings.redis_url} is unavailable: {exc}") from None
    print(format_status(data))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import redis

    from backend.registry import project_key
    from backend.retrain_queue import LOCAL_JOB_PREFIX, RetrainQueue

    settings = _settings()
    project = project_key(args.project)
    if args.now:  # in this process, holding the project's lock as a queued job would
        import time
        import uuid

        from training.export import ExportError
        from training.jobs import run_retrain

        queue = RetrainQueue.from_settings(redis.Redis.from_url(settings.redis_url), settings)
        job_id = f"{LOCAL_JOB_PREFIX}{project}-{int(time.time())}-{uuid.uuid4().hex[:6]}"
        try:
            busy = queue.claim(project, job_id)
        except redis.RedisError as exc:
            raise CLIError(f"Redis at {settings.redis_url} is unavailable, so the project's retrain lock cannot "
                           f"be taken: {exc}") from None
        if busy is not None and busy.startswith("idle-"):
            raise CLIError(f"project {project}'s model is in an idle training round (job {busy}); without --now "
                           f"the retrain is queued and stops that round at once")
        if busy is not None:
            raise CLIError(f"project {project} is being retrained already (job {busy}); wait for it, or queue "
                           f"one more run without --now")
        try:
            snapshot, covered = queue.snapshot(project), set()
            print(run_retrain(project, settings, job_id, covered=covered.update))
            queue.consume(project, snapshot | covered)
        except ExportError as exc:
            raise CLIError(str(exc)) from None
        finally:
            queue.release(project, job_id)
        decision = queue.maybe_enqueue(project)  # events that arrived during the run, as a job's follow-up
        if decision.status == "enqueued":
            print(f"project {project}: events during the run queued a follow-up retrain ({decision.job_id})")
        return 0
    try:
        queue = RetrainQueue.from_settings(redis.Redis.from_url(settings.redis_url), settings)
        queue.record_training_request(project)
        decision = queue.maybe_enqueue(project)
    except redis.RedisError as exc:
        raise CLIError(f"Redis at {settings.redis_url} is unavailable: {exc}") from None
    print(f"project {project}: {decision.status} {decision.job_id or ''} ({decision.detail})")
    return 0


def cmd_preannotate(args: argparse.Namespace) -> int:
    import redis

    from backend.registry import Registry, project_key
    from training.preannotate import enqueue_preannotation, run_chunk

    settings = _settings()
    project = project_key(args.project)
    version = Registry(settings.model_dir).current_version(project)
    if version is None:
        raise CLIError(f"project {project} has no current model yet: train one first (`toothseg train`)")
    if args.now:
        print(run_chunk(project, version, settings, limit=args.limit or 10**9))
        return 0
    try:
        job_id = enqueue_preannotation(redis.Redis.from_url(settings.redis_url), settings, project, version, "cli")
    except redis.RedisError as exc:
        raise CLIError(f"Redis at {settings.redis_url} is unavailable: {exc}") from None
    print(f"project {project}: pre-annotation with {version} "
          f"{'queued as ' + job_id if job_id else 'is already queued or running'} (see `toothseg status`)")
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    import json
    import os

    from training.ops.bootstrap import BootstrapConfig, bootstrap

    env = os.environ
    config_path = Path(env.get("LABEL_CONFIG_PATH") or Path(__file__).resolve().parents[2] / "label_studio_config.xml")
    if not config_path.exists():
        from backend.label_config import render_label_config

        label_config = render_label_config()
    else:
        label_config = config_path.read_text()
    cfg = BootstrapConfig.from_env(env, _settings(), label_config)
    try:
        result = bootstrap(cfg, wait=args.wait)
    except (TimeoutError, RuntimeError) as exc:
        raise CLIError(str(exc)) from None
    print(json.dumps(result) if args.json else
          f"project {result['project']} ({result['tasks']} tasks), ML backend {result['ml_backend']}; "
          f"created: {', '.join(result['created']) or 'nothing (already set up)'}")
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    import time

    from training.ops.stack import Stack

    stack = Stack(data=Path(args.data), images=Path(args.images or Path(args.data) / "images"))
    if args.action == "down":
        stack.down()
        print(f"stack in {stack.data} stopped")
        return 0
    if args.action == "status":
        for name, alive in stack.status().items():
            print(f"{name}: {'running' if alive else 'stopped'}")
        return 0
    try:
        result = stack.up()
    except (RuntimeError, TimeoutError) as exc:
        print(stack.log_tails(), file=sys.stderr)
        stack.down()
        raise CLIError(str(exc)) from None
    print(f"Label Studio {stack.label_studio_url} (user {stack.setting('LABEL_STUDIO_USERNAME')}), backend "
          f"{stack.backend_url}, project {result['project']} with {result['tasks']} tasks; "
          f"logs in {stack.data / 'logs'}")
    if args.detach:
        print(f"running in the background: `toothseg stack down --data {args.data}` stops it")
        return 0
    print("Ctrl-C stops the stack")
    try:
        while all(stack.status().values()):
            time.sleep(2)
        print("a service exited:", {k: v for k, v in stack.status().items() if not v}, file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        stack.down()
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    import shlex

    from training.simulate import run_from_args

    run_from_args(args, shlex.join(["toothseg", *args.argv]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toothseg", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write synthetic panoramic X-rays with ground truth")
    p.add_argument("--n", type=int, default=20, help="number of images (default 20)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--size", type=_size, default=(1024, 512), help="WIDTHxHEIGHT (default 1024x512)")
    p.add_argument("--url-prefix", default="",
                   help="prefix of the image URLs in the Label Studio tasks, e.g. "
                        "'/data/local-files/?d=synth/' (default: none, paths relative to --out)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)

    from training.pretrain import DEFAULTS, SHIPPED

    p = sub.add_parser("pretrain", help="pretrain the detector on synthetic panoramics (the first training's start)")
    p.add_argument("--out", default=str(SHIPPED), help=f"weights file (default: the shipped one, {SHIPPED.name}); "
                                                       "its record goes next to it (.json)")
    p.add_argument("--images", type=int, default=DEFAULTS["images"],
                   help=f"synthetic panoramics (default {DEFAULTS['images']})")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help=f"first image seed (default {DEFAULTS['seed']})")
    p.add_argument("--size", type=_size, default=DEFAULTS["size"], help="WIDTHxHEIGHT (default 512x512)")
    p.add_argument("--imgsz", type=int, default=DEFAULTS["imgsz"],
                   help=f"training size (default {DEFAULTS['imgsz']})")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"],
                   help=f"optimizer steps (default {DEFAULTS['steps']}: about 30 min on 2 cores)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("label-config", help="print the labeling config (label_studio_config.xml)")
    p.set_defaults(func=cmd_label_config)

    p = sub.add_parser("models", help="model registry: list | show VERSION | rollback VERSION | plot")
    p.add_argument("action", choices=("list", "show", "rollback", "plot"))
    p.add_argument("version", nargs="?", help="a version name (show, rollback)")
    p.add_argument("--project", help="Label Studio project id (default: the only project with models)")
    p.add_argument("--out", help="plot: PNG path (default toothseg-project<ID>-history.png)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("report", help="annotator work per model version: actions and seconds per image")
    p.add_argument("--project", required=True, help="Label Studio project id")
    p.add_argument("--export", action="store_true",
                   help="measure from Label Studio's export now instead of the worker's records")
    p.add_argument("--plot", help="also write a PNG of actions and seconds per image against version")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("status", help="queues, running jobs (stage, progress), current models")
    p.add_argument("--queue", action="append", default=[], help="another RQ queue to show")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("train", help="retrain a project: queue a job (as START_TRAINING does), or --now here")
    p.add_argument("--project", required=True, help="Label Studio project id")
    p.add_argument("--now", action="store_true", help="run the retraining here instead of queueing it")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("preannotate", help="pre-annotate every task without annotations with the current model")
    p.add_argument("--project", required=True, help="Label Studio project id")
    p.add_argument("--now", action="store_true", help="run here instead of queueing it for the worker")
    p.add_argument("--limit", type=int, help="--now: at most this many tasks")
    p.set_defaults(func=cmd_preannotate)

    p = sub.add_parser("bootstrap", help="wire Label Studio to the backend (idempotent; settings from the environment)")
    p.add_argument("--wait", type=float, default=300, help="seconds to wait for Label Studio (default 300)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("stack", help="run the docker-compose services as local processes: up | down | status")
    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--data", default="stack-data", help="state, models and logs (default ./stack-data)")
    p.add_argument("--images", help="images folder imported into Label Studio (default <data>/images)")
    p.add_argument("--detach", action="store_true", help="up: return once everything runs")
    p.set_defaults(func=cmd_stack)
    p = sub.add_parser("simulate", help="label efficiency of the loop with a simulated oracle, and ablations")
    add_simulate_arguments(p)
    p.set_defaults(func=cmd_simulate)
    register_dataset_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command line as given, for reports that print how they were made
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (CLIError, ValueError, OSError) as exc:
        print(f"toothseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"toothseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # `python -m training.ops.cli`
    raise SystemExit(main())
