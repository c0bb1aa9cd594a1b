#!/usr/bin/env bash
# Prerequisites of `python -m bench`: Debian's nginx (run by the harness in the foreground, never as a
# service), the seed baseline's packages (FastAPI, uvicorn, httpx), matplotlib for the chart and py-spy
# for profiling. fastgate itself must be importable (pip install -e . from the repository root).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    apt-get update -qq
    # policy-rc.d may refuse to start the service; that is fine, the harness runs its own nginx.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light || \
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx
fi
python -m pip install -q -e . fastapi uvicorn httpx matplotlib py-spy
python - <<'PY'
import fastapi, httpx, matplotlib, uvicorn, fastgate  # noqa: F401
print("bench prerequisites OK")
PY
