"""One measurement in its own process, so that its peak RSS is its own: ``worker.py KIND OUT.json [JSON args]``.

Kinds:

* ``recipe`` -- the model card's code path: float32 weights, and every turn the whole
  history re-formatted as text, re-encoded and prefilled (no cache reuse).
* ``cli`` -- rinna-cli's default path through its own API (Engine, Conversation).
* ``bandwidth`` -- memory read bandwidth: ``t.sum()`` over a large float32 tensor.
* ``stream`` -- the cost of rendering streamed text: 1,000 tokens of a tiny random
  model with rinna-cli's ReplyView on a TTY versus a callback that does nothing.

Each writes one JSON object to OUT.json. Times are wall-clock; ``started_at`` values
are ``time.time()`` so that the parent can measure from before it started the process.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

STARTED = time.time()
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``ru_maxrss`` is in KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return torch


def weight_bytes_per_token(model) -> tuple[int, dict]:
    """Bytes of parameters and buffers that one decode step reads: all but the input embedding table.

    The input embedding is only indexed (one row per token). int8 linears count
    their int8 weights, scales and biases as they are stored.
    """
    embedding = model.get_input_embeddings()
    skip = {id(t) for t in [*embedding.parameters(), *embedding.buffers()]}
    seen: set[int] = set()
    total = 0
    by_dtype: dict[str, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen or id(tensor) in skip:
            continue
        seen.add(id(tensor))
        size = tensor.numel() * tensor.element_size()
        total += size
        key = str(tensor.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + size
    return total, by_dtype


def _decode_rate(turns: list[dict]) -> float:
    """Tokens after the first over the time after the first, summed over all turns."""
    tokens = sum(max(t["completion_tokens"] - 1, 0) for t in turns)
    seconds = sum(t["decode_s"] for t in turns)
    return tokens / seconds if seconds > 0 else 0.0


# --- the model card's recipe --------------------------------------------------------------


def run_recipe(args: dict) -> dict:
    torch = _torch(args["threads"])
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from benchmarks.script import MESSAGES, SEED, TEMPERATURE
    from rinna_cli.prompt import SYSTEM, USER, format_prompt
    from rinna_cli.tokenizer import Tokenizer

    imported = time.time()

    class Clock(BaseStreamer):
        """Timestamps the first generated token (generate puts the prompt first)."""

        def __init__(self):
            self.puts = 0
            self.first_at = None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                self.first_at = time.perf_counter()

        def end(self):
            pass

    folder = Path(args["folder"])
    began = time.perf_counter()
    tokenizer = Tokenizer.from_folder(folder)
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    load_s = time.perf_counter() - began
    if info.get("missing_keys"):
        raise SystemExit(f"{folder}: the recipe's model lacks {sorted(info['missing_keys'])[:3]}")
    rss_after_load = peak_rss_bytes()
    special = tokenizer.special
    history: list[tuple[str, str]] = []
    turns = []
    torch.manual_seed(SEED)
    first_token_at = None
    for message in MESSAGES[: args["turns"]]:
        history.append((USER, message))
        started = time.perf_counter()
        prompt = format_prompt(history)
        token_ids = torch.tensor([tokenizer.encode(prompt)])
        clock = Clock()
        with torch.no_grad():
            output_ids = model.generate(
                token_ids.to(model.device),
                do_sample=True,
                max_new_tokens=args["new_tokens"],
                temperature=TEMPERATURE,
                pad_token_id=special.pad,
                bos_token_id=special.bos,
                eos_token_id=special.eos,
                streamer=clock,
            )
        ended = time.perf_counter()
        generated = output_ids.tolist()[0][token_ids.size(1) :]
        reply = tokenizer.decode(generated).replace("<NL>", "\n")
        history.append((SYSTEM, reply))
        first = clock.first_at or ended
        if first_token_at is None:
            first_token_at = time.time() - (time.perf_counter() - first)
        turns.append(
            {
                "prompt_tokens": token_ids.size(1),
                "prefilled_tokens": token_ids.size(1),
                "completion_tokens": len(generated),
                "ttft_s": first - started,
                "decode_s": ended - first,
            }
        )
    per_token, by_dtype = weight_bytes_per_token(model)
    return {
        "path": "recipe",
        "weights": "float32",
        "import_s": imported - STARTED,
        "load_s": load_s,
        "first_token_at": first_token_at,
        "turns": turns,
        "decode_tok_s": _decode_rate(turns),
        "bytes_per_token": per_token,
        "bytes_by_dtype": by_dtype,
        "peak_rss_after_load": rss_after_load,
        "peak_rss": peak_rss_bytes(),
    }


# --- rinna-cli's default path ------------------------------------------------------------


def run_cli(args: dict) -> dict:
    import inspect

    _torch(args["threads"])
    from benchmarks.script import MESSAGES, SEED, TEMPERATURE
    from rinna_cli.engine import Engine
    from rinna_cli.session import Conversation
    from rinna_cli.tokenizer import Tokenizer

    imported = time.time()
    folder = Path(args["folder"])
    load_kwargs = {"device": "cpu", "dtype": "auto"}
    if "quantize" in inspect.signature(Engine.load).parameters:
        load_kwargs["quantize"] = "auto"
    began = time.perf_counter()
    tokenizer = Tokenizer.from_folder(folder)
    engine = Engine.load(folder, "bench", tokenizer, **load_kwargs)
    load_s = time.perf_counter() - began
    rss_after_load = peak_rss_bytes()
    options = {
        "temperature": TEMPERATURE,
        "top_p": 1.0,
        "top_k": 50,
        "repetition_penalty": 1.0,
        "max_new_tokens": args["new_tokens"],
        "seed": SEED,
    }
    conversation = Conversation(tokenizer)
    turns = []
    first_token_at = None
    for message in MESSAGES[: args["turns"]]:
        conversation.add_user(message)
        seen: list[float] = []

        def on_text(text: str, seen=seen) -> None:
            if not seen:
                seen.append(time.time())

        reply = engine.generate(conversation.prompt_ids(), options, on_text=on_text, stop=None)
        conversation.add_reply(reply.text, reply.ids)
        if first_token_at is None:  # when the first text reached on_text (what a user sees)
            first_token_at = seen[0] if seen else time.time()
        decode_s = (reply.completion_tokens - 1) / reply.tokens_per_s if reply.tokens_per_s > 0 else 0.0
        turns.append(
            {
                "prompt_tokens": reply.prompt_tokens,
                "prefilled_tokens": reply.prefilled_tokens,
                "completion_tokens": reply.completion_tokens,
                "ttft_s": reply.ttft_s,
                "decode_s": decode_s,
            }
        )
    model = engine.model
    per_token, by_dtype = weight_bytes_per_token(model)
    linear_types = sorted(
        {type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__ and type(m).__name__ != "Module"}
    )
    weights = engine.dtype or "?"
    if engine.dtype == "int8":
        head = model.get_output_embeddings()
        weights = f"int8 (decode {head.decode}, prefill {head.prefill})"
    return {
        "path": "cli",
        "weights": weights,
        "load_kwargs": load_kwargs,
        "linear_types": linear_types,
        "import_s": imported - STARTED,
        "load_s": load_s,
        "first_token_at": first_token_at,
        "turns": turns,
        "decode_tok_s": _decode_rate(turns),
        "bytes_per_token": per_token,
        "bytes_by_dtype": by_dtype,
        "peak_rss_after_load": rss_after_load,
        "peak_rss": peak_rss_bytes(),
    }


# --- memory bandwidth --------------------------------------------------------------------


def run_bandwidth(args: dict) -> dict:
    torch = _torch(args["threads"])
    count = int(args["gib"] * (1 << 30)) // 4
    tensor = torch.ones(count, dtype=torch.float32)
    tensor.sum()  # fault the pages in, warm up
    times = []
    for _ in range(args["repeats"]):
        began = time.perf_counter()
        tensor.sum()
        times.append(time.perf_counter() - began)
    size = tensor.numel() * tensor.element_size()
    return {
        "bytes": size,
        "times_s": times,
        "best_gb_s": size / min(times) / 1e9,
        "median_gb_s": size / statistics.median(times) / 1e9,
    }


# --- streaming overhead ------------------------------------------------------------------


def run_stream(args: dict) -> dict:
    import inspect
    import tempfile

    _torch(args["threads"])
    from rinna_cli.engine import Engine
    from rinna_cli.render import ReplyView
    from rinna_cli.session import Conversation
    from rinna_cli.tokenizer import Tokenizer
    from tests.fixtures.models import build_tiny_random

    tokens = args["tokens"]
    with tempfile.TemporaryDirectory(prefix="rinna-bench-tiny-") as tmp:
        folder = build_tiny_random(Path(tmp) / "tiny")
        tokenizer = Tokenizer.from_folder(folder)
        load_kwargs = {"device": "cpu", "dtype": "auto"}
        if "quantize" in inspect.signature(Engine.load).parameters:
            load_kwargs["quantize"] = "auto"
        engine = Engine.load(folder, "tiny", tokenizer, **load_kwargs)
        conversation = Conversation(tokenizer)
        conversation.add_user("吾輩は猫である。名前はまだ無い。")
        prompt = conversation.prompt_ids()
        devnull = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - open for the whole run
        view = ReplyView(file=devnull, tty=True)

        def options(seed: int) -> dict:
            return {
                "temperature": 0.7,
                "top_p": 1.0,
                "top_k": 50,
                "repetition_penalty": 1.0,
                "max_new_tokens": tokens,
                "seed": seed,
            }

        def timed(seed: int, on_text) -> tuple[float, float, int]:
            """Wall-clock and CPU seconds of one generation (CPU time is robust to other processes)."""
            engine.forget()
            began, began_cpu = time.perf_counter(), time.process_time()
            reply = engine.generate(prompt, options(seed), on_text=on_text)
            return time.perf_counter() - began, time.process_time() - began_cpu, reply.completion_tokens

        def ignore(_text: str) -> None:
            pass

        seed = None
        for candidate in range(1234, 1234 + 50):  # a seed whose reply runs the full length (no </s>)
            _, _, count = timed(candidate, ignore)
            if count == tokens:
                seed = candidate
                break
        if seed is None:
            raise SystemExit(f"no seed of 50 gave {tokens} tokens without </s>")
        timed(seed, view.write)  # warm-up of the rendering path
        inside = [0.0]

        def render(text: str) -> None:
            """view.write, timed: the renderer's own cost, free of the run-to-run noise of generation."""
            began = time.perf_counter()
            view.write(text)
            inside[0] += time.perf_counter() - began

        _, _, count = timed(seed, render)
        render_s = inside[0]
        wall = {"plain": [], "rendered": []}
        cpu = {"plain": [], "rendered": []}
        for rep in range(args["repeats"]):
            order = [("plain", ignore), ("rendered", view.write)]
            if rep % 2:
                order.reverse()
            for name, callback in order:
                seconds, cpu_seconds, count = timed(seed, callback)
                if count != tokens:
                    raise SystemExit(f"seed {seed} gave {count} tokens, not {tokens}, on repetition {rep}")
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)
        devnull.close()

    def overheads(times: dict) -> list[float]:
        return [100.0 * (r / p - 1.0) for p, r in zip(times["plain"], times["rendered"])]

    return {
        "tokens": tokens,
        "seed": seed,
        "wall_s": wall,
        "cpu_s": cpu,
        "overhead_pct": overheads(wall),
        "median_overhead_pct": statistics.median(overheads(wall)),
        "min_overhead_pct": 100.0 * (min(wall["rendered"]) / min(wall["plain"]) - 1.0),
        "cpu_overhead_pct": statistics.median(overheads(cpu)),
        "median_plain_s": statistics.median(wall["plain"]),
        "median_rendered_s": statistics.median(wall["rendered"]),
        "min_plain_s": min(wall["plain"]),
        "min_rendered_s": min(wall["rendered"]),
        "render_s": render_s,
        "render_pct": 100.0 * render_s / statistics.median(wall["plain"]),
    }


def run_build(args: dict) -> dict:
    from benchmarks.model import build

    began = time.perf_counter()
    folder = build(args["layers"], Path(args["root"]) if args.get("root") else None, log=lambda s: print(s, file=sys.stderr))
    return {"folder": str(folder), "seconds": time.perf_counter() - began}


KINDS = {"recipe": run_recipe, "cli": run_cli, "bandwidth": run_bandwidth, "stream": run_stream, "build": run_build}

if __name__ == "__main__":
    kind, out = sys.argv[1], Path(sys.argv[2])
    arguments = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    result = KINDS[kind](arguments)
    result["started_at"] = STARTED
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
