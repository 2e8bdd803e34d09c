"""Cold start and label efficiency of the annotation loop with a simulated oracle, with the
product's training defaults (training/simulate.py describes the experiment).

    .venv/bin/python bench/bench_loop.py --work bench/.cache/sim   # 3 seeds, about 100 min each on 2 CPU cores
    .venv/bin/python bench/bench_loop.py --no-loop --rescore --work bench/.cache/sim-cold-v2  # kept models again
    .venv/bin/python bench/bench_loop.py --smoke                   # mechanics check, about a minute
    .venv/bin/python bench/bench_loop.py --full --device cuda      # the paper's training preset, on a GPU

Writes bench/results/loop.md (loop-smoke.md, loop-full.md): the cold-start table (8 and 20
annotated images, each small-data change switched off in turn), the loop per round and strategy
with its control and the fully supervised reference, and the oracle actions each strategy needs
to reach 0.98x of the reference; the plot of IA and instance Dice against oracle work next to it
(.png). With --work, each seed's results are kept there and a rerun reuses them; with --rescore
as well, the test figures of the kept cold-start models are measured again by the current
prediction code (for a change of pre-annotation only: nothing is retrained).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_VERBOSE", "False")

from bench_predict import machine  # noqa: E402

from training.simulate import add_arguments, run_from_args  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, REPO / "bench" / "results")
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "bench/bench_loop.py", *sys.argv[1:]])
    run_from_args(args, command, machine())


if __name__ == "__main__":
    main()
