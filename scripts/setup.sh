#!/usr/bin/env bash
# Set up a fresh machine: Debian libraries for weasyprint and the PDF tools, a .venv with the
# CPU build of torch (pinned in constraints.txt), then this project with its test extras.
# Re-running is fast: each step is skipped when its inputs have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pkg in libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 poppler-utils; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp_inputs=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$stamp_inputs" ]; then
    echo "setup: installing python packages into .venv"
    .venv/bin/python -m pip install -q --upgrade pip wheel 2>&1 | grep -v "is ignored" || true
    .venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]" 2>&1 | grep -v "is ignored" || true
    .venv/bin/python -c "import governance, torch, mlflow, great_expectations, weasyprint" 
    echo "$stamp_inputs" > .venv/.setup-stamp
fi
