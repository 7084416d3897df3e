"""Entry point `explain`: the explanation stage (the `mlflow-governance explain` command)."""

from __future__ import annotations

import argparse
import sys

import _common
from governance.cli.explain import explain_command


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    for name in ("model-uri", "data", "target-column", "config", "modes", "primary-mode"):
        p.add_argument(f"--{name}", default="")
    p.add_argument("--batch-size", type=int, default=0)
    a = p.parse_args()
    args = ["--model-uri", a.model_uri, "--data", a.data]
    for flag, value in (("--target-column", a.target_column), ("--config", _common.config_path(a.config)),
                        ("--modes", a.modes), ("--primary-mode", a.primary_mode)):
        if _common.opt(value):
            args += [flag, value]
    if a.batch_size > 0:
        args += ["--batch-size", str(a.batch_size)]
    explain_command.main(args=args, prog_name="explain", standalone_mode=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
