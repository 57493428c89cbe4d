#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, offline. Extra arguments go to pytest.
# Without a CUDA GPU the Triton kernels' tests (tests/ops/test_triton*.py) run on CPU through Triton's
# interpreter (TRITON_INTERPRET=1; about 9 minutes on 2 cores), so that a broken kernel fails here too.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup.sh"
cd "$root"
export HF_HUB_OFFLINE=1
py=.venv/bin/python
if ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
    if [ "$(uname -sm)" = "Linux x86_64" ] && ! "$py" -c "import triton" 2>/dev/null; then
        echo "scripts/test.sh: triton is not importable; the dev extra installs it (pip install -e '.[dev]')" >&2
        exit 1
    fi
fi
exec "$py" -m pytest -q "$@"
