"""Which kernels multiply the quantized weights on this machine: measured once, then cached.

The fastest kernel differs by CPU class (docs/benchmarks.md): on a Zen 3 (AVX2) torch's
``_int_mm`` with int8 activations decoded fastest and float32 attention beat bfloat16;
on a Xeon with AMX the weight-only int8 kernel with bfloat16 activations was 1.5x
faster and bfloat16 is native. So at the first start on a machine the candidates are
timed on the model's own layers, for a decode step (1 row), a batched decode step (8
rows, among the kernels giving the decode kernel's very rows) and a prefill (48 rows),
with float32 and with bfloat16 activations (which also sets the dtype of attention and
the KV cache), and the fastest of each is used; a decode step's attention is torch's SDPA
or rinna-cli's own (:mod:`rinna_cli.attention`), whichever is faster. The :class:`Plan` is cached next
to the quantized weights, keyed by what it depends on (:func:`machine_key`): a new CPU,
torch or thread count plans again.

A kernel is first run on small inputs in a child process (:func:`start_probe`): one that
is missing, raises, gives wrong results or crashes the process is left out, never fatal.
A probe that ran to its end is cached for the CPU and torch (:data:`PROBE_FILE`), so the
next model's first start needs no child. Planning stops at :data:`BUDGET_S` and keeps the
best measured so far.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rinna_cli import int8, mapped, native
from rinna_cli.int4 import Int4Linear
from rinna_cli.int8 import Int8Linear, QuantLinear

PLAN_FORMAT = 3
PROBE_FILE = "kernels-probe.json"  # in the cache folder, beside the schemes' folders
BUDGET_S = 3.5  # measuring, on top of the probe (which runs while the weights are quantized)
# A plan measured while other processes took more than this share of its threads' time is used but not saved: its
# timings rank the kernels by when each ran (a re-plan during a user trial chose SDPA over a 6.6x faster attend).
BUSY_LIMIT = 0.15
# Waits shorter than this in all are the scheduler's noise: a first start's threads waking waited 5 ms, 15-20 % of
# a test model's 25-35 ms plan. The race's fastest of several rounds absorbs them.
_NOISE_S = 0.1
DECODE_ROWS, BATCH_ROWS, PREFILL_ROWS = 1, int8.DECODE_ROWS, 48
ATTENTION_TOKENS = 512  # the KV cache length the attention of a decode step is timed at
ATTENTIONS = ("sdpa", "attend")  # a decode step's attention: torch's or rinna-cli's (rinna_cli.attention)
ACTIVATIONS = {"bfloat16": torch.bfloat16, "float32": torch.float32}
KINDS: dict[str, type[QuantLinear]] = {"int8": Int8Linear, "int4": Int4Linear}
_SAMPLES = 2  # modules per shape timed for decoding: more than fits in a CPU cache
_HOPELESS = 10  # a kernel this many times slower than the fastest after the warm-up is not timed again
# A decode kernel this much slower than the fastest still decodes for its kind if it is rinna-cli's own (the first of
# _UNMEASURED): within the host's noise, and it multiplies a batch of 8 rows in about the time of one, where torch's
# int4 kernel took 3.0-3.6 times as long (Zen 5 of 2026-12-04), and a batch takes the decode kernel or its kin.
_TIE = 0.05
# What a kind decodes with when the budget ran out before any of its kernels was timed: rinna-cli's own where they
# run (the fastest measured on every CPU class but the AMX Xeon's int8), else torch's.
_UNMEASURED = {"int8": ("int8dot", "int_mm"), "int4": ("int4dot", "int4pack")}


@dataclass(frozen=True)
class Plan:
    """The kernels of each kind of quantized layer, the activation dtype, and how they were chosen."""

    kernels: dict[str, tuple[str, str, str]]  # kind ("int8", "int4") -> kernels (decode, batch, prefill)
    activation: str  # "bfloat16" or "float32"
    key: dict = field(default_factory=dict)  # what the plan was measured on (machine_key)
    timings_ms: dict = field(default_factory=dict)  # per candidate, for the benchmark report
    seconds: float = 0.0  # time spent planning
    whole: bool = True  # every phase of every kind measured (a plan the budget cut short is not saved)
    attention: str = "sdpa"  # a decode step's: "sdpa" (torch's) or "attend" (rinna-cli's, rinna_cli.attention)
    busy: float = 0.0  # the share of its threads' time spent waiting for a core while measuring (other processes)

    @property
    def crowded(self) -> bool:
        """Measured while other processes took the cores (:data:`BUSY_LIMIT`): its ranking is not to be trusted."""
        return self.busy > BUSY_LIMIT

    @property
    def settled(self) -> bool:
        """Worth saving: every phase measured, on cores other processes left alone (else measured again next start)."""
        return self.whole and not self.crowded

    def describe(self) -> str:
        """One line for ``--stats`` and ``--json``, e.g.
        ``int8 decode int8dot, batch int8dot, prefill int_mm; float32, attention attend``."""
        parts = [
            f"{kind} decode {decode}, batch {batch}, prefill {prefill}"
            for kind, (decode, batch, prefill) in self.kernels.items()
        ]
        busy = " (measured while other programs ran: again at the next start)" if self.crowded else ""
        return "; ".join(parts) + f"; {self.activation}, attention {self.attention}{busy}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        data["kernels"] = {kind: tuple(pair) for kind, pair in data["kernels"].items()}
        return cls(**data)


def cpu_identity() -> tuple[str, str]:
    """The CPU's model name and its feature flags (``/proc/cpuinfo`` where there is one)."""
    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu, flags


def machine_key(scheme: str) -> dict:
    """What a plan depends on: the CPU (model and flags), torch, the thread count, the scheme, and the C compiler
    that builds rinna-cli's own kernels and their sources (a compiler installed later, or a new version of the
    kernels, is worth a new probe and plan)."""
    cpu, flags = cpu_identity()
    return {
        "format": PLAN_FORMAT,
        "scheme": scheme,
        "cpu": cpu,
        "flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "compiler": native.compiler() or "",
        "native": native.version(),
    }


def kinds_of(model: nn.Module) -> dict[str, list[QuantLinear]]:
    """The model's quantized layers by kind."""
    found: dict[str, list[QuantLinear]] = {}
    for module in model.modules():
        for kind, cls in KINDS.items():
            if type(module) is cls:
                found.setdefault(kind, []).append(module)
    return found


def apply(model: nn.Module, plan: Plan) -> None:
    """Set every quantized layer's kernels and the attention, and convert the model's float tensors to the
    activation dtype."""
    from rinna_cli import attention

    attention.use(model, plan.attention)
    dtype = ACTIVATIONS[plan.activation]
    for kind, modules in kinds_of(model).items():
        decode, batch, prefill = plan.kernels[kind]
        for module in modules:
            module.decode, module.batch, module.prefill, module.activation = decode, batch, prefill, dtype
            module.forget()  # what measuring other kernels derived (torch's int4 layout of a sample layer)
            module.prepare()
    quantized = {
        id(p)
        for m in model.modules()
        if isinstance(m, QuantLinear)
        for name, p in m.named_parameters()
        if name != "bias"
    }
    for parameter in model.parameters():
        if id(parameter) not in quantized and parameter.is_floating_point() and parameter.dtype != dtype:
            source, parameter.data = parameter.data, parameter.data.to(dtype)
            # The float32 embedding read from the cache (0.36 GB) would stay resident with its copy.
            pages = mapped.file_pages(source) if source.numel() * source.element_size() >= 2**24 else None
            if pages is not None:
                pages.release()


# --- probing in a child process ----------------------------------------------------------

_PROBE = r"""
import sys, torch
from torch import nn
from rinna_cli.int8 import Int8Linear
from rinna_cli import mapped
from rinna_cli.int4 import Int4Linear
torch.manual_seed(0)
for kind, cls in (("int8", Int8Linear), ("int4", Int4Linear)):
    linear = nn.Linear(256, 96, bias=True)
    module = cls.quantize(linear)
    for name in cls.KERNELS:
        try:
            module.decode = module.batch = module.prefill = name
            good = True
            for rows in (1, 3, 48):
                x = torch.randn(rows, 256)
                want = linear(x)
                got = module(x).float()
                good = good and bool(((got - want).norm() / want.norm()) < (0.05 if kind == "int8" else 0.25))
        except Exception:
            good = False
        print(f"{kind}:{name}:{int(good)}", flush=True)
try:
    import torch.nn.functional as F
    from rinna_cli import native
    good = True
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = torch.randn(1, 4, 1, 16).to(dtype), torch.randn(1, 4, 20, 16).to(dtype), torch.randn(1, 4, 20, 16).to(dtype)
        got = native.library().attend(q, k[:, :, :9], v[:, :, :9], 0.25).float()
        want = F.scaled_dot_product_attention(q.float(), k[:, :, :9].float(), v[:, :, :9].float(), scale=0.25)
        good = good and bool((got - want).abs().max() < 0.02)
except Exception:
    good = False
print(f"attention:attend:{int(good)}", flush=True)
"""


def start_probe() -> subprocess.Popen:
    """Start probing every kernel in a child process (a crash there costs nothing here)."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, "-c", _PROBE],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
    )


def finish_probe(process: subprocess.Popen, timeout: float = 60.0) -> set[str]:
    """The kernels (``"int8:int_mm"`` ...) that ran and gave right results; a kernel that crashed the child is missing."""
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    working = set()
    for line in out.splitlines():
        kind, name, good = (line.split(":") + ["", "", ""])[:3]
        if good == "1":
            working.add(f"{kind}:{name}")
    return working


def _probe_key() -> dict:
    """What the probe's answer depends on: the CPU and torch (not the scheme or the thread count)."""
    return {k: v for k, v in machine_key("").items() if k not in ("scheme", "threads")}


def cached_probe(cache_dir: Path) -> set[str] | None:
    """The working kernels found by an earlier probe on this CPU and torch, if one was saved in ``cache_dir``."""
    try:
        data = json.loads((cache_dir / PROBE_FILE).read_text(encoding="utf-8"))
        return set(data["working"]) if data["key"] == _probe_key() else None
    except (OSError, ValueError, TypeError, KeyError):
        return None


def probe_answer(process: subprocess.Popen, cache_dir: Path) -> set[str]:
    """:func:`finish_probe`, saved in ``cache_dir`` when the child ran to its end (a crash is probed again)."""
    working = finish_probe(process)
    if process.returncode == 0:
        try:
            _write(cache_dir / PROBE_FILE, json.dumps({"key": _probe_key(), "working": sorted(working)}, indent=1))
        except OSError:  # probed again next time
            pass
    return working


# --- measuring ---------------------------------------------------------------------------


def waited_s() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a core (Linux's schedstat), None where
    that is not known: what other processes took from a measurement (2 threads on the 2-core Zen 5 of 2026-12-08
    waited 0.5 % of their time alone, 26 % beside one busy process, 52 % beside two)."""
    total, known = 0, False
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/schedstat", encoding="ascii") as stat:
                total += int(stat.read().split()[1])
            known = True
        except (OSError, ValueError, IndexError):  # a thread that ended meanwhile
            continue
    return total / 1e9 if known else None


def _samples(modules: list[QuantLinear], per_shape: int) -> tuple[list[QuantLinear], dict[tuple[int, int], int]]:
    """A few modules of each shape (from different layers) and how many the model has of each."""
    counts: dict[tuple[int, int], int] = {}
    chosen: dict[tuple[int, int], list[QuantLinear]] = {}
    for module in modules:
        shape = (module.out_features, module.in_features)
        counts[shape] = counts.get(shape, 0) + 1
        if len(chosen.setdefault(shape, [])) < per_shape:
            chosen[shape].append(module)
    return [m for group in chosen.values() for m in group], counts


class _TooSlow(Exception):
    """A run past its time limit, given up before it ended."""


def _linear_pass(modules: list[QuantLinear], kernel: str, rows: int, dtype: torch.dtype, per_shape: int):
    """A function that runs ``kernel`` over a sample of ``modules`` and returns its estimate for all of them, s;
    it gives up (:class:`_TooSlow`) when its time passes the limit it is called with."""
    sample, counts = _samples(modules, per_shape)
    for module in sample:  # torch's int4 layout, made once (0.1 s a matrix) and not timed
        module.prepare((kernel,))
    inputs = {m.in_features: torch.randn(rows, m.in_features).to(dtype) for m in sample}

    def run(limit: float) -> dict:
        times: dict = {}
        started = time.perf_counter()
        for module in sample:
            began = time.perf_counter()
            module.output(kernel, inputs[module.in_features], dtype)
            shape = (module.out_features, module.in_features)
            times[shape] = min(times.get(shape, float("inf")), time.perf_counter() - began)
            if time.perf_counter() - started > limit:
                raise _TooSlow(kernel)
        return {shape: (seconds, counts[shape]) for shape, seconds in times.items()}

    return run


def _attention_pass(model: nn.Module, dtype: torch.dtype, implementation: str):
    """A function that times one decode step's attention (``"sdpa"`` or ``"attend"``) over :data:`ATTENTION_TOKENS`
    cached tokens, all layers, from the caches of :data:`_SAMPLES` layers (more than a CPU cache holds)."""
    config = model.config
    heads, size = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    q = torch.randn(1, heads, 1, size).to(dtype)
    cache = torch.randn(2, 1, heads, ATTENTION_TOKENS, size).to(dtype)
    caches = [cache.clone() for _ in range(2 * _SAMPLES)]
    scale = size**-0.5
    if implementation == "attend":

        def attend(k, v):  # the library looked up in the run: a machine without one skips it, as the race does
            return native.library().attend(q, k, v, scale)
    else:

        def attend(k, v):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def run(limit: float) -> dict:
        began = time.perf_counter()
        for layer in caches:
            attend(layer[0], layer[1])
        return {"attention": ((time.perf_counter() - began) / len(caches), config.num_hidden_layers)}

    return run


def _race(runs: dict, deadline: float, rounds: int = 5) -> dict[str, float]:
    """Each run's estimate from its fastest time per shape over interleaved rounds (A B C A B C ...).

    A run returns {shape: (seconds, count in the model)}; its estimate is the sum of each
    shape's fastest seconds times its count, so a busy moment (other processes) in one
    round spoils one shape of one round only. Round 0 is a warm-up (torch builds its
    kernels per shape) and is used only for what no later round measured. A run more
    than :data:`_HOPELESS` times slower than the fastest of its group (the label up to
    ``/``) is dropped after the warm-up (float32 int4 was 40x slower than bfloat16 on an
    AVX-512 Xeon without BF16, and took most of the budget), one more than 3x slower
    after round 2; a run that raises is left out. A run is given up as soon as it takes
    longer than the deadline leaves or, in the warm-up, :data:`_HOPELESS` times the
    fastest whole warm-up of its group so far (``_int_mm`` took 0.7 s a matrix for a
    prompt on the Zen 3 of 2026-12-03, 25 times the fastest), so runs are best given
    fastest first.
    """
    warm: dict[str, dict] = {}
    fastest: dict[str, dict] = {}
    walls: dict[str, float] = {}  # group -> the fastest whole warm-up run, s
    alive = dict(runs)

    def estimate(label: str) -> float:
        shapes = {**warm[label], **fastest.get(label, {})}
        return sum(seconds * count for seconds, count in shapes.values())

    for round_ in range(rounds + 1):
        for label, run in list(alive.items()):
            now, group = time.perf_counter(), label.split("/")[0]
            if now > deadline:
                break
            limit = min(deadline - now, _HOPELESS * walls.get(group, float("inf")) if round_ == 0 else float("inf"))
            try:
                with torch.inference_mode():
                    times = run(limit)
            except Exception:  # noqa: BLE001 - a kernel that fails on these shapes, or too slow, is skipped
                alive.pop(label)
                continue
            if round_ == 0:
                warm[label] = times
                walls[group] = min(walls.get(group, float("inf")), time.perf_counter() - now)
                continue
            best = fastest.setdefault(label, {})
            for shape, (seconds, count) in times.items():
                best[shape] = (min(seconds, best.get(shape, (seconds, count))[0]), count)
        if time.perf_counter() > deadline:
            break
        if round_ == 0 or round_ >= 2:
            for label in list(alive):
                group = label.split("/")[0]
                fastest_of_group = min(estimate(k) for k in warm if k.split("/")[0] == group)
                if estimate(label) > (3 if round_ else _HOPELESS) * fastest_of_group:
                    alive.pop(label)
    return {label: estimate(label) for label in warm}


def measure(model: nn.Module, scheme: str, working: set[str] | None = None, budget_s: float = BUDGET_S) -> Plan:
    """Time the working kernels on ``model``'s layers and return the fastest plan found within ``budget_s``.

    Decoding decides the activation dtype: the sum of each kind's fastest decode kernel
    (rinna-cli's own where it is within :data:`_TIE` of it) and the faster attention in that
    dtype (which the plan keeps). A batched step then takes the fastest at
    :data:`BATCH_ROWS` rows of the kernels giving the decode kernel's very rows
    (``SAME_ROWS``; the decode kernel itself if it has no such kin), and prefill each
    kind's fastest at :data:`PREFILL_ROWS` rows in that dtype.
    """
    began = time.perf_counter()
    kinds = kinds_of(model)
    # the sampled layers read in first, and the budget counted from then: from a cold page cache the first kernel
    # timed would read them from the disk and take the budget (2 s of int4dot's warm-up after a bfloat16 run evicted
    # them, on the Zen 3 of 2026-12-03); their pages serve the first reply all the same
    sampled = [m for modules in kinds.values() for m in _samples(modules, _SAMPLES)[0]]
    mapped.fetch_ahead([p for m in sampled for n, p in m.named_parameters() if n != "bias"]).join()
    timing, waited = time.perf_counter(), waited_s()
    names = {
        kind: [n for n in KINDS[kind].KERNELS if working is None or f"{kind}:{n}" in working] or [KINDS[kind].decode]
        for kind in kinds
    }
    attentions = [a for a in ATTENTIONS if a == "sdpa" or working is None or f"attention:{a}" in working]
    decode_runs = {}
    for activation, dtype in ACTIVATIONS.items():
        for implementation in attentions:
            decode_runs[f"attention {activation}/{implementation}"] = _attention_pass(model, dtype, implementation)
        for kind, modules in kinds.items():
            for name in names[kind]:
                if name not in KINDS[kind].PREFILL_ONLY:
                    decode_runs[f"decode {kind}/{name} {activation}"] = _linear_pass(
                        modules, name, DECODE_ROWS, dtype, _SAMPLES
                    )
    decode = _race(decode_runs, timing + budget_s * 0.55)
    cost, choice, attending = {}, {}, {}
    for activation in ACTIVATIONS:
        attended = {k.split("/")[1]: v for k, v in decode.items() if k.startswith(f"attention {activation}/")}
        if attended:
            attending[activation] = min(attended, key=attended.__getitem__)
        picks = {}
        for kind in kinds:
            timed = {
                k: v for k, v in decode.items() if k.startswith(f"decode {kind}/") and k.endswith(f" {activation}")
            }
            if timed:
                quickest = min(timed, key=timed.__getitem__)
                own = f"decode {kind}/{_UNMEASURED[kind][0]} {activation}"
                picks[kind] = own if timed.get(own, float("inf")) <= (1 + _TIE) * timed[quickest] else quickest
        if len(picks) == len(kinds) and activation in attending:
            cost[activation] = attended[attending[activation]] + sum(decode[k] for k in picks.values())
            choice[activation] = {kind: label.split("/")[1].split(" ")[0] for kind, label in picks.items()}
    activation = min(cost, key=cost.__getitem__) if cost else _unmeasured_activation()
    dtype = ACTIVATIONS[activation]

    def promising(kind: str, name: str) -> bool:
        """Not far slower at one row than the fastest (float32 int4 was 7x slower at 1 row, 250x at 48)."""
        if name in KINDS[kind].PREFILL_ONLY:
            return True
        seconds = decode.get(f"decode {kind}/{name} {activation}")
        fastest = min(
            (v for k, v in decode.items() if k.startswith(f"decode {kind}/") and k.endswith(activation)), default=None
        )
        return seconds is not None and fastest is not None and seconds <= 3 * fastest

    def unmeasured(kind: str) -> str:
        """The fastest decode kernel measured in any dtype, else the first working of :data:`_UNMEASURED`."""
        timed = {k: v for k, v in decode.items() if k.startswith(f"decode {kind}/")}
        if timed:
            return min(timed, key=timed.__getitem__).split("/")[1].split(" ")[0]
        return next((n for n in _UNMEASURED[kind] if n in names[kind]), KINDS[kind].decode)

    fast = {kind: choice.get(activation, {}).get(kind) or unmeasured(kind) for kind in kinds}
    kin = {  # the decode kernel first: a run that ends later than the budget leaves is not counted
        kind: sorted(
            (n for n in names[kind] if n in KINDS[kind].SAME_ROWS and promising(kind, n)), key=lambda n: n != fast[kind]
        )
        if fast[kind] in KINDS[kind].SAME_ROWS
        else []
        for kind in kinds
    }
    batch_runs = {
        f"batch {kind}/{name} {activation}": _linear_pass(modules, name, BATCH_ROWS, dtype, _SAMPLES)
        for kind, modules in kinds.items()
        if len(kin[kind]) > 1
        for name in kin[kind]
    }
    batch = _race(batch_runs, timing + budget_s * 0.7)
    prompted = [kind for kind in kinds if not (kind == "int8" and "int4" in kinds)]  # an int4 model's int8 layer is
    prefill_runs = {  # the output head, which multiplies one row
        f"prefill {kind}/{name} {activation}": _linear_pass(kinds[kind], name, PREFILL_ROWS, dtype, 1)
        for kind in prompted
        for name in sorted(names[kind], key=lambda n: (n != fast[kind], n in KINDS[kind].PREFILL_ONLY))
        if promising(kind, name)
    }
    prefill = _race(prefill_runs, timing + budget_s)

    def fastest(timings: dict[str, float], phase: str, kind: str) -> str:
        timed = {k: v for k, v in timings.items() if k.startswith(f"{phase} {kind}/")}
        return min(timed, key=timed.__getitem__).split("/")[1].split(" ")[0] if timed else fast[kind]

    kernels = {kind: (fast[kind], fastest(batch, "batch", kind), fastest(prefill, "prefill", kind)) for kind in kinds}
    timings = {label: round(seconds * 1000, 3) for label, seconds in {**decode, **batch, **prefill}.items()}
    whole = activation in cost and all(any(k.startswith(f"prefill {kind}/") for k in prefill) for kind in prompted)
    now, waited_now = time.perf_counter(), waited_s()
    busy = 0.0  # unknown, nothing timed, or waits of a few time slices (threads waking), which the race absorbs
    if waited is not None and waited_now is not None and waited_now - waited > _NOISE_S:
        threads = torch.get_num_threads()
        own = max(0.0, 1 - len(os.sched_getaffinity(0)) / threads)  # more threads than cores wait for each other
        busy = max(0.0, (waited_now - waited) / (now - timing) / threads - own)
    seconds = round(now - began, 3)
    unmeasured_attention = "attend" if "attend" in attentions else "sdpa"  # rinna-cli's, where it runs
    attention = attending.get(activation, unmeasured_attention)
    return Plan(kernels, activation, machine_key(scheme), timings, seconds, whole, attention, round(busy, 3))


def _unmeasured_activation() -> str:
    """The activation dtype when the budget ran out before one was measured (a busy moment; the plan is not saved):
    bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX, where it won on every CPU measured), else
    float32."""
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(cpu_identity()[1].split()) else "float32"


def cached_plan(path: Path, scheme: str) -> Plan | None:
    """The plan saved at ``path`` if it was made on this machine, torch and thread count."""
    try:
        plan = Plan.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return plan if plan.key == machine_key(scheme) else None


def save_plan(path: Path, plan: Plan) -> None:
    _write(path, plan.to_json())


def _write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` at once (a temporary file renamed), so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
