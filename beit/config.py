"""Command lines with a YAML config file: ``--config run.yaml`` sets defaults (keys as the long option names, with
underscores or dashes), the command line overrides them, and the file's values get the checks argparse gives the
command line's. Shared by the trainers."""

from __future__ import annotations

import argparse
import sys

import yaml

from beit.errors import TrainingError


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, set[str]]:
    """Parse ``argv`` (``sys.argv[1:]`` when None) with the defaults of its ``--config`` file. Returns the options
    and the names the user set, on the command line or in the file."""
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    cfg = {}
    if known.config:
        cfg = read_yaml(known.config)
        valid = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - valid)
        if unknown:
            parser.error(f"unknown option(s) in {known.config}: {', '.join(unknown)}")
        check_config_values(parser, cfg, known.config)
        parser.set_defaults(**cfg)
    args = parser.parse_args(argv)
    given = {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")} | set(cfg)
    return args, given


def check_config_values(parser: argparse.ArgumentParser, cfg: dict, path: str) -> None:
    """A config file's values get the checks argparse gives the command line's (types, choices), which
    ``set_defaults`` skips: a ``precision: fp8`` must not quietly train in fp32."""
    actions = {a.dest: a for a in parser._actions}
    for key, v in cfg.items():
        a = actions[key]
        if v is None and a.default is None:  # an option that may be left unset
            continue
        problem = config_value_problem(a, v)
        if problem:
            parser.error(f"{path}: {key}: {v!r} is not {problem}")


def config_value_problem(a: argparse.Action, v) -> str | None:
    """What ``v`` should have been for option ``a``, or None when it fits."""
    if isinstance(a, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        return None if isinstance(v, bool) else "true or false"
    if a.type is int:
        check, want = (lambda x: isinstance(x, int) and not isinstance(x, bool)), "an integer"
    elif a.type is float:
        check, want = (lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)), "a number"
    else:
        check, want = (lambda x: isinstance(x, str)), "a string"
    if a.nargs not in (None, "?"):  # a list option
        n = a.nargs if isinstance(a.nargs, int) else None
        if not isinstance(v, list) or (n is not None and len(v) != n) or not all(map(check, v)):
            return f"a list of {n or 'any number of'} values, each {want}"
        return None
    if a.choices is not None:
        return None if v in a.choices else f"one of {', '.join(map(str, a.choices))}"
    return None if check(v) else want


def read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise TrainingError(f"cannot read the config file {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise TrainingError(f"{path} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in cfg.items()}
