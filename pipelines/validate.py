"""Entry point `validate`: check the data contract only (exit 2 when it fails)."""

from __future__ import annotations

import argparse
import sys

import _common
from governance.pipeline import validate_data
from governance.validation import ContractViolation


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-uri", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--target-column", default="")
    p.add_argument("--config", default="")
    a = p.parse_args()
    try:
        outcome = validate_data(a.model_uri, a.data, config=_common.config_path(a.config),
                                target_column=_common.opt(a.target_column))
    except ContractViolation as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(outcome.message())
    return 0


if __name__ == "__main__":
    sys.exit(main())
