"""`python -m mythos_train plan`: will this config fit, how fast will it run, and what to change if it does not."""

from __future__ import annotations

import argparse
import json
import sys

from mythos_train.config import ConfigError, load_config
from mythos_train.planner.hardware import ACCELERATORS
from mythos_train.planner.plan import alternatives, build_plan
from mythos_train.planner.report import render, to_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mythos-train plan",
        description="Per-GPU memory, communication and speed of a config on a cluster, and what to change if it does not fit.",
        epilog="Any --section.field=value overrides the config, e.g. --parallel.ep=16 --train.micro_batch_size=2. "
        "Exit status: 0 fits, 1 does not fit, 2 bad input.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="TOML job config")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", default="h100", help=f"one of {', '.join(ACCELERATORS)}")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--no-alternatives", action="store_true", help="skip the search for configs that fit")
    parser.add_argument(
        "--write-gbps", type=float, default=1.0, help="checkpoint write bandwidth per rank, GB/s (default 1)"
    )
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, overrides)
        if args.nodes < 1 or args.gpus_per_node < 1 or args.write_gbps <= 0:
            raise ConfigError("--nodes and --gpus-per-node must be >= 1, --write-gbps > 0")
        plan = build_plan(cfg, args.nodes, args.gpus_per_node, args.gpu)
        alts = None if args.no_alternatives else alternatives(cfg, args.nodes, args.gpus_per_node, args.gpu)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        json.dumps(to_json(plan, cfg, alts), indent=1)
        if args.json
        else render(plan, cfg, args.config, alts, args.write_gbps)
    )
    return 0 if plan.fits else 1
