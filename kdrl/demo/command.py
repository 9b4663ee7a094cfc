"""``python -m kdrl.demo``: build the bundle (``kdrl prepare-demo`` is the same command)."""
from __future__ import annotations

import argparse

from kdrl.data import bundled_data_dir
from kdrl.demo.bundle import prepare_demo
from kdrl.demo.specs import ROLES, SCALES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdrl.demo", description=__doc__)
    ap.add_argument("--out", default=str(bundled_data_dir().parent))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 on a busy machine)")
    ap.add_argument("--roles", nargs="+", choices=ROLES, default=list(ROLES),
                    help="models to (re)train; the others are kept from --out")
    args = ap.parse_args(argv)
    prepare_demo(args.out, seed=args.seed, scale=args.scale, threads=args.threads, roles=tuple(args.roles),
                 log=lambda s: print(s, flush=True))
    return 0
