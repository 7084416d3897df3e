"""Entry point `monitor`: explanation drift of one production batch against the audited
explanation, one step of the model version's monitoring run (the `mlflow-governance monitor`
command). ``set`` takes configuration keys as ``key=value`` items separated by ``;``, e.g.
``-P set="drift.max_js_divergence=0.05"``; ``batch_index`` -1 means the next one."""

from __future__ import annotations

import argparse
import sys

import _common
from governance.cli import main as cli


def command_args(a: argparse.Namespace) -> list[str]:
    """The `monitor` command line for the entry point's parameters ("" / -1 mean not given)."""
    args = ["--model-uri", a.model_uri, "--data", a.data]
    for flag, value in (("--config", _common.config_path(a.config)), ("--batch-time", a.batch_time),
                        ("--experiment-name", a.experiment_name)):
        if _common.opt(value):
            args += [flag, value]
    if a.batch_index >= 0:
        args += ["--batch-index", str(a.batch_index)]
    for item in (a.set or "").split(";"):
        if item.strip():
            args += ["--set", item.strip()]
    if str(a.fail_on_drift).strip().lower() in ("true", "1", "yes"):
        args.append("--fail-on-drift")
    return args + ["--quiet"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    for name in ("model-uri", "data", "config", "batch-time", "experiment-name", "set"):
        p.add_argument(f"--{name}", default="")
    p.add_argument("--batch-index", type=int, default=-1)
    p.add_argument("--fail-on-drift", default="false")
    a = p.parse_args()
    cli.main(args=["monitor", *command_args(a)], prog_name="mlflow-governance", standalone_mode=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
