#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, offline. Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup.sh"
cd "$root"
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
