"""Label efficiency of the annotation loop with a simulated oracle, and ablations of the paper's
changes (training/simulate.py describes the experiment).

    .venv/bin/python bench/bench_loop.py            # default preset: 19.3 min measured on 2 CPU cores
    .venv/bin/python bench/bench_loop.py --smoke    # tiny 1-epoch run, under a minute
    .venv/bin/python bench/bench_loop.py --full --device cuda   # the paper's protocol, on a GPU

Writes bench/results/loop.md (loop-smoke.md, loop-full.md) with the per-round and ablation tables
and a summary, and the plot of IA and instance Dice against oracle work next to it (.png).
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
