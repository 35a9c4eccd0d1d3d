"""`python -m mythos_train {train,prepare,canary,eval,export,profile,bench,plan}` (console script: `mythos-train`).

Every command that reads a job config takes `--config path.toml` plus `--section.field=value` overrides;
`--help` lists the config fields with their docs. `bench` and `plan` parse their own arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing

from data_pipeline.config import DataError
from mythos_train.config import ConfigError, JobConfig, field_docs, load_config, validate
from mythos_train.dtypes import DTYPE_BYTES

COMMANDS = {
    "train": "train a model (torchrun for several processes)",
    "prepare": "tokenize text into Arrow shards (and train the tokenizer)",
    "canary": "write the depth-canary programs (train text + eval set) and prepare them",
    "eval": "validation loss vs loop count and a sample, from a checkpoint",
    "export": "consolidated safetensors (ours and open-mythos') from a checkpoint",
    "profile": "a few warm training steps under the profiler: per-rank phase tables, picture, planner check",
    "bench": "micro-benchmarks of the model (own arguments: bench --help)",
    "plan": "memory / throughput plan for a config on a GPU type (own arguments: plan --help)",
}
SECTIONS = {
    "prepare": ("data",),
    "canary": ("data", "canary"),
}  # which config sections a command's --help lists (default: all)


def _type_name(tp: object) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def config_help(sections: tuple[str, ...] | None = None) -> str:
    """Every config field as `--section.field  type = default` plus its docstring."""
    lines = []
    section_types = typing.get_type_hints(JobConfig)
    for section in dataclasses.fields(JobConfig):
        if sections and section.name not in sections:
            continue
        cls = section_types[section.name]
        default, hints, docs = cls(), typing.get_type_hints(cls), field_docs(cls)
        lines.append(f"\n[{section.name}]  {(cls.__doc__ or '').strip()}")
        for f in dataclasses.fields(cls):
            lines.append(f"  --{section.name}.{f.name}  {_type_name(hints[f.name])} = {getattr(default, f.name)!r}")
            if f.name in docs:
                lines.append(f"      {docs[f.name]}")
    return "\n".join(lines)


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"mythos-train {command}",
        description=COMMANDS[command],
        epilog="Config fields (override any with --section.field=value):\n" + config_help(SECTIONS.get(command)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="TOML job config (defaults <- file <- --section.field overrides)")
    if command in ("eval", "export"):
        parser.add_argument(
            "--checkpoint",
            help="a step-N checkpoint directory or a checkpoints folder (default: the run's, newest complete)",
        )
    if command == "train":
        parser.add_argument(
            "--validate-only",
            action="store_true",
            help="check the config, data, paths, run-dir lock and the checkpoint to resume from, then exit "
            "(0 = ok, 2 = an error; WORLD_SIZE sets the world size to check for); starts no process group",
        )
    if command == "prepare":
        parser.add_argument(
            "--verify", action="store_true", help="check every prepared shard against its manifest sha256, then exit"
        )
    if command == "export":
        parser.add_argument("--out", help="output directory (default: <train.run_dir>/export)")
        parser.add_argument(
            "--dtype",
            default="float32",
            choices=list(DTYPE_BYTES),
            help="dtype of the exported weights",
        )
    if command == "profile":
        parser.add_argument("--warm-steps", type=int, default=2, help="training steps run before profiling")
        parser.add_argument("--steps", type=int, default=2, help="training steps profiled")
        parser.add_argument("--gpu", help="planner accelerator to compare with (default: this device)")
    return parser


def _setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def _checkpoint_folder(cfg: JobConfig) -> str:
    return cfg.checkpoint.folder or os.path.join(cfg.train.run_dir, "checkpoints")


def run_train(cfg: JobConfig) -> int:
    from mythos_train.checkpoint import CheckpointSpaceError, NonFiniteWeightsError
    from mythos_train.distributed import destroy_distributed, env_world_size, init_distributed
    from mythos_train.stop_signals import STOPPED_EXIT, STOPPED_UNSAVED_EXIT
    from mythos_train.trainer import NonFiniteError, Trainer, check_vocab

    validate(cfg, env_world_size())  # before any rendezvous: a bad config costs nothing
    check_vocab(cfg)
    info = init_distributed(cfg)
    try:
        trainer = Trainer(cfg, info)
        try:
            trainer.train()
        finally:
            trainer.close()
        if info.is_main:
            print(trainer.summary(), flush=True)
        if trainer.stopped_by and not cfg.checkpoint.enabled:  # nothing to resume: a requeue would start over
            if status_file := os.environ.get("MYTHOS_STOP_STATUS_FILE"):  # for the launcher: torchrun drops it
                with open(status_file, "w") as stream:
                    stream.write(str(STOPPED_UNSAVED_EXIT))
            print(
                f"stopped by {trainer.stopped_by} after step {trainer.step}, no checkpoint (checkpoint.enabled = "
                f"false); exit status {STOPPED_UNSAVED_EXIT}: not to be requeued",
                file=sys.stderr,
                flush=True,
            )
            return STOPPED_UNSAVED_EXIT
        if trainer.stopped_by:
            print(
                f"stopped by {trainer.stopped_by} after step {trainer.step}, checkpoint saved in "
                f"{trainer.checkpoint.folder}; exit status {STOPPED_EXIT}: start the same command again to resume",
                file=sys.stderr,
                flush=True,
            )
            return STOPPED_EXIT
    except (NonFiniteError, NonFiniteWeightsError, CheckpointSpaceError) as err:  # the message says it all
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        destroy_distributed()
    return 0


def run_eval(cfg: JobConfig, checkpoint: str | None) -> dict[int, float]:
    """Evaluate a checkpoint under the config's mesh (torchrun or one process)."""
    from pathlib import Path

    import parallel
    from mythos_train.checkpoint import check_model_config, load_model_weights, resolve_checkpoint
    from mythos_train.distributed import destroy_distributed, env_world_size, init_distributed
    from mythos_train.evaluate import Evaluator
    from mythos_train.metrics import MetricsLogger
    from mythos_train.trainer import build_model

    validate(cfg, env_world_size())
    path = resolve_checkpoint(checkpoint or _checkpoint_folder(cfg))
    check_model_config(path, cfg.model)
    info = init_distributed(cfg)
    try:
        dims = parallel.build_mesh(cfg.parallel, info.world_size, info.device.type)
        model, _ = build_model(cfg, dims, info.device)
        step = load_model_weights(model, path)["step"]
        metrics = MetricsLogger(cfg.metrics, Path(cfg.train.run_dir), enabled=info.is_main)
        try:
            return Evaluator(cfg, model, dims, info.device, metrics, Path(cfg.train.run_dir)).run(step)
        finally:
            metrics.close()
    finally:
        destroy_distributed()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(
            "usage: mythos-train {"
            + ",".join(COMMANDS)
            + "} [--config file.toml] [--section.field=value ...] [--help]\n"
        )
        for name, text in COMMANDS.items():
            print(f"  {name:<8} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from mythos_train.bench import throughput

        throughput.main(rest)  # prints its table; returns the rows for programmatic use
        return 0
    if command == "plan":
        from mythos_train.planner import cli

        return cli.main(rest) or 0

    args, overrides = _parser(command).parse_known_args(rest)
    _setup_logging()
    try:
        cfg = load_config(args.config, overrides)
        if command == "train" and args.validate_only:
            from mythos_train.distributed import env_world_size
            from mythos_train.preflight import preflight

            print(preflight(cfg, env_world_size()))
        elif command == "train":
            return run_train(cfg)
        elif command == "profile":
            from mythos_train.profile_run import run_profile

            return run_profile(cfg, args.warm_steps, args.steps, args.gpu)
        elif command == "prepare":
            from data_pipeline import prepare, verify_prepared

            cfg.data.validate()
            if args.verify:
                print(
                    f"prepare --verify: {verify_prepared(cfg.data)} shard(s) match {cfg.data.prepared_dir}/manifest.json"
                )
            else:
                prepare(cfg.data)
        elif command == "canary":
            from mythos_train.canary import write_canary

            validate(cfg, 1)
            for kind, path in write_canary(cfg).items():
                print(f"{kind}: {path}")
        elif command == "eval":
            run_eval(cfg, args.checkpoint)
        elif command == "export":
            from mythos_train.export import export_checkpoint

            files = export_checkpoint(
                args.checkpoint or _checkpoint_folder(cfg),
                args.out or os.path.join(cfg.train.run_dir, "export"),
                cfg.model,
                args.dtype,
            )
            for kind, path in files.items():
                print(f"{kind}: {path}")
    except (ConfigError, DataError) as err:  # both name the file/field at fault: no traceback needed
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
