"""The model card's recipe versus rinna-cli's default path, measured side by side in one run.

Builds (once, cached under ``${XDG_CACHE_HOME:-~/.cache}/rinna-cli-bench/``) a random-weight
model of rinna/japanese-gpt-neox-3.6b-instruction-sft's exact shape, then runs each path
in its own process over the same scripted chat and prints a markdown report: load time,
peak RSS, time to first token at the first and last turn, decode speed and how close it
comes to the memory-bandwidth bound measured in the same run; start-up of ``rinna --help``
and ``rinna tokenize`` against ``python -c "import torch"``; the cost of rendering
streamed text. ``--write docs/benchmarks.md`` puts the report into that file.

Everything is reported as measured in this run, as ratios between paths; nothing here
asserts a threshold.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import cpu as cpu_paths  # noqa: E402
from benchmarks import model as bench_model  # noqa: E402
from benchmarks.script import MESSAGES, SEED, TEMPERATURE  # noqa: E402

WORKER = Path(__file__).resolve().parent / "worker.py"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
CARD = "rinna/japanese-gpt-neox-3.6b-instruction-sft"

INTRO = f"""# Benchmarks

`make bench` compares, in one run on one machine, the model card's recipe for
[{CARD}](https://huggingface.co/{CARD}) with rinna-cli's default path, and writes the report below. `make bench-quick` runs
the same on a 4-layer model with 8-token replies and fewer repetitions, in about three
minutes, and only prints its report. Both are `benchmarks/bench.py` (`--help` lists its
options).

What is measured:

* **The model.** A random-weight model of rinna's exact shape (GPT-NeoX, 36 layers,
  hidden 2816, 22 heads, vocabulary 32000, float16 safetensors of 7.2 GB, rinna's
  `config.json` and a 32000-piece rinna-style `spiece.model`), built once and cached in
  `${{XDG_CACHE_HOME:-~/.cache}}/rinna-cli-bench/`. Random weights cost the same to run as
  the real ones; the replies are noise, which does not matter here.
* **The chat.** 8 fixed Japanese user messages of about 40 tokens; every reply is 32
  sampled tokens (temperature 0.7, fixed seed).
* **Card recipe**: what the model card's code does under transformers 4.x:
  `from_pretrained` in float32, and for every turn the whole history formatted as text,
  encoded and passed to `model.generate` (no cache reuse).
* **rinna-cli**: its own `Engine`/`Conversation` API with the defaults (`--device cpu
  --dtype auto`, int8 weights on the CPU where rinna-cli has them): the KV cache is kept
  across turns so each turn prefills only the new message. Run twice: the *first start*
  (after deleting rinna-cli's cache, so it converts the weights) and the *second start*.
* Each path runs in its own process; **peak RSS** is that process's `ru_maxrss`. The
  weights file is read once before each load, so load times exclude the disk.
* **TTFT** (time to first token) runs from the start of a turn to its first generated
  token; **decode** is the tokens after the first over the time after the first, over
  all turns. **Start → first token** runs from launching the process to the first token
  of turn 1 (Python start-up, imports and load included).
* **Bound**: memory bandwidth (`t.sum()` over a 2 GiB float32 tensor with the same
  threads, best of 5, measured at the start and the end of the run, the higher taken)
  divided by the bytes of weights a decode step reads (every parameter and buffer
  except the input embedding table, as loaded by that path). The KV cache is left out,
  so the bound is slightly optimistic at later turns.
* **Start-up**: the median wall-clock time of 5 runs (after one warm-up run) of
  `rinna --help`, `rinna tokenize --count` and `python -c "import torch"`.
* **Streaming**: generating 1,000 tokens with a tiny random model (1 thread), rendering
  every chunk with rinna-cli's `ReplyView` on a terminal (written to /dev/null) versus a
  callback that does nothing, in interleaved pairs; the median of the per-pair overheads
  in wall-clock time, and in CPU time (which other processes disturb less).

Reproduce with `make bench` (full size: the float32 recipe holds 14.4 GB of weights, so
it needs about 16 GB of free memory, and it takes a while) or `make bench-quick`. Other
processes on the machine make the numbers noisy; the load average is recorded with each
run.

## Results

"""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- running the workers -----------------------------------------------------------------


def worker_env(home: Path, threads: int) -> dict:
    env = dict(os.environ)
    env.update(
        RINNA_CLI_HOME=str(home),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run_worker(kind: str, args: dict, env: dict) -> dict:
    """Run ``worker.py kind`` in a fresh process; its result, with ``launched_at`` added."""
    with tempfile.TemporaryDirectory(prefix="rinna-bench-") as tmp:
        out = Path(tmp) / "result.json"
        launched = time.time()
        done = subprocess.run(
            [sys.executable, str(WORKER), kind, str(out), json.dumps(args)],
            env=env,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            check=False,
        )
        if done.returncode != 0 or not out.is_file():
            raise SystemExit(f"bench: the {kind} worker failed (exit status {done.returncode})")
        result = json.loads(out.read_text(encoding="utf-8"))
    result["launched_at"] = launched
    return result


def read_through(path: Path) -> None:
    """Read a file once so that the load that follows finds it in the page cache."""
    with open(path, "rb") as file:
        while file.read(1 << 24):
            pass


def median_wall(command: list[str], env: dict, runs: int) -> dict:
    def once() -> float:
        began = time.perf_counter()
        done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, check=False)
        seconds = time.perf_counter() - began
        if done.returncode != 0:
            raise SystemExit(f"bench: {shlex.join(command)} failed: {done.stderr.decode(errors='replace')[-500:]}")
        return seconds

    once()  # warm-up: page cache, .pyc files
    times = [once() for _ in range(runs)]
    return {"median_s": statistics.median(times), "times_s": times}


# --- the machine -------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    memory = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
    except OSError:
        pass

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "?"

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


def load_average() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


# --- the report --------------------------------------------------------------------------


def _num(value, digits: int = 2, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def _ratio(a, b, digits: int = 1) -> str:
    return "—" if a is None or b is None or b == 0 else f"×{a / b:.{digits}f}"


def _derived(path: dict | None, bandwidth: float) -> dict:
    if not path:
        return {}
    turns = path["turns"]
    bound = bandwidth / path["bytes_per_token"] if path["bytes_per_token"] else None
    return {
        "start_to_first": path["first_token_at"] - path["launched_at"],
        "ttft_first": turns[0]["ttft_s"],
        "ttft_last": turns[-1]["ttft_s"],
        "ttft_growth": turns[-1]["ttft_s"] / turns[0]["ttft_s"] if turns[0]["ttft_s"] > 0 else None,
        "bound": bound,
        "pct_bound": 100 * path["decode_tok_s"] / bound if bound else None,
        "completion_tokens": sum(t["completion_tokens"] for t in turns),
    }


def report(results: dict) -> str:
    m, opts = results["machine"], results["options"]
    paths = [("card recipe", results.get("recipe")), ("rinna-cli first start", results.get("cli_first")),
             ("rinna-cli second start", results.get("cli_second"))]
    bandwidth = max(b["best_gb_s"] for b in results["bandwidth"]) * 1e9
    derived = [_derived(p, bandwidth) for _, p in paths]
    model = results["model"]
    turns = opts["turns"]
    lines = [
        f"### {m['date']}: {model['layers']} of {bench_model.FULL_LAYERS} layers"
        + ("" if model["layers"] == bench_model.FULL_LAYERS else " (a reduced model: compare ratios, not absolutes)"),
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {_num((m['memory_bytes'] or 0) / 1e9, 1)} GB RAM, {m['os']}; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}; "
        f"{opts['threads']} torch threads; load average {results['load_before']} before, {results['load_after']} after "
        f"the run, which took {results['seconds']:.0f} s.",
        "",
        f"Model: random weights of rinna's shape with {model['layers']} layers, float16 safetensors "
        f"{model['file_bytes'] / 1e9:.2f} GB ({model['folder']}). Chat: {turns} user turns of "
        f"{min(model['message_tokens'][:turns])}–{max(model['message_tokens'][:turns])} tokens, "
        f"{opts['new_tokens']} new tokens per reply (temperature {TEMPERATURE}, seed {SEED}).",
        "",
        "Memory bandwidth: "
        + ", ".join(f"{b['best_gb_s']:.1f}" for b in results["bandwidth"])
        + f" GB/s (`t.sum()` over {opts['bandwidth_gib']:g} GiB float32, {opts['threads']} threads, best of 5; "
        "at the start and the end of the run); the bound uses the higher.",
        "",
        "| | " + " | ".join(name for name, _ in paths) + " |",
        "|---|" + "---:|" * len(paths),
    ]

    def row(label: str, cell) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(p, d) if p else "—" for (_, p), d in zip(paths, derived)) + " |")

    row("weights", lambda p, d: p["weights"])
    row("start → first token, s", lambda p, d: _num(d["start_to_first"], 1))
    row("load, s", lambda p, d: _num(p["load_s"], 1))
    row("peak RSS, GB", lambda p, d: _num(p["peak_rss"] / 1e9, 2))
    row("TTFT turn 1, s", lambda p, d: _num(d["ttft_first"], 2))
    row(f"TTFT turn {turns}, s", lambda p, d: _num(d["ttft_last"], 2))
    row(f"TTFT turn {turns} / turn 1", lambda p, d: _num(d["ttft_growth"], 1))
    row(f"tokens prefilled at turn {turns}", lambda p, d: f"{p['turns'][-1]['prefilled_tokens']} of {p['turns'][-1]['prompt_tokens']}")
    row("decode, tok/s", lambda p, d: _num(p["decode_tok_s"], 2))
    row("weights read per token, GB", lambda p, d: _num(p["bytes_per_token"] / 1e9, 2))
    row("bound, tok/s", lambda p, d: _num(d["bound"], 2))
    row("decode, % of bound", lambda p, d: _num(d["pct_bound"], 0, " %"))
    row("tokens generated", lambda p, d: str(d["completion_tokens"]))
    if results.get("int8_cache_bytes"):
        lines += ["", f"The first start left {results['int8_cache_bytes'] / 1e9:.2f} GB in rinna-cli's cache "
                  f"({', '.join(results['int8_cache_files'])}); the second start loads that."]
    recipe, first, second = (p for _, p in paths)
    d_recipe, d_first, d_second = derived
    if recipe and (first or second):
        lines += [
            "",
            "Ratios (rinna-cli first start / second start against the card recipe):",
            "",
            f"* decode speed-up: {_ratio(first and first['decode_tok_s'], recipe['decode_tok_s'])} / "
            f"{_ratio(second and second['decode_tok_s'], recipe['decode_tok_s'])}",
            f"* TTFT turn {turns} speed-up: {_ratio(d_recipe['ttft_last'], d_first.get('ttft_last'))} / "
            f"{_ratio(d_recipe['ttft_last'], d_second.get('ttft_last'))}",
            f"* TTFT turn 1 speed-up: {_ratio(d_recipe['ttft_first'], d_first.get('ttft_first'))} / "
            f"{_ratio(d_recipe['ttft_first'], d_second.get('ttft_first'))}",
            f"* load: {_ratio(recipe['load_s'], first and first['load_s'])} / "
            f"{_ratio(recipe['load_s'], second and second['load_s'])} faster; "
            f"start → first token: {_ratio(d_recipe['start_to_first'], d_first.get('start_to_first'))} / "
            f"{_ratio(d_recipe['start_to_first'], d_second.get('start_to_first'))} faster",
            f"* peak RSS: {_ratio(first and first['peak_rss'], recipe['peak_rss'], 2)} / "
            f"{_ratio(second and second['peak_rss'], recipe['peak_rss'], 2)} of the recipe's",
        ]
    # time to first token by turn
    shown = [(name, p) for name, p in paths if p]
    if shown:
        lines += ["", "TTFT by turn, s (tokens prefilled):", "",
                  "| turn | " + " | ".join(name for name, _ in shown) + " |", "|---:|" + "---:|" * len(shown)]
        for index in range(turns):
            cells = [f"{p['turns'][index]['ttft_s']:.2f} ({p['turns'][index]['prefilled_tokens']})" for _, p in shown]
            lines.append(f"| {index + 1} | " + " | ".join(cells) + " |")
    startup = results.get("startup")
    if startup:
        base = startup["python -c \"import torch\""]["median_s"]
        lines += ["", f"Start-up, median of {opts['startup_runs']} runs:", "",
                  "| command | s | vs `import torch` |", "|---|---:|---:|"]
        for label, value in startup.items():
            lines.append(f"| `{label}` | {value['median_s']:.2f} | {value['median_s'] / base:.2f} |")
    stream = results.get("stream")
    if stream:
        lines += [
            "",
            f"Streaming: rendering {stream['tokens']:,} tokens with `ReplyView` (terminal, to /dev/null) spends "
            f"{stream['render_s'] * 1000:.1f} ms inside the renderer, {stream['render_pct']:.2f} % of the generation "
            f"time on the tiny random model. Timing whole generations with and without it gives "
            f"{stream['median_overhead_pct']:.1f} %, the median of "
            f"{len(stream['overhead_pct'])} interleaved pairs (per pair: "
            + ", ".join(f"{x:.1f}" for x in stream["overhead_pct"])
            + f" %); fastest against fastest {stream['min_overhead_pct']:.1f} % "
            f"({stream['min_rendered_s']:.2f} s vs {stream['min_plain_s']:.2f} s); "
            f"in CPU time {stream['cpu_overhead_pct']:.1f} %.",
        ]
    if results.get("cpu_paths"):
        lines += ["", cpu_paths.markdown(results["cpu_paths"])]
    notes = results.get("notes")
    if notes:
        lines += [""] + [f"Note: {note}" for note in notes]
    return "\n".join(lines) + "\n"


def cpu_class() -> str:
    """The CPU class a run belongs to: model name, torch's vector capability, AMX or not (Zen 3 and Zen 5 share a name)."""
    import torch

    name, flags = cpu_paths.cpu_flags()
    amx = " AMX" if any(flag.startswith("amx") for flag in flags) else ""
    return f"{name} / {torch.backends.cpu.get_cpu_capability()}{amx}"


def write_section(path: Path, section: str, key: str) -> None:
    """Replace the run of CPU class ``key`` in ``path`` (between its bench markers), keeping other classes' runs.

    The first run ever written (before runs were kept per class) has bare markers and is kept too.
    """
    text = path.read_text(encoding="utf-8") if path.is_file() else INTRO
    begin, end = f"<!-- bench:begin {key} -->", f"<!-- bench:end {key} -->"
    block = f"{begin}\n{section}{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    elif "<!-- bench:begin" in text:  # newest class first, after the intro
        start = text.index("<!-- bench:begin")
        text = text[:start] + block + "\n\n" + text[start:]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


# --- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=bench_model.FULL_LAYERS, help="layers of the model (rinna: 36)")
    parser.add_argument("--turns", type=int, default=len(MESSAGES), help=f"user turns, 1..{len(MESSAGES)}")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per reply")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every path")
    parser.add_argument("--skip-recipe", action="store_true", help="leave out the card recipe (the slow path)")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--skip-stream", action="store_true")
    parser.add_argument("--skip-cpu", action="store_true", help="leave out the quantized paths (benchmarks/cpu.py)")
    parser.add_argument("--cpu-rounds", type=int, default=2, help="interleaved rounds of the quantized paths")
    parser.add_argument("--startup-runs", type=int, default=5)
    parser.add_argument("--stream-tokens", type=int, default=1000)
    parser.add_argument("--stream-repeats", type=int, default=9)
    parser.add_argument("--bandwidth-gib", type=float, default=2.0)
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the model is built (default: "
                        "${XDG_CACHE_HOME:-~/.cache}/rinna-cli-bench)")
    parser.add_argument("--write", type=Path, metavar="PATH", help="put the report into PATH (e.g. docs/benchmarks.md)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also save every measurement as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.turns <= len(MESSAGES):
        parser.error(f"--turns must be 1..{len(MESSAGES)}")

    root = (args.cache_dir or bench_model.cache_root()).expanduser().resolve()
    home = root / "rinna-cli-home"  # RINNA_CLI_HOME of every rinna-cli process of the benchmark
    env = worker_env(home, args.threads)
    results: dict = {
        "command": shlex.join(["python", "benchmarks/bench.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_before": load_average(),
        "notes": [],
    }
    started = time.perf_counter()

    log(f"model: {args.layers} layers under {root}")
    built = run_worker("build", {"layers": args.layers, "root": str(root)}, env)
    folder = Path(built["folder"])
    from rinna_cli.prompt import USER, utterance
    from rinna_cli.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(folder)
    results["model"] = {
        "layers": args.layers,
        "folder": str(folder).replace(str(Path.home()), "~"),
        "file_bytes": (folder / "model.safetensors").stat().st_size,
        "message_tokens": [len(tokenizer.encode(utterance(USER, m))) for m in MESSAGES],
    }
    chat = {"folder": str(folder), "turns": args.turns, "new_tokens": args.new_tokens, "threads": args.threads}
    bandwidth_args = {"gib": args.bandwidth_gib, "repeats": 5, "threads": args.threads}

    log("memory bandwidth")
    results["bandwidth"] = [run_worker("bandwidth", bandwidth_args, env)]

    if not args.skip_recipe:
        log(f"card recipe: float32, {args.turns} turns")
        read_through(folder / "model.safetensors")
        results["recipe"] = run_worker("recipe", chat, env)

    cache = home / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    log("rinna-cli, first start (no cache)")
    read_through(folder / "model.safetensors")
    results["cli_first"] = run_worker("cli", chat, env)
    files = sorted(p for p in cache.rglob("*") if p.is_file()) if cache.is_dir() else []
    results["int8_cache_bytes"] = sum(p.stat().st_size for p in files)
    results["int8_cache_files"] = [p.name for p in files]
    log("rinna-cli, second start")
    results["cli_second"] = run_worker("cli", chat, env)
    if "quantize" not in results["cli_first"].get("load_kwargs", {}):
        results["notes"].append("this rinna-cli's Engine.load has no `quantize` parameter: both starts load "
                                f"{results['cli_first']['weights']} weights.")

    log("memory bandwidth again")
    results["bandwidth"].append(run_worker("bandwidth", bandwidth_args, env))

    if not args.skip_startup:
        log("start-up")
        bin_dir = Path(sys.executable).parent
        rinna = shutil.which("rinna", path=str(bin_dir)) or "rinna"
        results["startup"] = {
            "rinna --help": median_wall([rinna, "--help"], env, args.startup_runs),
            "rinna tokenize --count 猫": median_wall(
                [rinna, "tokenize", "--model", str(folder), "--count", "猫"], env, args.startup_runs
            ),
            'python -c "import torch"': median_wall([sys.executable, "-c", "import torch"], env, args.startup_runs),
        }

    if not args.skip_stream:
        log("streaming overhead (tiny model)")
        results["stream"] = run_worker(
            "stream", {"tokens": args.stream_tokens, "repeats": args.stream_repeats, "threads": 1}, env
        )

    if not args.skip_cpu:
        log("quantized CPU paths: first starts, kernels chosen, int8 / int4 / bfloat16 interleaved (benchmarks/cpu.py)")
        results["cpu_paths"] = cpu_paths.collect(args.layers, args.cpu_rounds, args.threads)

    results["load_after"] = load_average()
    try:
        busy = float(results["load_before"].split("/")[0])
    except ValueError:
        busy = 0.0
    if busy > 0.5 * (os.cpu_count() or 1):
        results["notes"].append(f"other processes were running when the benchmark started (load average "
                                f"{results['load_before']} on {os.cpu_count()} cores): the timings are noisy.")
    results["seconds"] = time.perf_counter() - started
    log(f"done in {results['seconds']:.0f} s")
    text = report(results)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    if args.write:
        write_section(args.write, text, cpu_class())
        log(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
