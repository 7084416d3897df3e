"""The command group handles every expected failure once: one `error:` line, the error's exit code,
no traceback, for any command (including one added later)."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from governance.cli import main
from governance.errors import ContractError, GovernanceError, InputError, PolicyError


@pytest.mark.parametrize("error, code", [(InputError, 1), (ContractError, 2), (PolicyError, 3), (GovernanceError, 1)])
def test_a_governance_error_of_any_command_is_one_line_and_its_exit_code(error, code):
    @click.command("failing-for-test")
    def failing() -> None:
        raise error("what is wrong; how to fix it")

    main.add_command(failing)
    try:
        res = CliRunner().invoke(main, ["failing-for-test"])
    finally:
        main.commands.pop("failing-for-test")
    assert res.exit_code == code
    assert res.output == "error: what is wrong; how to fix it\n"
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_the_installed_entry_point_prints_no_traceback(tmp_path):
    """A real process running the group as the console script does (exit 2, one line)."""
    res = subprocess.run([sys.executable, "-c", "import sys; from governance.cli import main; "
                          "sys.argv[0] = 'mlflow-governance'; main()", "verify", str(tmp_path / "absent")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {tmp_path / 'absent'} does not exist"]
    assert "Traceback" not in res.stderr + res.stdout
