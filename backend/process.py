"""Settings of the running process, for the backend, the worker, training and the benches alike:
torch's CPU threads, and the scheduling priority of background work."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def set_torch_threads(threads: int = 0) -> int:
    """Use `threads` (0: all cores) torch CPU threads, also for ultralytics, which otherwise resets
    torch to cores - 1 whenever it selects a device."""
    import ultralytics.utils.torch_utils as torch_utils

    n = threads if threads > 0 else (os.cpu_count() or 1)
    torch_utils.NUM_THREADS = n
    torch.set_num_threads(n)
    return n


def lower_priority(nice: int) -> None:
    """Nice this process and its session's autogroup. With Linux autogroup scheduling (enabled by
    many distributions' kernels: /proc/sys/kernel/sched_autogroup_enabled), niceness only ranks
    processes within one session, and the worker and the backend run in different sessions: the
    autogroup's own niceness is what makes the backend win the CPU. It stays on the worker's
    session (training jobs included) until the worker restarts: background work yields to
    interactive requests, and runs at full speed when nothing else wants the CPU. In Docker each
    container is its own cgroup: compose gives the worker a lower cpu_shares for the same effect."""
    if nice <= 0:
        return
    os.nice(nice)
    try:
        path = Path("/proc/self/autogroup")
        current = int(path.read_text().split("nice")[-1])  # "/autogroup-47 nice 0"
        if current < nice:
            with open(path, "w") as f:
                f.write(str(nice))
    except (OSError, ValueError) as exc:  # no autogroup support, or not permitted
        logger.debug("autogroup niceness not set: %s", exc)
