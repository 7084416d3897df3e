"""Entry point `explain`: the explanation stage (the `mlflow-governance explain` command).

``set`` takes any configuration keys as ``key=value`` items separated by ``;``, e.g.
``-P set="reason_codes.top_n=3;quality.enabled=false"``."""

from __future__ import annotations

import argparse
import sys

import _common
from governance.cli.explain import explain_command

TEXT_OPTIONS = ("model-uri", "data", "target-column", "config", "modes", "primary-mode", "task", "feature-columns")


def command_args(a: argparse.Namespace) -> list[str]:
    """The `explain` command line for the entry point's parameters ("" means not given)."""
    args = ["--model-uri", a.model_uri, "--data", a.data]
    for flag, value in (("--target-column", a.target_column), ("--config", _common.config_path(a.config)),
                        ("--modes", a.modes), ("--primary-mode", a.primary_mode), ("--task", a.task),
                        ("--feature-columns", a.feature_columns)):
        if _common.opt(value):
            args += [flag, value]
    if a.batch_size > 0:
        args += ["--batch-size", str(a.batch_size)]
    for item in (a.set or "").split(";"):
        if item.strip():
            args += ["--set", item.strip()]
    if str(a.allow_pickle).strip().lower() in ("true", "1", "yes"):
        args.append("--allow-pickle")
    return args


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    for name in TEXT_OPTIONS:
        p.add_argument(f"--{name}", default="")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--set", default="")
    p.add_argument("--allow-pickle", default="false")
    a = p.parse_args()
    explain_command.main(args=command_args(a), prog_name="explain", standalone_mode=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
