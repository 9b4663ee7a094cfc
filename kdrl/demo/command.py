"""The bundle's command line, declared once: ``python -m kdrl.demo`` and ``kdrl prepare-demo``."""
from __future__ import annotations

import argparse

from kdrl.data import bundled_data_dir
from kdrl.demo.bundle import prepare_demo
from kdrl.demo.specs import ROLES, SCALES

DESCRIPTION = "rebuild the bundled task data and tiny teacher/student"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=str(bundled_data_dir().parent))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 on a busy machine)")
    parser.add_argument("--roles", nargs="+", choices=ROLES, default=list(ROLES),
                        help="models to (re)train; the others are kept from --out (same seed and scale)")


def run(args: argparse.Namespace) -> int:
    prepare_demo(args.out, seed=args.seed, scale=args.scale, threads=args.threads, roles=tuple(args.roles),
                 log=lambda line: print(line, flush=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdrl.demo", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
