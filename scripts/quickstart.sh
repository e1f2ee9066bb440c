#!/usr/bin/env bash
# Install mdserver into ./.venv and run a demo in the foreground: loopback,
# port 8169, state in ./.mdserver-demo, one demo instance (127.0.0.1).
#   ./scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! "$python" -m venv --help >/dev/null 2>&1 || ! "$python" -c "import ensurepip" 2>/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    fi
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q -e . 
exec .venv/bin/mdserver --demo .mdserver-demo
