"""The real ``rinna serve --parallel N``: N chat requests one after another vs from N concurrent clients.

``python -m benchmarks.serve_clients [--layers 36] [--parallel 4] [--tokens 24] [--rounds 2]`` starts
``rinna serve`` on loopback over the random model of :mod:`benchmarks.model` (int8, greedy), then, per
round, sends the N prompts of :data:`benchmarks.script.MESSAGES` to ``/v1/chat/completions`` one at a
time and then all at once, and prints the aggregate completion tokens/s of both and whether each
concurrent reply equals that client's reply alone (issue 12's serve target). Ratios, not absolute
figures, carry over between machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.model import build  # noqa: E402
from benchmarks.script import MESSAGES  # noqa: E402


def chat(base: str, text: str, tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": tokens, "temperature": 0}
    request = urllib.request.Request(
        f"{base}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def wait_ready(process: subprocess.Popen, base: str) -> None:
    while process.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"rinna serve exited with {process.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    folder, n, base = build(args.layers), args.parallel, f"http://127.0.0.1:{args.port}"
    rinna = Path(sys.executable).with_name("rinna")
    command = [str(rinna), "serve", "--model", str(folder), "--parallel", str(n), "--port", str(args.port), "--quiet"]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    try:
        wait_ready(process, base)
        texts = (MESSAGES * n)[:n]
        chat(base, texts[0], 2)  # warm up
        for round_ in range(args.rounds):
            began = time.perf_counter()
            alone = [chat(base, text, args.tokens) for text in texts]
            alone_s = time.perf_counter() - began
            together: list[dict] = [{}] * n

            def client(index: int) -> None:
                together[index] = chat(base, texts[index], args.tokens)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
            began = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            together_s = time.perf_counter() - began
            tokens = [sum(r["usage"]["completion_tokens"] for r in replies) for replies in (alone, together)]
            same = sum(a["choices"][0]["message"] == b["choices"][0]["message"] for a, b in zip(alone, together))
            print(
                f"round {round_ + 1}: {n} one after another {tokens[0] / alone_s:.2f} tok/s ({alone_s:.1f} s), "
                f"{n} concurrent clients {tokens[1] / together_s:.2f} tok/s ({together_s:.1f} s): "
                f"x{(tokens[1] / together_s) / (tokens[0] / alone_s):.2f}; replies identical to alone {same}/{n}",
                flush=True,
            )
    finally:
        process.terminate()
        process.wait()


if __name__ == "__main__":
    main()
