"""Continuous batching on the full-size random model: one at a time vs many in flight, in one run.

Measures, on the int8 CPU path (:class:`rinna_cli.batching.BatchingEngine` over the
loaded model):

* aggregate decode tokens/s with 1 and with N prompts in flight (same prompts, greedy);
* time to first token of a prompt joining a batch of N-1 decoding ones vs alone;
* ``rinna batch``'s job (:func:`rinna_cli.batch.run`) end to end, ``--parallel 1`` vs N;
* resident memory: after loading, and the peak with N in flight.

Usage: ``python -m benchmarks.batching [--layers 36] [--parallel 8] [--tokens 32]``.
Builds (or reuses) the random model of :mod:`benchmarks.model`; the ratios, not the
absolute figures, are what carries over between machines.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.model import build  # noqa: E402
from benchmarks.script import MESSAGES  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakRss:
    """Samples the resident set every 20 ms while inside."""

    def __enter__(self):
        self.peak, self._done = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._done.wait(0.02):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


def together(engine, prompts, sampling):
    """Generate all prompts at once (one thread each): the replies, the wall time, and the decode rate.

    The decode rate counts the tokens generated while every sequence was decoding
    (from the last first token to the first last token), so prefill steps are left out.
    """
    replies = [None] * len(prompts)
    stamps = [[] for _ in prompts]

    def one(index):
        replies[index] = engine.generate(
            prompts[index], sampling, lambda step: stamps[index].append(time.perf_counter())
        )

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    begin, end = max(s[0] for s in stamps), min(s[-1] for s in stamps)
    tokens = sum(1 for s in stamps for t in s if begin < t <= end)
    return replies, wall, tokens / (end - begin) if end > begin else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per reply")
    args = parser.parse_args()
    import torch

    from rinna_cli import batch
    from rinna_cli.batching import BatchingEngine
    from rinna_cli.contract import Sampling
    from rinna_cli.engine import Engine
    from rinna_cli.session import Conversation
    from rinna_cli.tokenizer import Tokenizer

    folder = build(args.layers)
    tokenizer = Tokenizer.from_folder(folder)
    base_rss = rss_mb()
    local = Engine.load(folder, "bench", tokenizer, progress=lambda step: print(f"  {step}", file=sys.stderr))
    loaded_rss = rss_mb()
    n = args.parallel
    engine = BatchingEngine.wrap(local, n)
    prompts = []
    for text in (MESSAGES * n)[:n]:
        conversation = Conversation(tokenizer)
        conversation.add_user(text)
        prompts.append(conversation.prompt_ids())
    greedy = Sampling(0.0, 1.0, 0, 1.0, args.tokens, 0)
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"model {folder.name}; prompts {[len(p) for p in prompts]} tokens; {args.tokens} new tokens each"
    )
    print(f"rss: {base_rss:.0f} MB before loading, {loaded_rss:.0f} MB loaded (int8)")
    engine.generate(prompts[0], Sampling(0.0, 1.0, 0, 1.0, 2, 0))  # warm up

    # one at a time and n in flight, interleaved (the shared machine's load hits both alike)
    alone, rates, walls, same = [], [], [], 0
    resident = rss_mb()
    with PeakRss() as peak:
        for round_ in range(2):
            alone.append(engine.generate(prompts[round_], greedy))
            replies, wall, rate = together(engine, prompts, greedy)
            rates.append(rate)
            walls.append(wall)
            same += replies[round_].ids == alone[-1].ids
    alone_rate = statistics.mean(r.tokens_per_s for r in alone)
    alone_wall = statistics.mean(r.ttft_s + (r.completion_tokens - 1) / r.tokens_per_s for r in alone) * n
    rate, wall = statistics.mean(rates), statistics.mean(walls)
    print(
        f"decode, 1 in flight: {alone_rate:.2f} tokens/s; first token {statistics.mean(r.ttft_s for r in alone):.2f} s"
    )
    print(f"decode, {n} in flight: {rate:.2f} tokens/s while all decode; all {n} together {wall:.1f} s")
    print(
        f"  ratio: {rate / alone_rate:.2f}x decode, {alone_wall / wall:.2f}x end to end (vs {n} x one alone); "
        f"greedy replies identical to alone: {same}/2"
    )
    print(f"rss: {resident:.0f} MB before, peak {peak.peak:.0f} MB with {n} in flight (+{peak.peak - resident:.0f} MB)")

    # time to first token of a prompt joining n-1 decoding sequences vs alone, interleaved
    joined, single = [], []
    for attempt in range(3):
        single.append(engine.generate(prompts[-1], Sampling(0.0, 1.0, 0, 1.0, 2, 0)).ttft_s)
        started = threading.Event()
        counts = [0] * (n - 1)

        def on_step(index):
            def step(s):
                counts[index] += len(s.ids)
                if min(counts) >= 3:
                    started.set()

            return step

        long = Sampling(0.0, 1.0, 0, 1.0, args.tokens * 2, 0)
        threads = [threading.Thread(target=engine.generate, args=(prompts[i], long, on_step(i))) for i in range(n - 1)]
        for thread in threads:
            thread.start()
        started.wait()
        time.sleep(0.05 * attempt)  # land at different points of a step
        joined.append(engine.generate(prompts[-1], Sampling(0.0, 1.0, 0, 1.0, 2, 0)).ttft_s)
        for thread in threads:
            thread.join()
    print(
        f"first token ({len(prompts[-1])}-token prompt): alone {statistics.mean(single):.2f} s "
        f"(runs {', '.join(f'{t:.2f}' for t in single)}), joining {n - 1} decoding "
        f"{statistics.mean(joined):.2f} s (runs {', '.join(f'{t:.2f}' for t in joined)}); "
        f"ratio {statistics.mean(joined) / statistics.mean(single):.2f}x"
    )

    # the batch job end to end
    engine.close()
    job_engine = batch.batched(local, n)  # prompts prefilled whole, as rinna batch runs them
    lines = "\n".join(MESSAGES[i % len(MESSAGES)] for i in range(n)).encode()
    items = batch.read_items(lines, tokenizer, greedy, local.window)
    timings, rows = {}, {}
    for parallel in (1, n):
        started_at = time.perf_counter()
        out = batch.OutStream(io.StringIO())
        batch.run(items, job_engine, out, parallel)
        timings[parallel] = time.perf_counter() - started_at
        rows[parallel] = out.stream.getvalue()
    print(
        f"batch job, {n} prompts: --parallel 1 {timings[1]:.1f} s, --parallel {n} {timings[n]:.1f} s; "
        f"ratio {timings[1] / timings[n]:.2f}x; rows identical: {rows[1] == rows[n]}"
    )
    job_engine.close()


if __name__ == "__main__":
    main()
