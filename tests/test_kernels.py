"""The kernel plan: measured on the model, cached per machine, crash-proof probing, applied to every layer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from rinna_cli import int8, kernels, native
from rinna_cli.quantized import load_quantized

FIXED = kernels.Plan({"int8": ("int_mm", "int_mm", "int_mm")}, "float32")
# a budget the memorized model's races end well within (their rounds are few), so that a busy machine
# (tests in parallel, a build) does not cut a phase short and leave it unmeasured
ROOMY_S = 30.0


def load(folder: Path, cache: Path, plan=FIXED):
    return load_quantized(folder, [folder / "model.safetensors"], AutoConfig.from_pretrained(folder), cache, "int8", plan=plan)


def test_describe_is_one_short_line():
    plan = kernels.Plan({"int4": ("int4pack", "int4pack", "int4pack"), "int8": ("int8pack", "int8pack", "int_mm")}, "bfloat16")
    assert plan.describe() == (
        "int4 decode int4pack, batch int4pack, prefill int4pack; int8 decode int8pack, batch int8pack, prefill int_mm; "
        "bfloat16, attention sdpa"
    )
    assert kernels.Plan({"int8": ("int8dot", "int8dot", "int_mm")}, "float32", attention="attend").describe() == (
        "int8 decode int8dot, batch int8dot, prefill int_mm; float32, attention attend"
    )


def test_a_plan_survives_its_json():
    plan = kernels.Plan({"int8": ("int8dot", "int8dot", "int_mm")}, "float32", kernels.machine_key("int8"), {"x": 1.5}, 0.25,
                        attention="attend")  # fmt: skip
    assert kernels.Plan.from_json(plan.to_json()) == plan


def test_the_key_names_cpu_torch_threads_scheme_and_the_kernels_sources(monkeypatch, tmp_path):
    key = kernels.machine_key("int4")
    assert key["scheme"] == "int4" and key["torch"] == torch.__version__ and key["threads"] == torch.get_num_threads()
    assert key["cpu"] and len(key["flags"]) == 16 and key["capability"] == torch.backends.cpu.get_cpu_capability()
    newer = tmp_path / "int4dot.c"
    newer.write_text(native.SOURCES[1].read_text() + "/* faster */\n")
    monkeypatch.setattr(native, "SOURCES", (native.SOURCES[0], newer))
    assert kernels.machine_key("int4") == {**key, "native": native.version()} != key  # a new kernel: plan again
    shared = native.version()
    header = tmp_path / "native.h"
    header.write_text(native.HEADERS[0].read_text() + "/* faster */\n")
    monkeypatch.setattr(native, "HEADERS", (header,))
    assert native.version() != shared  # what the sources include counts too


def test_the_probe_keeps_only_kernels_that_ran_and_were_right():
    working = kernels.finish_probe(kernels.start_probe())
    assert {f"int8:{name}" for name in int8.Int8Linear.KERNELS} <= working  # all run on this machine
    assert {"int4:int4pack", "int4:int4dot", "int8:int8dot", "attention:attend"} <= working


def test_a_crash_in_the_probe_loses_only_the_kernels_not_yet_reported():
    child = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; print('int8:int_mm:1', flush=True); print('int8:dequant:0', flush=True); os.abort()"],
        stdout=subprocess.PIPE, text=True,
    )
    assert kernels.finish_probe(child) == {"int8:int_mm"}


def test_a_probe_that_ran_to_its_end_serves_the_next_model_and_a_crash_is_probed_again(memorized_model, tmp_path, monkeypatch):
    load(memorized_model, tmp_path, plan=None)
    saved = json.loads((tmp_path / kernels.PROBE_FILE).read_text())
    assert saved["key"] == {k: v for k, v in kernels.machine_key("int8").items() if k not in ("scheme", "threads")}
    assert {f"int8:{name}" for name in int8.Int8Linear.KERNELS} <= set(saved["working"])
    other = tmp_path / "other"  # another model (another cache entry) on the same machine
    other.mkdir()
    for file in memorized_model.iterdir():
        (other / file.name).symlink_to(file)

    def no_child():
        raise AssertionError("probed again")

    monkeypatch.setattr(kernels, "start_probe", no_child)
    _, plan = load(other, tmp_path, plan=None)
    assert len(list((tmp_path / "int8").glob("*.plan.json"))) == 2 and plan.key == kernels.machine_key("int8")
    saved["key"]["torch"] = "0.0"  # probed with another torch
    (tmp_path / kernels.PROBE_FILE).write_text(json.dumps(saved))
    assert kernels.cached_probe(tmp_path) is None
    crashed = subprocess.Popen([sys.executable, "-c", "import os; print('int8:int_mm:1', flush=True); os.abort()"],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert kernels.probe_answer(crashed, tmp_path) == {"int8:int_mm"}
    assert kernels.cached_probe(tmp_path) is None  # not saved: the next first start probes again


def test_measuring_picks_working_kernels_and_never_one_that_raises(memorized_model, tmp_path, monkeypatch):
    model, _ = load(memorized_model, tmp_path)

    def broken(module, rows):
        raise RuntimeError("no such kernel on this CPU")

    monkeypatch.setitem(int8.Int8Linear.KERNELS, "broken", broken)
    plan = kernels.measure(model, "int8", {"int8:broken", "int8:int8pack", "int8:int_mm"}, budget_s=ROOMY_S)
    decode, batch, prefill = plan.kernels["int8"]
    assert decode in ("int8pack", "int_mm") and prefill in ("int8pack", "int_mm")
    assert batch == decode  # int8pack has no kin, and int_mm's (int8dot) is not in the working set
    assert plan.activation in kernels.ACTIVATIONS and plan.key == kernels.machine_key("int8")
    assert not any("broken" in label for label in plan.timings_ms)
    assert any(label.startswith("decode int8/int_mm") for label in plan.timings_ms)
    assert any(label.startswith("prefill int8/") for label in plan.timings_ms)


@pytest.mark.parametrize("working", [{"int8:int_mm", "int8:int8dot"}, {"int8:int8pack", "int8:int8dot"}])
def test_a_batched_step_takes_the_fastest_kernel_giving_the_decode_kernels_rows(memorized_model, tmp_path, working):
    model, _ = load(memorized_model, tmp_path)
    plan = kernels.measure(model, "int8", working, budget_s=ROOMY_S)
    decode, batch, _ = plan.kernels["int8"]
    timed = {label.split(" ")[1] for label in plan.timings_ms if label.startswith("batch ")}
    if decode in int8.Int8Linear.SAME_ROWS:
        # the kin of the decode kernel not far slower than it for one row (int_mm is 8 times int8dot on a Zen 3)
        assert batch in int8.Int8Linear.SAME_ROWS and timed <= {"int8/int_mm", "int8/int8dot"} & {
            f"int8/{n.split(':')[1]}" for n in working
        }
        decode_ms = {label.split("/")[1].split(" ")[0]: ms for label, ms in plan.timings_ms.items()
                     if label.startswith("decode ") and label.endswith(plan.activation)}  # fmt: skip
        kin = {f"int8/{n}" for n in int8.Int8Linear.SAME_ROWS if f"int8:{n}" in working}
        if all(ms <= 3 * min(decode_ms.values()) for ms in decode_ms.values()):
            assert timed == (kin if len(kin) > 1 else set())  # a race of one is not run
    else:  # int8pack: no other kernel gives its rows, so a sequence decodes alike alone and in a batch
        assert batch == decode and not timed
    batch_ms = {label.split("/")[1].split(" ")[0]: ms for label, ms in plan.timings_ms.items() if label.startswith("batch ")}
    if batch_ms:
        assert batch == min(batch_ms, key=batch_ms.__getitem__)


def test_the_plan_keeps_the_faster_attention_of_its_dtype_and_a_probe_without_rinna_clis_means_sdpa(memorized_model,
                                                                                                      tmp_path):
    model, _ = load(memorized_model, tmp_path)
    plan = kernels.measure(model, "int8", None, budget_s=ROOMY_S)
    attention = {label.split(" ")[1]: ms for label, ms in plan.timings_ms.items() if label.startswith("attention ")}
    assert set(attention) == {f"{dtype}/{name}" for dtype in kernels.ACTIVATIONS for name in ("sdpa", "attend")}
    mine = {label.split("/")[1]: ms for label, ms in attention.items() if label.startswith(plan.activation)}
    assert plan.attention == min(mine, key=mine.__getitem__)
    assert plan.describe().endswith(f"; {plan.activation}, attention {plan.attention}")
    plan = kernels.measure(model, "int8", {"int8:int_mm", "int8:int8dot"}, budget_s=ROOMY_S)  # attend failed its probe
    assert plan.attention == "sdpa" and not any("/attend" in label for label in plan.timings_ms)
    kernels.apply(model, kernels.Plan({"int8": ("int_mm", "int_mm", "int_mm")}, "float32", attention="attend"))
    assert model.config._attn_implementation == "rinna_attend"
    kernels.apply(model, FIXED)
    assert model.config._attn_implementation == "sdpa"


def test_the_race_stops_timing_hopeless_kernels_after_the_warm_up_and_slow_ones_after_round_two():
    calls: dict[str, int] = {}

    def run(label: str, seconds: float):
        def timed(limit: float) -> dict:
            calls[label] = calls.get(label, 0) + 1
            return {"shape": (seconds, 10)}

        return timed

    runs = {"decode/fast": run("fast", 0.001), "decode/close": run("close", 0.002)}
    runs |= {"decode/slow": run("slow", 0.005), "decode/hopeless": run("hopeless", 0.02), "other/alone": run("alone", 1.0)}
    estimates = kernels._race(runs, deadline=float("inf"), rounds=5)
    assert calls == {"fast": 6, "close": 6, "slow": 3, "hopeless": 1, "alone": 6}  # warm-up and 5 rounds
    assert estimates["decode/fast"] == pytest.approx(0.01) and estimates["decode/hopeless"] == pytest.approx(0.2)


def test_a_warm_up_far_slower_than_the_fastest_so_far_or_past_the_deadline_is_given_up():
    limits: dict[str, float] = {}

    def run(label: str, seconds: float):
        def timed(limit: float) -> dict:
            limits.setdefault(label, limit)
            if seconds > limit:
                raise kernels._TooSlow(label)
            time.sleep(seconds)
            return {"shape": (seconds, 1)}

        return timed

    runs = {"prefill/fast": run("fast", 0.02), "prefill/slow": run("slow", 5.0), "other/first": run("first", 0.01)}
    estimates = kernels._race(runs, deadline=time.perf_counter() + 2.0, rounds=1)
    assert 0.19 < limits["slow"] < 0.5 and "prefill/slow" not in estimates  # 10 times the fast one's warm-up
    assert 1.5 < limits["fast"] <= 2.0 and 1.5 < limits["first"] <= 2.0  # the first of a group: what the deadline leaves
    assert set(estimates) == {"prefill/fast", "other/first"}


def test_a_batched_step_never_races_a_kernel_far_slower_for_one_row(memorized_model, tmp_path, monkeypatch):
    model, _ = load(memorized_model, tmp_path)
    real = int8.Int8Linear.KERNELS["int_mm"]

    def slow(module, rows):  # torch's int_mm on the Zen 3 of 2026-12-03: 8 times int8dot for one row, 23 for 8
        time.sleep(0.002 * rows.shape[0])
        return real(module, rows)

    monkeypatch.setitem(int8.Int8Linear.KERNELS, "int_mm", slow)
    plan = kernels.measure(model, "int8", {"int8:int_mm", "int8:int8dot"}, budget_s=ROOMY_S)
    assert plan.kernels["int8"][:2] == ("int8dot", "int8dot")
    assert not any(label.startswith("batch int8/int_mm") for label in plan.timings_ms)


@pytest.mark.parametrize(("flags", "activation"), [("avx2 fma", "float32"), ("avx512f avx512_bf16", "bfloat16"),
                                                   ("avx512f amx_bf16 amx_tile", "bfloat16")])  # fmt: skip
def test_no_budget_left_means_the_defaults(memorized_model, tmp_path, monkeypatch, flags, activation):
    """rinna-cli's own kernels and attention where they run, bfloat16 where the CPU computes it natively."""
    model, _ = load(memorized_model, tmp_path)
    monkeypatch.setattr(kernels, "cpu_identity", lambda: ("a CPU", flags))
    plan = kernels.measure(model, "int8", None, budget_s=0.0)
    assert plan.describe() == f"int8 decode int8dot, batch int8dot, prefill int8dot; {activation}, attention attend"
    assert plan.timings_ms == {}
    assert not plan.whole  # not saved: measured again at the next start
    plan = kernels.measure(model, "int8", {"int8:int_mm", "int8:int8pack"}, budget_s=0.0)
    assert plan.describe() == f"int8 decode int_mm, batch int_mm, prefill int_mm; {activation}, attention sdpa"
    assert kernels.measure(model, "int8", None, budget_s=ROOMY_S).whole


def test_a_plan_the_budget_cut_short_is_used_but_not_saved(memorized_model, tmp_path, monkeypatch):
    real = kernels.measure
    monkeypatch.setattr(kernels, "measure", lambda *args, **kwargs: real(*args, **{**kwargs, "budget_s": 0.0}))
    _, plan = load(memorized_model, tmp_path, plan=None)
    assert not plan.whole and plan.kernels["int8"][0] == "int8dot"
    assert list((tmp_path / "int8").glob("*.plan.json")) == []
    monkeypatch.setattr(kernels, "measure", real)
    _, plan = load(memorized_model, tmp_path, plan=None)
    assert plan.whole and len(list((tmp_path / "int8").glob("*.plan.json"))) == 1


def test_a_plan_from_a_probe_that_did_not_end_is_used_but_not_saved(memorized_model, tmp_path, monkeypatch):
    """A probe that crashed (or hung) never tried the kernels after the one it was at: the plan made without them is
    measured again, with a new probe, at the next start."""
    real = kernels.start_probe
    crashing = [sys.executable, "-c", "import os; print('int8:int_mm:1', flush=True); os.abort()"]
    monkeypatch.setattr(kernels, "start_probe", lambda: subprocess.Popen(crashing, stdout=subprocess.PIPE, text=True))
    _, plan = load(memorized_model, tmp_path, plan=None)
    assert plan.whole and plan.kernels["int8"] == ("int_mm", "int_mm", "int_mm") and plan.attention == "sdpa"
    assert list((tmp_path / "int8").glob("*.plan.json")) == [] and kernels.cached_probe(tmp_path) is None
    monkeypatch.setattr(kernels, "start_probe", real)
    _, plan = load(memorized_model, tmp_path, plan=None)
    assert "decode int8/int8dot float32" in plan.timings_ms  # measured this time (which wins is the machine's)
    assert len(list((tmp_path / "int8").glob("*.plan.json"))) == 1


_MEASURE_ON_ONE_CORE = """
import os, sys
from pathlib import Path
os.sched_setaffinity(0, {int(sys.argv[3])})
import torch
from transformers import AutoConfig
from rinna_cli import kernels
from rinna_cli.quantized import load_quantized
folder, cache = Path(sys.argv[1]), Path(sys.argv[2])
model, plan = load_quantized(folder, [folder / "model.safetensors"], AutoConfig.from_pretrained(folder), cache)
torch.set_num_threads(int(sys.argv[4]))
print("loaded", flush=True)
sys.stdin.readline()
print(kernels.measure(model, "int8", kernels.cached_probe(cache)).to_json().replace("\\n", ""), flush=True)
sys.stdin.readline()
"""


def _measure_on_one_core(model: Path, cache: Path, threads: int, spinners: int) -> kernels.Plan:
    """A plan measured in a child process held to one core with ``threads`` threads, beside ``spinners`` busy
    processes on that core."""
    load(model, cache, plan=None)  # weights cached and kernels probed: the child loads in a second
    core = str(min(os.sched_getaffinity(0)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = [sys.executable, "-c", _MEASURE_ON_ONE_CORE, str(model), str(cache), core, str(threads)]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout.readline() == "loaded\n"
    spin = f"import os; os.sched_setaffinity(0, {{{core}}}); print(1, flush=True)\nwhile True: pass"
    running = [subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True) for _ in range(spinners)]
    try:
        for spinner in running:
            spinner.stdout.readline()
        child.stdin.write("go\n")
        child.stdin.flush()
        measured = child.stdout.readline()
    finally:
        for process in (child, *running):
            process.kill()
            process.wait()
    return kernels.Plan.from_json(measured)


@pytest.mark.skipif(kernels.waited_s() is None or not hasattr(os, "sched_setaffinity"), reason="Linux's schedstat")
def test_measuring_beside_busy_processes_is_told(memorized_model, tmp_path):
    """Real competitors on the one core the measuring may use: the plan says so and is not worth saving."""
    # a dozen: the small model's plan (25-35 ms of work alone) gets a thirteenth of the core and waits 0.3-0.4 s,
    # beyond the scheduler's noise
    plan = _measure_on_one_core(memorized_model, tmp_path, threads=1, spinners=12)
    assert plan.whole and plan.busy > 0.5 and not plan.settled  # the spinners took most of that core
    assert plan.describe().endswith(" (measured while other programs ran: again at the next start)")


@pytest.mark.skipif(kernels.waited_s() is None or not hasattr(os, "sched_setaffinity"), reason="Linux's schedstat")
def test_more_threads_than_cores_waiting_for_each_other_is_not_taken_for_busy(memorized_model, tmp_path):
    """Four threads on one core wait three quarters of the time by themselves (a test worker beside them on that
    core would add a twentieth); that share is not other programs'."""
    plan = _measure_on_one_core(memorized_model, tmp_path, threads=4, spinners=0)
    assert plan.busy < 0.15 and plan.settled


def test_a_plan_measured_while_other_programs_ran_is_used_but_not_saved(memorized_model, tmp_path, monkeypatch):
    real = kernels.measure
    monkeypatch.setattr(kernels, "measure", lambda *args, **kwargs: replace(real(*args, **kwargs), busy=0.3))
    model, plan = load(memorized_model, tmp_path, plan=None)
    assert plan.busy == 0.3 and list((tmp_path / "int8").glob("*.plan.json")) == []
    assert model.lm_head.decode == plan.kernels["int8"][0]  # used all the same
    monkeypatch.setattr(kernels, "measure", real)
    load(memorized_model, tmp_path, plan=None)
    assert len(list((tmp_path / "int8").glob("*.plan.json"))) == 1


def test_only_a_plan_measured_whole_on_cores_left_alone_is_worth_saving():
    plan = kernels.Plan({"int8": ("int8dot", "int8dot", "int_mm")}, "float32", attention="attend")
    assert plan.settled and replace(plan, busy=kernels.BUSY_LIMIT).settled
    assert not replace(plan, busy=kernels.BUSY_LIMIT + 0.01).settled and not replace(plan, whole=False).settled
    assert replace(plan, busy=kernels.BUSY_LIMIT).describe() == plan.describe()


def test_apply_sets_kernels_and_activation_dtype_but_keeps_weights_and_rotary(memorized_model, tmp_path):
    model, _ = load(memorized_model, tmp_path)
    kernels.apply(model, kernels.Plan({"int8": ("int8pack", "int8pack", "dequant")}, "bfloat16"))
    layers = [m for m in model.modules() if isinstance(m, int8.Int8Linear)]
    assert len(layers) == 2 * 4 + 1
    assert all((m.decode, m.batch, m.prefill, m.activation) == ("int8pack", "int8pack", "dequant", torch.bfloat16) for m in layers)
    assert all(m.weight.dtype == torch.int8 and m.scale.dtype == torch.float32 for m in layers)
    assert model.gpt_neox.embed_in.weight.dtype == torch.bfloat16
    assert model.gpt_neox.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    assert model.gpt_neox.rotary_emb.inv_freq.dtype == torch.float32
    out = model(torch.tensor([[5, 6, 7]])).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_a_plan_from_another_machine_is_measured_again(memorized_model, tmp_path, monkeypatch):
    _, plan = load(memorized_model, tmp_path, plan=None)
    (path,) = (tmp_path / "int8").glob("*.plan.json")
    data = json.loads(path.read_text())
    assert data["key"] == kernels.machine_key("int8")
    data["key"]["threads"] += 1  # as if planned with another thread count
    data["kernels"] = {"int8": ["dequant", "dequant", "dequant"]}
    path.write_text(json.dumps(data))
    calls = []
    real = kernels.measure
    monkeypatch.setattr(kernels, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, again = load(memorized_model, tmp_path, plan=None)
    assert calls == [1] and again.key == kernels.machine_key("int8")
    assert json.loads(path.read_text())["key"] == kernels.machine_key("int8")
    assert model.lm_head.decode == again.kernels["int8"][0]


def test_a_plan_that_cannot_be_read_is_measured_again(memorized_model, tmp_path):
    load(memorized_model, tmp_path, plan=None)
    (path,) = (tmp_path / "int8").glob("*.plan.json")
    path.write_text("{not json")
    _, plan = load(memorized_model, tmp_path, plan=None)
    assert kernels.Plan.from_json(path.read_text()) == plan


@pytest.mark.parametrize(("torch_ms", "decode"), [(98.0, "int8dot"), (90.0, "int8pack"), (110.0, "int8dot")])
def test_a_decode_step_takes_rinna_clis_own_kernel_unless_another_is_clearly_faster(memorized_model, tmp_path,
                                                                                   monkeypatch, torch_ms, decode):
    """Within 5 % (the host's noise) of the fastest, int8dot decodes: it batches 8 rows in about the time of one."""
    model, _ = load(memorized_model, tmp_path)
    given = {"decode int8/int8dot bfloat16": 0.100, "decode int8/int8pack bfloat16": torch_ms / 1000,
             "attention bfloat16/sdpa": 0.010}  # fmt: skip

    def race(runs: dict, deadline: float, rounds: int = 5) -> dict:
        return {label: given[label] for label in runs if label in given}

    monkeypatch.setattr(kernels, "_race", race)
    plan = kernels.measure(model, "int8", {"int8:int8dot", "int8:int8pack"}, budget_s=ROOMY_S)
    assert plan.activation == "bfloat16" and plan.kernels["int8"][0] == decode
