"""Entry point `train`: generate the credit-risk example, train the MLP, log model and data."""

from __future__ import annotations

import argparse
import json

import _common  # noqa: F401  (repository root on sys.path)
import mlflow

from examples.credit_risk.train import train_and_log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-train", type=int, default=40000)
    p.add_argument("--n-valid", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--registered-model-name", default="")
    a = p.parse_args()
    with mlflow.start_run():
        out = train_and_log(n_train=a.n_train, n_valid=a.n_valid, epochs=a.epochs, seed=a.seed,
                            registered_model_name=_common.opt(a.registered_model_name))
    print(json.dumps(out, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
