"""``selectmoe <command> [--config FILE] [key=value ...]``: one command per stage.

The same arguments work with ``python -m ray_jobs.<name>`` under ``ray job submit``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import traceback
import typing

from selectmoe import console
from selectmoe.config import STAGE_CONFIGS, ConfigError, all_keys, parse_config
from selectmoe.data.rejects import DataError
from selectmoe.manifest import read_manifest

# mistakes a user fixes in their command or inputs: one line and exit status 2 (--verbose: traceback)
USER_ERRORS = (ConfigError, DataError)
VERBOSE_ENV = "SELECTMOE_VERBOSE"

# command -> (module, function, one-line help); the function takes the parsed config
RUNNERS: dict[str, tuple[str, str, str]] = {
    "validate-data": (
        "selectmoe.validate_data",
        "validate_data",
        "check and normalise a corpus; write rejects",
    ),
    "pretrain": ("selectmoe.pretrain", "pretrain", "stage 1: train the quality gates (Ray Train)"),
    "select": ("selectmoe.select", "select", "stage 2: score rows and select the best (Ray Data)"),
    "finetune": ("selectmoe.finetune", "finetune", "stage 3: LoRA-finetune the target (Ray Train)"),
    "evaluate": ("selectmoe.evaluate", "evaluate", "stage 4: lm-eval the finetuned model"),
    "convert": ("selectmoe.convert", "convert", "write a standalone Select-MoE checkpoint from OLMoE"),
    "pipeline": (
        "selectmoe.pipeline",
        "run_pipeline",
        "stages 1-4 in one run folder, resumable, with baselines",
    ),
    "demo": (
        "selectmoe.demo.run",
        "run_demo",
        "the whole pipeline on generated data and tiny models, locally",
    ),
    "sweep": (
        "selectmoe.sweep",
        "run_sweep",
        "Ray Tune over quality-loss types and weights; best on to lm-eval",
    ),
}
# commands without a typed config of their own
OTHER_COMMANDS: dict[str, str] = {
    "compare": "table several evaluation runs side by side: selectmoe compare RUN_DIR ...",
}
# flag spellings that map onto config keys (`selectmoe convert --olmoe X --out Y --verify`)
FLAG_ALIASES = {"--olmoe": "olmoe", "--out": "output_dir", "--output-dir": "output_dir"}
SWITCH_ALIASES = {"--verify": "verify=true"}


def _key_help(command: str) -> str:
    cls = STAGE_CONFIGS[command]
    defaults = dataclasses.asdict(cls())
    types_ = _flat_types(cls)
    lines = []
    for key in all_keys(cls):
        value = defaults
        for part in key.split("."):
            value = value[part]
        lines.append(f"  {key} = {value!r}  ({types_[key]})")
    return "config keys (override with key=value):\n" + "\n".join(lines)


def _flat_types(cls: type, prefix: str = "") -> dict[str, str]:
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            found.update(_flat_types(tp, f"{prefix}{f.name}."))
        else:
            found[f"{prefix}{f.name}"] = (
                tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
            )
    return found


def _normalise_args(args: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in SWITCH_ALIASES:
            out.append(SWITCH_ALIASES[arg])
        elif arg in FLAG_ALIASES and i + 1 < len(args):
            out.append(f"{FLAG_ALIASES[arg]}={args[i + 1]}")
            i += 1
        elif "=" in arg and arg.split("=", 1)[0] in FLAG_ALIASES:
            flag, value = arg.split("=", 1)
            out.append(f"{FLAG_ALIASES[flag]}={value}")
        else:
            out.append(arg)
        i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selectmoe",
        description="Select-MoE data selection on Ray. Each command takes --config FILE and key=value overrides.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, text) in RUNNERS.items():
        p = sub.add_parser(
            name,
            help=text,
            description=text,
            epilog=_key_help(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", help="YAML config (default: the shipped one for this command)")
        p.add_argument("--verbose", action="store_true", help=f"full tracebacks (or {VERBOSE_ENV}=1)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.learning_rate=1e-4")
    for name, text in OTHER_COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", help="YAML config")
        p.add_argument("overrides", nargs="*", help="key=value overrides or run folders")
    return parser


def run_command(command: str, config_file: str | None, overrides: list[str], verbose: bool = True):
    """Parse the config for ``command`` and run it; returns what the stage returns (its output dir).
    Unless ``verbose``, the terminal shows phase lines only (``selectmoe.console``)."""
    if command == "compare":
        from selectmoe.reporting.compare import compare_runs

        if not overrides:
            raise SystemExit("selectmoe compare: give one or more run folders")
        return compare_runs(overrides)
    cfg = parse_config(command, config_file, overrides)
    module_name, fn_name, _ = RUNNERS[command]
    run = getattr(importlib.import_module(module_name), fn_name)
    if verbose:
        return run(cfg)
    with console.quiet(cfg.output_dir):
        try:
            result = run(cfg)
        finally:
            if "ray" in sys.modules and sys.modules["ray"].is_initialized():
                sys.modules["ray"].shutdown()  # its last log lines go to the log, not after the result
    if command in console.STAGE_TITLES:
        console.say(console.summary(command, read_manifest(result) or {}))
    return result


def _split_config_flag(args: list[str]) -> tuple[str | None, list[str]]:
    config_file, rest, i = None, [], 0
    while i < len(args):
        if args[i] == "--config" and i + 1 < len(args):
            config_file = args[i + 1]
            i += 2
            continue
        if args[i].startswith("--config="):
            config_file = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    return config_file, rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command = argv[0]
    if command not in set(RUNNERS) | set(OTHER_COMMANDS) or "-h" in argv or "--help" in argv:
        parser.parse_args(argv[:1] + ["--help"] if command in RUNNERS or command in OTHER_COMMANDS else argv)
        return 2
    verbose = "--verbose" in argv or os.environ.get(VERBOSE_ENV) == "1"
    config_file, rest = _split_config_flag([a for a in argv[1:] if a != "--verbose"])
    try:
        result = run_command(command, config_file, _normalise_args(rest), verbose=verbose)
    except USER_ERRORS as err:
        if verbose:
            traceback.print_exc()
        cause = getattr(err, "cause", None) or err  # a Ray task's error carries the original as .cause
        print(f"selectmoe {command}: {str(cause).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()  # stop log forwarding, so the output path is the last line
    if result is not None:
        print(result, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
