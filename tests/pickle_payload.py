"""A PyTorch module whose unpickling runs code (here: it writes a marker file), as an attacker's
model logged in MLflow's pickle format would. Used to prove that nothing unpickles without opt-in."""

from __future__ import annotations

import os
from pathlib import Path

import torch

MARKER_ENV = "GOVERNANCE_TEST_PICKLE_MARKER"


class Payload(torch.nn.Module):
    """A small MLP that announces every time it is unpickled."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def __setstate__(self, state: dict) -> None:
        marker = os.environ.get(MARKER_ENV)
        if marker:
            Path(marker).write_text("code ran while unpickling\n")
        super().__setstate__(state)
