"""Entry point `validate`: check the data contract only (exit 2 when it fails).

``set`` takes configuration keys as ``key=value`` items separated by ``;`` (as in `explain`)."""

from __future__ import annotations

import argparse
import sys

import _common
from governance.cli.failures import failure
from governance.config import config_from_dict, user_settings
from governance.pipeline import validate_data
from governance.signals import Interrupted, interruptible
from governance.tracking import load_model
from governance.validation import ContractViolation


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-uri", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--target-column", default="")
    p.add_argument("--config", default="")
    p.add_argument("--set", default="")
    p.add_argument("--allow-pickle", default="false")
    a = p.parse_args()
    try:
        with interruptible():  # SIGTERM while loading the model also cleans up
            allow = True if a.allow_pickle.strip().lower() in ("true", "1", "yes") else None
            given = user_settings(_common.config_path(a.config), [s.strip() for s in a.set.split(";") if s.strip()],
                                  target_column=_common.opt(a.target_column), allow_pickle=allow)
            cfg = config_from_dict(given)
            handle = load_model(a.model_uri, device=cfg.device, allow_pickle=cfg.allow_pickle)
            outcome = validate_data(handle, a.data, config=given)
    except ContractViolation as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except (Exception, Interrupted) as exc:  # one line, never a traceback (governance.cli.failures)
        line, code = failure(exc)
        print(line, file=sys.stderr)
        return code
    print(outcome.message())
    return 0


if __name__ == "__main__":
    sys.exit(main())
