"""The ``kdrl`` command: train, eval, prepare-demo, plot, bench, cache-teacher.

User mistakes (bad recipe keys, malformed data, incompatible tokenizers) end with one line on
stderr and exit status 2; no traceback.
"""
from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path
from typing import Optional

from kdrl.checkpoint import CheckpointError, disk_full_message, is_disk_full
from kdrl.config import ConfigError, load_config
from kdrl.data import DataError
from kdrl.demo import command as prepare_demo_command
from kdrl.models import ModelError
from kdrl.rewards import RewardError

USER_ERRORS = (ConfigError, DataError, ModelError, CheckpointError, RewardError)
REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def resolve_recipe(name: Optional[str]) -> Optional[Path]:
    """A path to a YAML file, or a bare preset name found in ./recipes or the installed repo's recipes/."""
    if name is None:
        return None
    path = Path(name)
    if path.is_file() or (path.is_symlink() or path.exists()) and not path.is_dir():
        return path  # a FIFO or a symlink loop too: load_config says what it is
    for folder in (Path("recipes"), REPO_RECIPES):
        candidate = folder / f"{name.removesuffix('.yaml')}.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"recipe '{name}' not found (give a YAML path or a preset name in recipes/)")


def cmd_train(args: argparse.Namespace) -> int:
    from kdrl.distributed import close_distributed
    from kdrl.trainer import train

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe:  # `kdrl train key=value` with no recipe
        overrides.insert(0, recipe)
        recipe = None
    if args.resume:
        if recipe is not None:
            raise ConfigError(f"--resume continues with {args.resume}'s own config.yaml; give key=value "
                              f"overrides only, not the recipe '{recipe}'")
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise CheckpointError(f"{args.resume}: not a run directory (no config.yaml)")
        config = load_config(saved, overrides)
    else:
        config = load_config(resolve_recipe(recipe), overrides)
    try:
        train(config, resume=args.resume, overwrite=args.overwrite)  # under torchrun: one process per device
    finally:
        close_distributed()
    return 0


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from kdrl.teachers.cache import build_teacher_cache

    config = load_config(resolve_recipe(args.recipe), args.overrides)
    if args.out:
        config.teacher_cache.path = args.out
    out = Path(config.teacher_cache.path) if config.teacher_cache.path else None
    if out is not None and (out.is_symlink() or out.exists()) and not out.is_dir():  # before any sampling
        raise ConfigError(f"--out {out}: exists and is not a directory; give a new or a cache directory")
    folder = build_teacher_cache(config)
    print(f"kdrl: teacher cache of {config.teacher_cache.num_prompts} prompts x {config.rollout.group_size} "
          f"responses written to {folder}; train with teacher_cache.path={folder}", flush=True)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from kdrl.config import Config, ModelConfig
    from kdrl.data import load_problems, make_encoder
    from kdrl.evaluate import evaluate_problems, markdown_table
    from kdrl.models import load_model, load_tokenizer, pick_device, set_cpu_threads
    from kdrl.rewards import combine_rewards, parse_reward_specs
    from kdrl.rollout import engine_options, make_engine
    from kdrl.teachers import LocalTeacher

    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    config = Config()
    config.data.chat_template = args.chat_template
    reward_fn = combine_rewards(parse_reward_specs(args.reward), args.timeout)
    sets = {Path(spec.split(":")[-1]).stem: load_problems(spec, limit=args.limit) for spec in args.data}
    results: dict[str, dict] = {}
    problems_out: dict[str, dict] = {}  # per problem and sample, for paired comparisons
    for spec in args.model:
        label, _, path = spec.rpartition("=") if "=" in spec else (spec, "", spec)
        tokenizer = load_tokenizer(path)
        model = load_model(path, ModelConfig(dtype=args.dtype), device, trainable=False)
        set_cpu_threads(0, device, model)
        encode = make_encoder(tokenizer, config, 10 ** 9)
        engine = make_engine(args.engine, model=model, tokenizer=tokenizer, encode=encode,
                             generation_batch_size=args.batch_size,
                             **engine_options(args.engine, None, args.seed, LocalTeacher(model)))
        results[label], problems_out[label] = {}, {}
        for name, problems in sets.items():
            torch.manual_seed(args.seed)  # same samples for every model: deterministic for a seed
            results[label][name] = evaluate_problems(engine, problems, reward_fn, samples=args.samples,
                                                     temperature=args.temperature, top_p=args.top_p,
                                                     max_new_tokens=args.max_new_tokens,
                                                     batch_size=args.batch_size,
                                                     details=problems_out[label].setdefault(name, []))
    table = markdown_table(results)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        out.with_suffix(".md").write_text(table + "\n")
        out.with_name(out.stem + "_problems.json").write_text(json.dumps(problems_out))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import shlex

    from kdrl.bench import run_benchmark

    method_overrides: dict[str, list[str]] = {}
    for item in args.method_override:
        method, _, override = item.partition(":")
        method_overrides.setdefault(method, []).append(override)
    command = "kdrl bench " + " ".join(shlex.quote(a) for a in args.argv)
    # --methods and --pairs take any number of values, so key=value overrides written after them land
    # there; no method or pair name holds "=", so they are overrides wherever they were written
    for values in (args.methods, args.pairs or []):
        args.overrides += [item for item in values if "=" in item]
        values[:] = [item for item in values if "=" not in item]
    pairs = None if args.pairs is None else [parse_pair(item) for item in args.pairs]
    results = run_benchmark(args.methods, list(range(args.seeds)), Path(args.out), args.overrides,
                            method_overrides, args.target, command, jobs=args.jobs, method_pairs=pairs)
    from kdrl.bench import markdown

    print(markdown(results))
    return 0


def parse_pair(item: str) -> tuple[str, str]:
    a, sep, b = item.partition(":")
    if not sep or not a or not b:
        raise ConfigError(f"--pairs: '{item}' must look like A:B (e.g. kdrl:kd_rkl, reported as A - B)")
    return a, b


def cmd_plot(args: argparse.Namespace) -> int:
    from kdrl.logger import plot_run
    from kdrl.paths import path_problem

    problem = path_problem(Path(args.run_dir) / "metrics.jsonl")
    if problem:
        raise ConfigError(f"{args.run_dir}: not a run directory (its metrics.jsonl is {problem})")
    print(plot_run(args.run_dir, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdrl", description="Post-train reasoning models with RL, KD, or both.")
    commands = parser.add_subparsers(dest="command")

    train = commands.add_parser("train", help="train with a recipe (no recipe: KDRL on the bundled demo)")
    train.add_argument("recipe", nargs="?", help="recipe YAML or preset name (recipes/NAME.yaml)")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=50")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest complete checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="clear a log.run_dir that already holds a run (otherwise it is refused)")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate checkpoints on problem sets")
    evaluate.add_argument("--model", action="append", required=True,
                          help="checkpoint directory, bundled:student, or LABEL=PATH (repeatable)")
    evaluate.add_argument("--data", action="append", default=None,
                          help="JSONL/Parquet file or bundled:SPLIT (repeatable; default: bundled test sets)")
    evaluate.add_argument("--samples", type=int, default=1, help="k samples per problem (avg@k, pass@k, maj@k)")
    evaluate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    evaluate.add_argument("--top-p", type=float, default=1.0)
    evaluate.add_argument("--max-new-tokens", type=int, default=64)
    evaluate.add_argument("--limit", type=int, default=None, help="first N problems of each set")
    evaluate.add_argument("--reward", action="append", default=None, help="reward functions (default: math)")
    evaluate.add_argument("--timeout", type=float, default=5.0)
    evaluate.add_argument("--chat-template", action="store_true")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--dtype", default="auto")
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                          help="rollout engine (vllm: pip install \"kdrl[vllm]\"; rollout.vllm's default settings)")
    evaluate.add_argument("--out", help="write JSON here (and a .md table beside it)")
    evaluate.set_defaults(func=cmd_eval)

    demo = commands.add_parser("prepare-demo", help=prepare_demo_command.DESCRIPTION)
    prepare_demo_command.add_arguments(demo)  # the options python -m kdrl.demo has
    demo.set_defaults(func=prepare_demo_command.run)

    bench = commands.add_parser("bench", help="compare methods on one budget over several seeds")
    bench.add_argument("--methods", nargs="+", default=["sft", "grpo", "kd_rkl", "opd", "kdrl", "kdrl_anneal",
                                                        "kdrl_mask", "kd_then_rl", "kdrl_auto"])
    bench.add_argument("--seeds", type=int, default=3)
    bench.add_argument("--target", type=float, default=0.5, help="accuracy for 'steps to reach'")
    bench.add_argument("--out", default="benchmarks/results/methods")
    bench.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process")
    bench.add_argument("--pairs", nargs="+", default=None, metavar="A:B",
                       help="paired differences A - B with a 95%% bootstrap interval over problems and seeds "
                            "(default: kdrl:kd_rkl kdrl:grpo kd_then_rl:kdrl, those among --methods)")
    bench.add_argument("--method-override", action="append", default=[], metavar="METHOD:KEY=VALUE",
                       help="an override for one method only (e.g. kdrl:objective.beta.initial=0.01)")
    bench.add_argument("overrides", nargs="*", help="key=value overrides applied to every method")
    bench.set_defaults(func=cmd_bench)

    cache = commands.add_parser("cache-teacher", help="sample responses once and store the teacher's log-probs "
                                "(Lightning OPD: training then loads no teacher)")
    cache.add_argument("recipe", help="recipe YAML or preset name (e.g. lightning_opd)")
    cache.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for the training run")
    cache.add_argument("--out", help="cache directory (default: the recipe's teacher_cache.path)")
    cache.set_defaults(func=cmd_cache_teacher)

    plot = commands.add_parser("plot", help="plot a run's curves to PNG")
    plot.add_argument("run_dir")
    plot.add_argument("--out")
    plot.set_defaults(func=cmd_plot)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after an option (`cache-teacher RECIPE --out DIR k=v`) are overrides too
        if hasattr(args, "overrides") and all("=" in token and not token.startswith("-") for token in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = argv[1:]
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "eval":
        args.data = args.data or ["bundled:test_id", "bundled:test_ood"]
        args.reward = args.reward or ["math"]
    try:
        return args.func(args)
    except USER_ERRORS as error:
        print(f"kdrl: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the environment, not kdrl: a full disk, a read-only or missing directory
        if is_disk_full(error):
            where = Path(error.filename) if error.filename else None
            print(f"kdrl: error: {disk_full_message(where, error)}", file=sys.stderr)
            return 2
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                           errno.ELOOP, errno.ENAMETOOLONG, errno.ENOENT):
            print(f"kdrl: error: {error.filename or 'a file'}: {error.strerror}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("kdrl: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the run stopped on purpose (e.g. non-finite losses): one line, no traceback
        from kdrl.trainer import TrainingStopped

        if isinstance(error, TrainingStopped):
            print(f"kdrl: stopped: {error}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
