"""Annotator work per model version, measured the way `toothseg report` measures a real project: the
native stack (Label Studio, backend, worker, Redis) with the product's defaults, a synthetic
annotator, and two retrains that the annotators' own webhooks start.

    .venv/bin/python bench/bench_annotator_work.py   # about 35 min on 2 CPU cores

1. A new project: 8 synthetic panoramics annotated (ground truth) and a pool of unannotated ones.
2. Round 0, before any model: the annotator draws PER_ROUND pool images from scratch.
3. Those annotations reach RETRAIN_MIN_NEW_ANNOTATIONS (= PER_ROUND) through the webhooks: the
   worker retrains, the gate promotes, the pool is pre-annotated in the background.
4. Rounds 1 and 2: the annotator starts PER_ROUND images from the current version's predictions
   and submits the ground truth (`parent_prediction` set, as the editor sets it); each round's
   webhooks start the next retrain.
The synthetic annotator's `lead_time` is a clock model, not a measurement: 4 s per tooth it
checks and keeps, 8 s per tooth it renumbers or deletes, 30 s per tooth it draws or redraws
(the oracle's counts of `training.oracle`). The actions are what the worker measured.

Writes bench/results/annotator-work.md (the `toothseg report` table) and annotator-work.png
(`toothseg report --plot`), which README shows.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bench_predict import machine  # noqa: E402
from conftest import gt_result, wait_for  # noqa: E402

SECONDS = {"accepted": 4.0, "relabeled": 8.0, "deleted": 8.0, "redrawn": 30.0, "added": 30.0}
"""The synthetic annotator's clock per tooth, by what the oracle did to it."""
TOKEN = "bench-annotator-work-token-01"


def clock(prediction, sample) -> float:
    """The synthetic annotator's seconds for turning `prediction` (None: nothing) into `sample`'s truth."""
    from backend.formats import result_image_size, tooth_regions
    from backend.instance import Instance
    from training.oracle import oracle_count

    result = prediction.result if prediction is not None else []
    regions = [Instance(m, label) for label, m in tooth_regions(result, *(result_image_size(result) or (None, None)))]
    count = oracle_count(regions, sample.masks())
    return sum(SECONDS[kind] * getattr(count, kind) for kind in SECONDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(REPO / "bench" / ".cache" / "annotator-work"))
    parser.add_argument("--seeds", type=int, default=8, help="annotated images the project starts with")
    parser.add_argument("--per-round", type=int, default=6,
                        help="images annotated per round (= RETRAIN_MIN_NEW_ANNOTATIONS)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds after the from-scratch one (one retrain each)")
    parser.add_argument("--size", default="1000x500")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "annotator-work.md"))
    args = parser.parse_args()

    import cv2
    import torch
    from label_studio_sdk import LabelStudio

    from backend.registry import Registry
    from backend.sam import SAM_BUILDERS
    from training.annotator_work import WorkStore
    from training.data.synth import generate
    from training.ops.stack import Stack

    started = time.monotonic()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    images, seed_dir = work / "files" / "images", work / "files" / "seed"
    images.mkdir(parents=True)
    seed_dir.mkdir(parents=True)
    width, height = (int(v) for v in args.size.split("x"))
    pool = args.per_round * (args.rounds + 1)
    samples = {}
    for i in range(args.seeds + pool):
        name = f"{'seed' if i < args.seeds else 'pool'}_{i:02d}.png"
        samples[name] = generate(7000 + i, (width, height))
        cv2.imwrite(str((seed_dir if i < args.seeds else images) / name), samples[name].image)
    sam = work / "sam_vit_tiny.pth"  # no official checkpoint can be downloaded here: random weights
    torch.save(SAM_BUILDERS["vit_tiny"](checkpoint=None).state_dict(), sam)
    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    env = {"LABEL_STUDIO_PORT": ports[0], "BACKEND_PORT": ports[1], "REDIS_PORT": ports[2],
           "LABEL_STUDIO_USER_TOKEN": TOKEN, "YOLO_WEIGHTS": "", "SAM_CHECKPOINT": sam, "SAM_MODEL_TYPE": "vit_tiny",
           "RETRAIN_MIN_NEW_ANNOTATIONS": args.per_round, "TRAIN_AFTER_ANNOTATIONS": 0, "YOLO_VERBOSE": "False"}
    stack = Stack(data=work / "stack", images=images, env={k: str(v) for k, v in env.items()},
                  ls_venv=REPO / ".venv-ls")
    rounds = []
    try:
        boot = stack.up()
        project = boot["project"]
        client = LabelStudio(base_url=stack.label_studio_url, api_key=TOKEN)
        client.import_storage.local.create(project=project, path=str(seed_dir), use_blob_urls=True, title="seed")
        seeds = sorted(n for n in samples if n.startswith("seed"))
        client.projects.import_tasks(id=project, request=[
            {"data": {"image": f"/data/local-files/?d=seed/{n}"},
             "annotations": [{"result": gt_result(samples[n]), "ground_truth": True}]} for n in seeds])
        registry, store = Registry(stack.data / "models"), WorkStore(stack.data / "models")
        annotated = 0
        for r in range(args.rounds + 1):
            versions_before = len(registry.versions(project))
            version = registry.current_version(project)
            todo = sorted((t for t in client.tasks.list(project=project) if not t.total_annotations),
                          key=lambda t: t.id)[:args.per_round]
            predictions = {p.task: p for p in client.predictions.list(project=project)
                           if version and p.model_version == version}
            if version:
                wait_for(f"the pass of {version}", lambda: {t.id for t in todo} <= {
                    p.task for p in client.predictions.list(project=project) if p.model_version == version}, 900, 3)
                predictions = {p.task: p for p in client.predictions.list(project=project)
                               if p.model_version == version}
            for task in todo:
                sample = samples[task.data["image"].rsplit("/", 1)[-1]]
                prediction = predictions.get(task.id)
                extra = {"parent_prediction": prediction.id} if prediction is not None else {}
                client.annotations.create(id=task.id, result=gt_result(sample),
                                          lead_time=clock(prediction, sample), project=project, **extra)
            annotated += len(todo)
            wait_for("the worker's records", lambda: len(store.records(project)) == annotated, 600, 3)
            rounds.append((r, version or "from scratch", len(todo)))
            print(f"round {r}: {len(todo)} images annotated from {version or 'scratch'} "
                  f"({time.monotonic() - started:.0f} s)", flush=True)
            if r < args.rounds:  # this round's webhooks started a retrain: wait for its outcome
                wait_for("the retrain", lambda: len(registry.versions(project)) > versions_before, 1800, 5)
        _, cli_env = stack.services()["worker"]
        png = Path(args.out).with_suffix(".png")
        report = subprocess.run([sys.executable, "-m", "training.ops.cli", "report", "--project", str(project),
                                 "--plot", str(png)], cwd=REPO, env=cli_env, capture_output=True, text=True,
                                timeout=600, check=True).stdout
        history = subprocess.run([sys.executable, "-m", "training.ops.cli", "models", "list", "--project",
                                  str(project)], cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=600,
                                 check=True).stdout
    finally:
        stack.down()
    command = shlex.join([".venv/bin/python", "bench/bench_annotator_work.py", *sys.argv[1:]])
    lines = ["# Annotator work per model version (native stack, synthetic annotator)", "",
             f"Command: `{command}` ({time.monotonic() - started:.0f} s). Machine: {machine()}.", "",
             f"{args.seeds} annotated {args.size} panoramics to start; {args.per_round} images per round, the first "
             f"drawn from scratch, then from the current version's predictions; each round's webhooks start a "
             f"retrain (RETRAIN_MIN_NEW_ANNOTATIONS={args.per_round}) with the product's training defaults from "
             f"scratch (no starting weights can be downloaded here) and a random-weight vit_tiny SAM. Actions: "
             f"what the worker measured per annotation. lead_time: the synthetic annotator's clock "
             f"({', '.join(f'{k} {v:g} s' for k, v in SECONDS.items())} per tooth), not people's seconds.", "",
             "| round | pre-annotation from | images |", "|---|---|---|",
             *[f"| {r} | {v} | {n} |" for r, v, n in rounds], "",
             "`toothseg report`:", "", "```", report.strip(), "```", "", "`toothseg models list`:", "", "```",
             history.strip(), "```", "", f"![annotator work per version]({png.name})", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
