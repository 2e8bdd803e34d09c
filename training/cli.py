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


class CLIError(Exception):
    """An expected failure: printed as one line, exit code 2."""


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1024x512, got {text!r}") from None
    if w < 64 or h < 64:
        raise argparse.ArgumentTypeError(f"image size {w}x{h} is too small (at least 64x64)")
    return w, h


def cmd_synth(args: argparse.Namespace) -> int:
    from training.synth import write_dataset

    summary = write_dataset(Path(args.out), n=args.n, seed=args.seed, size=args.size,
                            progress=not args.quiet, url_prefix=args.url_prefix)
    print(summary)
    return 0


def cmd_label_config(args: argparse.Namespace) -> int:
    from backend.label_config import render_label_config

    sys.stdout.write(render_label_config())
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

    p = sub.add_parser("label-config", help="print the labeling config (label_studio_config.xml)")
    p.set_defaults(func=cmd_label_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
