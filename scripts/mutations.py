#!/usr/bin/env python
"""Switch each protection off in turn and run the test that names it: the test must fail.

    .venv/bin/python scripts/mutations.py            # every mutation (about 20 minutes on 2 cores)
    .venv/bin/python scripts/mutations.py routes cas # some of them, by name (the table then lists those)

First the named tests run with every protection on and must pass. Then each mutation replaces one snippet of production code (which must occur exactly once) with a
version that disables the protection, runs the named tests with pytest, and restores the file
whatever happens. A protection is "caught" when its tests fail with it switched off. The results
go to the "Mutations" section of bench/results/hardening.md (the scenario section is the test
session's). Run it on a clean work tree: it edits files in place while it runs.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


@dataclass(frozen=True)
class Mutation:
    name: str
    protection: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


FD, IMG, SEC, RQ, PROMO = "backend/front_door.py", "backend/images.py", "backend/security.py", \
    "backend/retrain_queue.py", "backend/registry.py"
EVAL, IDLE = "training/evaluate.py", "training/idle.py"
T_FD, T_HARD, T_RQ, T_TRAIN = "tests/test_front_door.py", "tests/test_hardening.py", "tests/test_retrain_queue.py", \
    "tests/test_training.py"
T_IDLE = "tests/test_idle_training.py"
SAM, T_SAM = "backend/sam.py", "tests/test_sam.py"

MUTATIONS = [
    Mutation("routes", "only toothseg's four routes are served (label-studio-ml's /train, /versions, ... are 404)",
             FD, 'return _refuse(start_response, 404, f"no such route: {method} {path}", body_pending)',
             "return self.app(environ, start_response)", (f"{T_FD}::test_only_toothseg_routes_are_served",)),
    Mutation("project-id", "project ids are digits with an optional .timestamp", "backend/registry.py",
             r'_PROJECT = re.compile(r"^([0-9]{1,18})(?:\.[0-9]{1,18})?$")',
             r'_PROJECT = re.compile(r"^([0-9]{1,18})(?:\..*)?$")',
             (f"{T_FD}::test_project_ids_are_digits_and_an_optional_timestamp",)),
    Mutation("basic-auth", "basic auth on every route but /health", FD,
             "if path not in OPEN_ROUTES and self.user and not self._authorized(environ):",
             "if path not in OPEN_ROUTES and self.user and False:", (f"{T_HARD}::test_basic_auth",)),
    Mutation("both-credentials", "user and password are both compared, always (no shortcut)", FD,
             "        user_ok, password_ok = _same(user, self.user), _same(password, self.password)  # both, always\n"
             "        return user_ok and password_ok",
             "        return _same(user, self.user) and _same(password, self.password)",
             (f"{T_FD}::test_credentials_are_checked_as_bytes_and_both_always",)),
    Mutation("bytes-credentials", "credentials are compared as bytes (non-ASCII ones are a 401, not a 500)", FD,
             'user, _, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")',
             'user, _, password = (x.encode() if x.isascii() else x for x in base64.b64decode(encoded.strip(), '
             'validate=True).decode("latin-1").partition(":"))',
             (f"{T_FD}::test_credentials_are_checked_as_bytes_and_both_always",)),
    Mutation("webhook-secret", "/webhook needs WEBHOOK_SECRET's header", FD,
             'if path == "/webhook" and self.secret and \\', 'if path == "/webhook" and self.secret and False and \\',
             (f"{T_HARD}::test_webhook_secret",)),
    Mutation("length-cap", "a Content-Length over MAX_REQUEST_BYTES is refused before the body is read", FD,
             "            if size > limit:\n                return None\n            return stream.read(size) if size else b\"\"",
             "            body = stream.read(size) if size else b\"\"\n            return None if size > limit else body",
             (f"{T_FD}::test_bodies_are_capped_before_they_are_read",)),
    Mutation("chunked-cap", "a chunked body is refused as soon as it passes MAX_REQUEST_BYTES", FD,
             "            if total > limit:\n                return None\n            parts.append(part)",
             "            parts.append(part)",
             (f"{T_FD}::test_bodies_are_capped_before_they_are_read",)),
    Mutation("json-500", "an exception that escapes the app is a JSON 500 without a traceback", FD,
             "        try:\n            return self.app(environ, start_response)\n        except Exception as exc:",
             "        try:\n            return self.app(environ, start_response)\n        except KeyboardInterrupt as exc:",
             (f"{T_FD}::test_an_error_that_escapes_the_app_is_a_json_500_without_traceback",)),
    Mutation("download-deadline", "DOWNLOAD_TIMEOUT is for the whole download", IMG,
             "                            if time.monotonic() > deadline:\n                                raise timed_out\n",
             "", (f"{T_FD}::test_download_timeout_is_for_the_whole_download",)),
    Mutation("setup-hostname", "/setup's hostname counts only if it is LABEL_STUDIO_URL's or an allowlisted origin",
             IMG, '            return hostname\n        return ""\n', '            return hostname\n        return hostname\n',
             (f"{T_FD}::test_without_label_studio_url_setup_names_no_host",
              f"{T_FD}::test_hostname_from_setup_is_trusted_only_when_configured")),
    Mutation("token-to-label-studio", "the token goes to Label Studio's origin only", IMG,
             "headers = self.auth_headers() if self._is_label_studio(url) else {}", "headers = self.auth_headers()",
             (f"{T_FD}::test_token_goes_to_label_studio_only",)),
    Mutation("allowlist-origins", "allowlist entries are origins (scheme, host, port), not bare hosts", IMG,
             "return o is not None and (o == origin(self.base_url) or o in self.allowlist)",
             "return o is not None and (o == origin(self.base_url) or any(o[1] == a[1] for a in self.allowlist))",
             (f"{T_FD}::test_allowlist_entries_are_origins",)),
    Mutation("hop-deadline", "each redirect hop waits only for what is left of DOWNLOAD_TIMEOUT", IMG,
             "                left = deadline - time.monotonic()\n", "                left = seconds\n",
             (f"{T_FD}::test_download_timeout_is_for_the_whole_download",)),
    Mutation("no-key-to-setup-host", "LABEL_STUDIO_API_KEY never goes to a host that /setup named", IMG,
             '(access_token if named else "")', '(settings.label_studio_api_key or access_token if named else "")',
             (f"{T_FD}::test_token_goes_to_label_studio_only",)),
    Mutation("refresh-errors", "a failed token refresh is a 502 ImageError, not a crash of the request", IMG,
             "except (httpx.HTTPError, ValueError) as exc:", "except KeyError as exc:",
             (f"{T_FD}::test_a_token_refresh_that_fails_is_a_clear_error",)),
    Mutation("json-for-lsml-errors", "errors label-studio-ml answers as text (FileNotFoundError, ...) are JSON",
             "backend/app.py", "for specific in (Exception, *_LABEL_STUDIO_ML_HANDLED):", "for specific in (Exception,):",
             (f"{T_FD}::test_errors_label_studio_ml_would_answer_as_text_are_json",)),
    Mutation("ignored-hosts-bounded", "hostnames /setup sent that are ignored are remembered bounded", "backend/app.py",
             "if shown not in cls._ignored and len(cls._ignored) < cls._IGNORED_MAX:",
             "if hostname not in cls._ignored:\n                shown = hostname",
             (f"{T_FD}::test_ignored_setup_hostnames_are_remembered_bounded",)),
    Mutation("latin-1-secret", "the webhook secret is compared as the bytes the client sent", FD,
             '.encode("latin-1", "replace")', '.encode("utf-8", "surrogateescape")',
             (f"{T_FD}::test_a_non_ascii_webhook_secret_matches",)),
    Mutation("pillow-guard", "Pillow's decompression-bomb guard stays on in the process", IMG,
             '_DEFAULT_PORTS = {"http": 80, "https": 443}\n',
             '_DEFAULT_PORTS = {"http": 80, "https": 443}\nImage.MAX_IMAGE_PIXELS = None\n',
             (f"{T_FD}::test_pillow_keeps_its_own_guard",)),
    Mutation("traceback-redaction", "tracebacks in the log are redacted", SEC,
             "            record.exc_text = redact(record.exc_text)", "            pass",
             (f"{T_HARD}::test_tracebacks_are_redacted_too",)),
    Mutation("header-redaction", "secret headers in the log (label-studio-ml's DEBUG dump) are redacted", SEC,
             '    (re.compile(r"(?im)^([\\w-]*(?:secret|token|api-key|password)[\\w-]*:[ \\t]*)\\S.*$"), r"\\1***"),\n',
             "", (f"{T_HARD}::test_secret_headers_logged_by_label_studio_ml_are_redacted",)),
    Mutation("enqueue-grace", "an entry whose job is being enqueued is not taken for stale (no second job)", RQ,
             "if status in LIVE_STATUSES or (status is None and _age_s(job_id) < ENQUEUE_GRACE_S):",
             "if status in LIVE_STATUSES:",
             (f"{T_RQ}::test_an_entry_being_enqueued_is_not_taken_for_stale",)),
    Mutation("atomic-release", "a stale retrain-queue entry is released with compare-and-delete", RQ,
             "        return bool(self._release_script(keys=[project_redis_key(project, \"active\")], args=[job_id]))",
             "        return bool(self.redis.delete(project_redis_key(project, \"active\")))",
             (f"{T_RQ}::test_a_stale_entry_is_released_atomically",)),
    Mutation("now-lock", "`toothseg train --now` takes the project's retrain lock", "training/ops/cli.py",
             "            busy = queue.claim(project, job_id)", "            busy = None",
             (f"{T_RQ}::test_train_now_takes_the_project_lock",)),
    Mutation("current-cas", "promotion compares and swaps CURRENT (a rollback during training wins)", PROMO,
             "        if expected is not _ANY and previous != expected:", "        if False:",
             (f"{T_TRAIN}::test_promotion_loses_to_a_rollback_made_during_training",)),
    Mutation("staged-version", "a version is written under a temporary name and renamed when complete", PROMO,
             'staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=base))',
             'staging = base / version; staging.mkdir()',
             (f"{T_TRAIN}::test_killed_training_leaves_the_current_model_untouched",)),
    Mutation("first-model-gate", "a first model must show that it saves work to be promoted", EVAL,
             "    if candidate.usable > 0 and _sign_test(candidate.usable, candidate.stray) < alpha:", "    if True:",
             (f"{T_TRAIN}::test_gate_first_model_must_show_that_it_saves_work",)),
    Mutation("first-model-costs", "a first model whose validation shows more stray regions than teeth is not "
             "promoted, whatever its training images show", EVAL,
             "    if _sign_test(candidate.stray, candidate.usable) < alpha:\n        return False\n", "",
             (f"{T_TRAIN}::test_gate_first_model_whose_validation_cannot_decide_is_judged_on_its_training_images",)),
    Mutation("first-model-fit", "a first model its validation cannot judge is promoted only if it identifies its "
             "training teeth", EVAL,
             "    learned = (fit.identified >= FIT_MIN_IDENTIFIED * fit.teeth",
             "    learned = True or (fit.identified >= FIT_MIN_IDENTIFIED * fit.teeth",
             (f"{T_TRAIN}::test_gate_first_model_whose_validation_cannot_decide_is_judged_on_its_training_images",
              f"{T_TRAIN}::test_gate_weights_judges_a_first_model_on_its_training_images_when_validation_cannot")),
    Mutation("idle-retrain-first", "an idle round stops at once when the project's annotations warrant a retrain",
             IDLE, "        if requested or changed >= self.queue.min_new:\n            return \"retrain\"",
             "        if False:\n            return \"retrain\"",
             (f"{T_IDLE}::test_a_retrain_request_stops_a_running_round_at_once_and_the_retrain_takes_the_project",)),
    Mutation("idle-yields", "an idle round stops when another job waits, and runs again after it", IDLE,
             "        if others_waiting(self.conn, self.settings):", "        if False:",
             (f"{T_IDLE}::test_a_waiting_job_goes_first_and_the_stopped_round_runs_again_after_it",)),
    Mutation("idle-superseded", "a round queued before a newer chain does not run", IDLE,
             "        if (self.conn.get(_idle_key(project)) or b\"\").decode() != job.id:",
             "        if False:",
             (f"{T_IDLE}::test_idle_rounds_chain_while_promoted_up_to_the_setting_and_end_at_the_first_rejection",)),
    Mutation("idle-stops-unpromoted", "a round not promoted ends the chain", IDLE,
             '        elif summary["status"] == "promoted":', "        elif True:",
             (f"{T_IDLE}::test_idle_rounds_chain_while_promoted_up_to_the_setting_and_end_at_the_first_rejection",)),
    Mutation("idle-stores-nothing", "an interrupted round stores no version", "training/jobs.py",
             '    if result.stopped_by == "interrupted" or stop():',
             "    if False:", (f"{T_IDLE}::test_an_interrupted_round_stops_its_training_and_stores_nothing",)),
    Mutation("sam-agreement", "SAM's mask replaces the other only where the two agree (SAM_MIN_AGREEMENT)", SAM,
             "if sam_iou[i] >= min_iou and _mask_iou(sam_masks[i], masks[i]) >= min_agreement:",
             "if sam_iou[i] >= min_iou:",
             (f"{T_SAM}::test_refine_takes_sams_mask_where_it_agrees_and_keeps_the_detectors_elsewhere",)),
    Mutation("sam-min-iou", "SAM's mask replaces the other only where SAM is sure of it (SAM_MIN_IOU)", SAM,
             "if sam_iou[i] >= min_iou and _mask_iou(sam_masks[i], masks[i]) >= min_agreement:",
             "if _mask_iou(sam_masks[i], masks[i]) >= min_agreement:",
             (f"{T_SAM}::test_refine_takes_sams_mask_where_it_agrees_and_keeps_the_detectors_elsewhere",)),
    Mutation("lite-medsam-input", "LiteMedSAM gets its input min-max scaled, as it was trained", SAM,
             "        x = (x - lo) / (hi - lo).clamp(min=1e-8)\n",
             "        x = (x - torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)) / 58.0\n",
             (f"{T_SAM}::test_a_box_on_a_tooth_gives_that_tooth",)),
    Mutation("embedding-key", "a cached embedding is used only by the model and checkpoint that made it", SAM,
             '        return f"{image_sha1}-{self.checkpoint_id}"', "        return image_sha1",
             (f"{T_SAM}::test_a_new_process_reuses_the_embedding_on_disk_and_a_torn_file_is_rewritten",)),
    Mutation("torn-embedding", "a torn embedding file is ignored and computed again", SAM,
             "            except Exception as exc:  # a torn or foreign file: recompute",
             "            except ZeroDivisionError as exc:  # a torn or foreign file: recompute",
             (f"{T_SAM}::test_a_new_process_reuses_the_embedding_on_disk_and_a_torn_file_is_rewritten",)),
    Mutation("tile-offset", "a box prompted on a tile is moved into the tile's coordinates", SAM,
             "m, iou = self.decode_boxes(boxes[members] - np.array([x0, y0, x0, y0], dtype=float))",
             "m, iou = self.decode_boxes(boxes[members])",
             (f"{T_SAM}::test_tiles_put_each_mask_back_where_its_tooth_is",)),
    Mutation("sam-preannotate", "SAM redraws pre-annotations only with SAM_PREANNOTATE", "backend/pipeline.py",
             '"fallback_score": settings.score_fallback, "use_sam": settings.sam_preannotate,',
             '"fallback_score": settings.score_fallback,',
             (f"{T_SAM}::test_pre_annotations_use_sam_only_with_sam_preannotate",)),
    Mutation("click-box", "a click for a SAM trained on boxes alone prompts it with the detected box under it",
             "backend/model.py", "        if box is None and refiner.boxes_only:", "        if False:",
             ("tests/test_backend_http.py::test_interactive_keypoint_prompts_sam",)),
    Mutation("preannotate-leftovers", "the background pass finishes a task a killed pass left half replaced",
             "training/preannotate.py", "    for task_id, olds in leftovers.items():",
             "    for task_id, olds in {}.items():", ("tests/test_e2e_preannotate.py::test_background_preannotation",)),
    Mutation("batch-fallback", "a /predict of more tasks than PREDICT_BATCH_LIMIT gets Label Studio's one-at-a-time "
             "fallback", "backend/app.py", "    if not context and 0 < limit < len(tasks):", "    if False:",
             ("tests/test_e2e_stack.py::test_the_loop_end_to_end",)),
    Mutation("load-retry", "a version that failed to load for want of memory is tried again", "backend/runtime.py",
             "                    if not transient:", "                    if True:",
             (f"{T_TRAIN}::test_a_version_that_failed_to_load_for_want_of_memory_is_retried",)),
]


def run(mutation: Mutation, timeout: float) -> tuple[str, float, str]:
    """Apply `mutation`, run its tests, restore the file: ("caught" | "MISSED" | "error", seconds, detail)."""
    path = REPO / mutation.file
    original = path.read_text()
    if original.count(mutation.old) != 1:
        return "error", 0.0, f"snippet found {original.count(mutation.old)} times in {mutation.file}"
    start = time.perf_counter()
    try:
        path.write_text(original.replace(mutation.old, mutation.new))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "--no-header", "-p", "no:randomly",
                               *mutation.tests], cwd=REPO, capture_output=True, text=True, timeout=timeout)
        tail = (proc.stdout.strip().splitlines() or [""])[-1]
        return ("caught" if proc.returncode == 1 else "MISSED" if proc.returncode == 0 else "error",
                time.perf_counter() - start, tail)
    except subprocess.TimeoutExpired:
        return "caught (timed out)", time.perf_counter() - start, f"over {timeout:.0f} s"
    finally:
        path.write_text(original)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"mutations to run (default all: {', '.join(m.name for m in MUTATIONS)})")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation's test run")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    from conftest import MUTATION_HEADING, write_section

    # first, every protection on: the tests must pass, else a failure below proves nothing
    tests = sorted({t for m in chosen for t in m.tests})
    start = time.perf_counter()
    base = subprocess.run([sys.executable, "-m", "pytest", "-q", "--no-header", "-p", "no:randomly", *tests],
                          cwd=REPO, capture_output=True, text=True, timeout=args.timeout * 2)
    baseline = (base.stdout.strip().splitlines() or [""])[-1]
    print(f"baseline (no mutation): {baseline} in {time.perf_counter() - start:.0f} s", flush=True)
    if base.returncode != 0:
        print(base.stdout[-3000:], file=sys.stderr)
        print("the tests fail with every protection on: fix them first", file=sys.stderr)
        return 2
    rows = []
    for m in chosen:
        result, seconds, detail = run(m, args.timeout)
        print(f"{m.name}: {result} in {seconds:.0f} s ({detail})", flush=True)
        tests = ", ".join(f"`{t.split('::')[-1]}`" for t in m.tests)
        rows.append(f"| {m.protection} | `{m.file}` | {tests} | {result} |")
    lines = [MUTATION_HEADING, "", f"Written by `{' '.join(['.venv/bin/python', 'scripts/mutations.py', *sys.argv[1:]])}`:"
             " each protection switched off in turn (its code replaced, `scripts/mutations.py` lists the snippets), "
             f"its tests run; caught = they failed. With every protection on, the same tests: {baseline}.", "",
             "| protection | where | tests | with the protection off |", "|---|---|---|---|", *rows]
    from conftest import HARDENING_TABLE

    write_section(HARDENING_TABLE, MUTATION_HEADING, "\n".join(lines))
    print(f"wrote the mutation section of {HARDENING_TABLE}")
    return 0 if all(r.endswith("| caught |") or "caught (timed out)" in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
