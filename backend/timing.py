"""Wall-clock time per named stage, for logs and benchmarks."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator


class StageTimer:
    """Accumulates seconds per stage: `with timer.stage("detector"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def summary(self) -> str:
        """"detector 41 ms, sam_decoder 1200 ms, ..." in stage order."""
        return ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in self.seconds.items())
