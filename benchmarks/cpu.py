"""The quantized CPU paths measured side by side: kernels chosen, first starts, decode and prefill, quality.

``python benchmarks/cpu.py [--layers N] [--rounds R] [--write docs/benchmarks.md]`` on the
random-weight model of rinna's shape (benchmarks/model.py). Every measurement runs in
a fresh process of its own (``cpu.py --worker KIND ARGS``), so each peak RSS is its own:

* **first start** of ``int8`` and ``int4`` from safetensors and from a ``pytorch_model.bin``
  (float16, written once next to the safetensors): quantizing, loading, the kernel probe
  and the planning, with an empty cache; the plan chosen and the time planning took.
* **generation**, the same prompt (about 50 tokens) and 32 greedy new tokens with
  transformers' own ``generate`` for every path, so that only the weights and kernels
  differ: transformers bfloat16 (``from_pretrained``, eager mode, no compile), rinna-cli
  int8 and int4 (cached weights, cached plan). The paths run interleaved, A B C A B C,
  ``--rounds`` times: other processes on the machine slow all of them alike, and the
  spread between rounds says how noisy the run was.
* **quality**: for every linear layer, the relative error (Frobenius norm) of its output
  against float32 for 16 random N(0, 1) input rows, int8 and int4, from the checkpoint.
* **llama.cpp**, where ``--llama-cpp DIR`` or ``$LLAMA_CPP`` names a checkout built with
  ``llama-bench`` and ``llama-quantize``: the same model as Q8_0 and Q4_0 GGUF (made once),
  ``llama-bench`` decode and prefill once per round (after the round's paths), and the engine's ratios to them
  round by round.

Ratios are reported as measured in this run; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PATHS = ("bf16", "int8", "int4")
NEW_TOKENS = 32


def _status_bytes(field: str) -> int | None:
    """A memory field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in bytes; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """This process's peak RSS: ``VmHWM`` (``ru_maxrss`` would start at the parent's RSS at fork)."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss() -> int:
    """This process's resident set now (``VmRSS``): after a reply, what stays between prompts."""
    return _status_bytes("VmRSS") or 0


def cpu_flags() -> tuple[str, list[str]]:
    """The CPU's name and the flags that decide the kernels (vector widths, BF16, AMX)."""
    from rinna_cli.kernels import cpu_identity

    name, all_flags = cpu_identity()
    flags = all_flags.split()
    wanted = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")) or f in ("sse4_2",)]
    return name, wanted


# --- workers -----------------------------------------------------------------------------


def _threads(args):
    import torch

    torch.set_num_threads(args["threads"])
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    return torch


def worker_first(args: dict) -> dict:
    """A first start of a scheme with an empty cache: quantize, load, probe, plan."""
    _threads(args)
    from transformers import AutoConfig

    from rinna_cli.quantized import load_quantized

    folder = Path(args["folder"])
    files = [folder / args["file"]]
    began = time.perf_counter()
    model, plan = load_quantized(folder, files, AutoConfig.from_pretrained(folder), Path(args["cache"]), args["scheme"])
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "plan": plan.describe(), "plan_seconds": plan.seconds, "timings_ms": plan.timings_ms,
            "peak_rss": peak_rss()}


def worker_generate(args: dict) -> dict:
    """Load one path, then time a prefill of the prompt and 32 greedy new tokens with transformers' generate."""
    torch = _threads(args)
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    folder = Path(args["folder"])
    began = time.perf_counter()
    plan = ""
    if args["path"] == "bf16":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    else:
        from rinna_cli.quantized import load_quantized

        model, chosen = load_quantized(folder, [folder / "model.safetensors"], AutoConfig.from_pretrained(folder),
                                       Path(args["cache"]), args["path"])
        plan = chosen.describe()
    model.eval()
    load_s = time.perf_counter() - began
    rss_loaded = peak_rss()

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    prompt = torch.tensor([args["prompt_ids"]])

    def run(tokens: int) -> tuple[float, float]:
        clock = Clock()
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=tokens,
                           min_new_tokens=tokens, streamer=clock, pad_token_id=0)
        first, last = clock.times[1], clock.times[-1]  # times[0] is the prompt
        return first - started, (len(clock.times) - 2) / (last - first)

    run(2)  # warm-up
    ttft, rate = run(NEW_TOKENS)
    result = {"load_s": load_s, "ttft_s": ttft, "decode_tok_s": rate, "plan": plan, "rss_loaded": rss_loaded,
              "peak_rss": peak_rss(), "rss_after": rss()}
    if args["path"] != "bf16":  # what `rinna ask` runs: the engine, its growing KV cache (no torch.cat per token)
        from rinna_cli.contract import Sampling
        from rinna_cli.engine import Engine
        from rinna_cli.tokenizer import Tokenizer

        engine = Engine(model, Tokenizer.from_folder(folder), "bench", 2048)
        for tokens in (2, NEW_TOKENS):
            engine.forget()
            reply = engine.generate(args["prompt_ids"], Sampling(0.0, 1.0, 0, 1.0, tokens, 0))
        result |= {"engine_ttft_s": reply.ttft_s, "engine_tok_s": reply.tokens_per_s,
                   "engine_tokens": reply.completion_tokens, "engine_rss_after": rss()}
    return result


def worker_quality(args: dict) -> dict:
    """Relative output error of every linear layer, int8 and int4, against float32."""
    torch = _threads(args)
    from torch import nn

    from rinna_cli import checkpoint, int4
    from rinna_cli.int8 import Int8Linear

    folder = Path(args["folder"])
    meta = checkpoint_meta(folder)
    wanted = {name for name in meta}
    errors: dict[str, dict[str, list[float]]] = {}
    torch.manual_seed(0)
    for group in checkpoint.layers([folder / "model.safetensors"], wanted):
        for name, weight in group.items():
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            linear.weight.data = weight.float()
            x = torch.randn(16, weight.shape[1])
            want = linear(x)
            kind = name.split(".")[-2]
            for scheme in ("int8", "int4"):
                if scheme == "int4" and (name.startswith("lm_head") or not int4.group_for(*reversed(weight.shape))):
                    continue
                module = Int8Linear.quantize(linear) if scheme == "int8" else int4.Int4Linear.quantize(linear)
                module.decode = module.batch = module.prefill = "int8pack_f32" if scheme == "int8" else "int4pack"
                got = module(x).float()
                errors.setdefault(kind, {}).setdefault(scheme, []).append(((got - want).norm() / want.norm()).item())
    return {"errors": errors}


def checkpoint_meta(folder: Path) -> set[str]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def worker_pickle(args: dict) -> dict:
    return {"folder": str(write_pickle(Path(args["folder"])))}


WORKERS = {"first": worker_first, "generate": worker_generate, "quality": worker_quality, "pickle": worker_pickle}


def run_worker(kind: str, args: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="rinna-cpu-bench-") as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(args["threads"]), "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, __file__, "--worker", kind, str(out), json.dumps(args)], env=env,
                              stdin=subprocess.DEVNULL, check=False)
        if done.returncode or not out.is_file():
            return {"failed": done.returncode}
        return json.loads(out.read_text())


# --- the report --------------------------------------------------------------------------


def write_pickle(folder: Path) -> Path:
    """``pytorch_model.bin`` (float16) beside the safetensors, in a folder of its own, written once."""
    target = folder.with_name(folder.name + "-bin")
    if (target / "pytorch_model.bin").is_file():
        return target
    import torch
    from safetensors.torch import load_file

    target.mkdir(exist_ok=True)
    for name in ("config.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(folder / name, target / name)
    torch.save(load_file(str(folder / "model.safetensors")), target / ".pytorch_model.bin.tmp")
    os.replace(target / ".pytorch_model.bin.tmp", target / "pytorch_model.bin")
    return target


def llama_models(source: Path, folder: Path) -> dict[str, Path]:
    """The same random model as Q8_0 and Q4_0 GGUF files beside it, made once (benchmarks/llama_gguf.py).

    ``source`` is a llama.cpp checkout built with ``llama-bench`` and ``llama-quantize`` in ``build/bin``.
    """
    tools = source / "build" / "bin"
    files = {kind: folder.parent / f"{folder.name}-{kind.lower()}.gguf" for kind in ("Q8_0", "Q4_0")}
    for kind, path in files.items():
        if path.is_file():
            continue
        part = path.with_suffix(".part")
        if kind == "Q8_0":
            command = [sys.executable, str(REPO / "benchmarks" / "llama_gguf.py"), str(source), str(part),
                       "--layers", str(json.loads((folder / "config.json").read_text())["num_hidden_layers"])]
        else:
            command = [str(tools / "llama-quantize"), "--allow-requantize", str(files["Q8_0"]), str(part), kind]
        log(f"llama.cpp: writing {path.name}")
        subprocess.run(command, check=True, capture_output=True)
        part.replace(path)
    return files


def llama_bench(source: Path, files: dict[str, Path], threads: int, prompt_tokens: int) -> dict:
    """One ``llama-bench`` repetition of each file: {"Q8_0": {"tg", "pp"}, ...} tokens/s (run once per round, so that
    a busy moment of a shared machine slows llama.cpp as much as the rounds beside it)."""
    command = [str(source / "build" / "bin" / "llama-bench"), *(a for p in files.values() for a in ("-m", str(p))),
               "-t", str(threads), "-p", str(prompt_tokens), "-n", str(NEW_TOKENS), "-r", "1", "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:  # its AMX repack path crashed on the AMX Xeon
        done = subprocess.run([*command, "--repack", "0"], capture_output=True, text=True, check=True)
    kinds = {str(path): kind for kind, path in files.items()}
    measured: dict = {}
    for entry in json.loads(done.stdout):
        measured.setdefault(kinds[entry["model_filename"]], {})["tg" if entry["n_gen"] else "pp"] = entry["avg_ts"]
    return measured


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def markdown(results: dict) -> str:
    """The report section: machine, kernels chosen, first starts, generation per path (an int4 column), layer errors."""
    gb = 1e9
    lines = [
        f"#### Quantized CPU paths ({results['date']}, {results['layers']} layers)",
        "",
        f"CPU: {results['cpu']}; flags: {' '.join(results['flags'])}; {results['threads']} threads; "
        f"load average {results['load_before']} before, {results['load_after']} after (other processes share the cores).",
        "",
    ]
    firsts = [(k.removeprefix("first "), v) for k, v in results.items() if k.startswith("first ") and "seconds" in v]
    if firsts:
        lines += ["| first start (empty cache) | s | planning s | peak RSS GB | plan chosen |", "|---|---:|---:|---:|---|"]
        for label, value in firsts:
            lines.append(f"| {label} | {value['seconds']:.0f} | {value['plan_seconds']:.1f} | {value['peak_rss'] / gb:.2f} | {value['plan']} |")
        lines.append("")
    runs = {path: [r for r in results.get(f"generate {path}", []) if "decode_tok_s" in r] for path in PATHS}
    if any(runs.values()):
        names = {"bf16": "transformers bfloat16", "int8": "rinna-cli int8", "int4": "rinna-cli int4"}
        lines += ["| | " + " | ".join(names[p] for p in PATHS) + " |", "|---|" + "---:|" * len(PATHS)]

        def row(label, cell):
            lines.append(f"| {label} | " + " | ".join(cell(runs[p]) if runs[p] else "—" for p in PATHS) + " |")

        row("decode tok/s, per round", lambda rs: ", ".join(f"{r['decode_tok_s']:.2f}" for r in rs))
        row(f"prefill of {results['prompt_tokens']} tokens (TTFT) s, per round", lambda rs: ", ".join(f"{r['ttft_s']:.2f}" for r in rs))
        row("RSS after load GB (last round)", lambda rs: f"{rs[-1]['rss_loaded'] / gb:.2f}")
        row("peak RSS GB (last round)", lambda rs: f"{rs[-1]['peak_rss'] / gb:.2f}")
        row("rinna-cli engine (`rinna ask`): decode tok/s, per round",
            lambda rs: ", ".join(f"{r['engine_tok_s']:.2f}" for r in rs) if "engine_tok_s" in rs[-1] else "—")
        row("rinna-cli engine: first token s, per round",
            lambda rs: ", ".join(f"{r['engine_ttft_s']:.2f}" for r in rs) if "engine_ttft_s" in rs[-1] else "—")
        row("RSS after the reply GB (last round)", lambda rs: f"{rs[-1]['rss_after'] / gb:.2f}" if "rss_after" in rs[-1] else "—")
        row("RSS after the engine's reply GB (last round)",
            lambda rs: f"{rs[-1]['engine_rss_after'] / gb:.2f}" if "engine_rss_after" in rs[-1] else "—")
        row("kernels", lambda rs: rs[-1]["plan"] or "oneDNN bfloat16")
        llama = results.get("llama.cpp")  # one llama-bench per round, after the round's paths
        if llama:
            prompt = results["prompt_tokens"]
            lines += ["", f"llama.cpp ({results['llama.cpp source']}), `llama-bench -t {results['threads']} -p "
                      f"{prompt} -n {NEW_TOKENS} -r 1` once per round: " + "; ".join(
                          f"{kind} decode " + ", ".join(f"{r[kind]['tg']:.2f}" for r in llama) + " tok/s, prefill of "
                          f"{prompt} tokens " + ", ".join(f"{prompt / r[kind]['pp']:.2f}" for r in llama) + " s"
                          for kind in llama[0])]
            for path, kind in (("int8", "Q8_0"), ("int4", "Q4_0")):
                pairs = [(r, b[kind]) for r, b in zip(runs[path], llama) if "engine_tok_s" in r and kind in b]
                if pairs:
                    lines.append(f"* rinna-cli {path} (engine) against llama.cpp {kind}, per round: decode ×"
                                 + ", ×".join(f"{r['engine_tok_s'] / b['tg']:.2f}" for r, b in pairs) + "; prefill ×"
                                 + ", ×".join(f"{prompt / b['pp'] / r['engine_ttft_s']:.2f}" for r, b in pairs))
        base = runs["bf16"]
        if base:
            lines.append("")
            for path in ("int8", "int4"):
                pairs = [(r["decode_tok_s"] / b["decode_tok_s"], b["ttft_s"] / r["ttft_s"]) for r, b in zip(runs[path], base)]
                if pairs:
                    lines.append(f"* {path} against transformers bfloat16, per round: decode ×"
                                 + ", ×".join(f"{d:.2f}" for d, _ in pairs) + "; prefill ×" + ", ×".join(f"{p:.2f}" for _, p in pairs))
        lines.append("")
    quality = results.get("quality", {}).get("errors")
    if quality:
        lines += ["Relative error of each linear layer's output against float32 (16 random rows, all layers: median / max):", "",
                  "| layer | int8 | int4 |", "|---|---:|---:|"]
        for kind, by_scheme in quality.items():
            cells = [f"{_median(by_scheme[s]):.4f} / {max(by_scheme[s]):.4f}" if s in by_scheme else "int8 (kept)" for s in ("int8", "int4")]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[cpu-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def collect(layers: int = 36, rounds: int = 2, threads: int = 2, first: bool = True, pickle: bool = True,
            quality: bool = True, llama: Path | None = None) -> dict:
    """Every measurement of the module docstring, as a dict (``markdown`` words it); llama.cpp's too when
    ``llama`` (default ``$LLAMA_CPP``) is a built llama.cpp checkout."""
    if llama is None and os.environ.get("LLAMA_CPP"):
        llama = Path(os.environ["LLAMA_CPP"])
    from benchmarks import model as bench_model
    from rinna_cli.prompt import USER, utterance
    from rinna_cli.tokenizer import Tokenizer
    from benchmarks.script import MESSAGES

    folder = bench_model.build(layers)
    cache = bench_model.cache_root() / "cpu-cache"
    prompt_ids = Tokenizer.from_folder(folder).encode(utterance(USER, MESSAGES[0]) + "<NL>システム: ")
    base = {"folder": str(folder), "threads": threads, "cache": str(cache)}
    cpu, flags = cpu_flags()
    results: dict = {"cpu": cpu, "flags": flags, "layers": layers, "threads": threads, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "load_before": "/".join(f"{x:.1f}" for x in os.getloadavg()), "prompt_tokens": len(prompt_ids)}
    if first:
        sources = [("safetensors", folder, "model.safetensors")]
        if pickle:
            log("writing pytorch_model.bin")
            # in a worker: a child's ru_maxrss starts at its parent's RSS at fork, so the parent stays small
            written = run_worker("pickle", base)
            sources.append(("pytorch_model.bin", Path(written["folder"]), "pytorch_model.bin"))
        for scheme in ("int8", "int4"):
            for label, source, file in sources:
                log(f"first start, {scheme} from {label}")
                with tempfile.TemporaryDirectory(prefix="rinna-first-") as fresh:
                    results[f"first {scheme} {label}"] = run_worker(
                        "first", {**base, "folder": str(source), "file": file, "cache": fresh, "scheme": scheme})
                log(json.dumps(results[f"first {scheme} {label}"])[:300])
    gguf = llama_models(llama, folder) if llama is not None else {}
    for round_ in range(rounds):
        for path in PATHS:
            log(f"round {round_ + 1}: {path}")
            outcome = run_worker("generate", {**base, "path": path, "prompt_ids": prompt_ids})
            results.setdefault(f"generate {path}", []).append(outcome)
            log(json.dumps(outcome)[:300])
        if llama is not None:
            log(f"round {round_ + 1}: llama.cpp")
            results["llama.cpp source"] = str(llama)
            results.setdefault("llama.cpp", []).append(llama_bench(llama, gguf, threads, len(prompt_ids)))
    if quality:
        log("layer errors")
        results["quality"] = run_worker("quality", base)
    results["load_after"] = "/".join(f"{x:.1f}" for x in os.getloadavg())
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-first", action="store_true", help="no first starts (reuse the cache)")
    parser.add_argument("--skip-pickle", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--llama-cpp", type=Path, help="a built llama.cpp checkout to compare with [default: $LLAMA_CPP]")
    args = parser.parse_args()

    results = collect(args.layers, args.rounds, args.threads, not args.skip_first, not args.skip_pickle,
                      not args.skip_quality, args.llama_cpp)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, out = sys.argv[2], Path(sys.argv[3])
        out.write_text(json.dumps(WORKERS[kind](json.loads(sys.argv[4]))))
        sys.exit(0)
    sys.exit(main())
