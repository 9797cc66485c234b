"""int8 weights: exact replies with every kernel the planner can choose, the on-disk cache, its failure modes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from rinna_cli import checkpoint, int8, kernels, native
from rinna_cli.engine import Engine, resolve_quantize
from rinna_cli.errors import ModelError, UsageError
from rinna_cli.quantized import load_quantized
from rinna_cli.tokenizer import Tokenizer
from tests.greedy import EXPECTED, replies


@pytest.fixture(scope="module")
def tok(memorized_model) -> Tokenizer:
    return Tokenizer.from_folder(memorized_model)


@pytest.fixture()
def model_copy(memorized_model, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(memorized_model, folder)
    return folder


# Most tests force a plan: measuring (a child process and a few seconds) is tested once here and in test_kernels.py.
FIXED = kernels.Plan({"int8": ("int_mm", "int_mm", "int_mm")}, "float32")


def load(folder: Path, cache: Path, plan: kernels.Plan | None = FIXED):
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    return load_quantized(folder, files, AutoConfig.from_pretrained(folder), cache, "int8", plan=plan)


@pytest.mark.parametrize("activation", kernels.ACTIVATIONS)
@pytest.mark.parametrize("kernel", int8.Int8Linear.KERNELS)
def test_every_kernel_gives_the_memorized_replies(memorized_model, tok, tmp_path, kernel, activation):
    model, plan = load(memorized_model, tmp_path, kernels.Plan({"int8": (kernel, kernel, kernel)}, activation))
    assert plan.describe() == f"int8 decode {kernel}, batch {kernel}, prefill {kernel}; {activation}, attention sdpa"
    assert model.lm_head.decode == model.gpt_neox.layers[0].mlp.dense_h_to_4h.prefill == kernel
    assert model.gpt_neox.embed_in.weight.dtype == kernels.ACTIVATIONS[activation]
    assert replies(model, tok)[0] == EXPECTED


@pytest.mark.parametrize("activation", kernels.ACTIVATIONS)
def test_rinna_clis_attention_gives_the_memorized_replies(memorized_model, tok, tmp_path, monkeypatch, activation):
    calls = []
    real = native.Library.attend
    monkeypatch.setattr(native.Library, "attend", lambda self, q, *rest: calls.append(q.shape) or real(self, q, *rest))
    plan = kernels.Plan({"int8": ("int8dot", "int8dot", "int_mm")}, activation, attention="attend")
    model, chosen = load(memorized_model, tmp_path, plan)
    assert chosen.describe().endswith(f"; {activation}, attention attend")
    assert replies(model, tok)[0] == EXPECTED
    heads, size = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    assert calls and set(calls) == {(1, heads, 1, size)}  # every decode step of every layer, never a prompt
    assert len(calls) % model.config.num_hidden_layers == 0
    kernels.apply(model, FIXED)  # torch's again
    calls.clear()
    assert replies(model, tok)[0] == EXPECTED and calls == []


def test_one_row_a_few_rows_and_a_prompt_take_their_own_kernels(memorized_model, tok, tmp_path):
    model, _ = load(memorized_model, tmp_path, kernels.Plan({"int8": ("int8pack", "int8dot", "int_mm")}, "bfloat16"))
    seen = []
    layer = model.gpt_neox.layers[0].attention.dense
    for name in ("int8pack", "int8dot", "int_mm"):
        function = int8.Int8Linear.KERNELS[name]
        layer.KERNELS = {**layer.KERNELS,
                         name: lambda m, x, f=function, n=name, **finish: seen.append((n, x.shape[0])) or f(m, x, **finish)}  # fmt: skip
    replies(model, tok)
    layer(torch.randn(1, int8.DECODE_ROWS, layer.in_features, dtype=torch.bfloat16))
    layer(torch.randn(2, layer.in_features, dtype=torch.bfloat16))
    assert {n for n, rows in seen if rows == 1} == {"int8pack"}
    assert {n for n, rows in seen if 1 < rows <= int8.DECODE_ROWS} == {"int8dot"}
    assert {n for n, rows in seen if rows > int8.DECODE_ROWS} == {"int_mm"}


@pytest.mark.parametrize("activation", [torch.float32, torch.bfloat16])
def test_kernels_listed_as_giving_the_same_rows_do(activation):
    """int8dot finishes its output itself (FINISHING): the bits of int_mm's cast and added to by torch."""
    torch.manual_seed(2)
    module = int8.Int8Linear.quantize(torch.nn.Linear(2816, 1000))
    module.activation, module.bias.data = activation, module.bias.data.to(activation)
    x = torch.randn(int8.DECODE_ROWS, 2816).to(activation)
    outputs = []
    for kernel in sorted(int8.Int8Linear.SAME_ROWS):
        module.decode = module.batch = module.prefill = kernel
        outputs.append(torch.cat([module(x), module(x[:1]), module(torch.cat([x] * 3))[:1]]))
    assert len(outputs) == 2 and all(torch.equal(outputs[0], other) for other in outputs[1:])
    assert outputs[0].dtype == activation
    assert torch.equal(outputs[0][: int8.DECODE_ROWS][:1], outputs[0][int8.DECODE_ROWS : int8.DECODE_ROWS + 1])
    module.decode, module.batch, module.prefill = "int_mm", "int8dot", "int_mm"
    assert module.rowwise()
    module.batch = "int8pack"
    assert not module.rowwise()


def test_kernels_agree_with_the_dequantized_matmul():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    module = int8.Int8Linear.quantize(linear)
    for rows in (1, 15):
        x = torch.randn(rows, 96)
        want = x @ (module.weight.float() * module.scale.float()[:, None]).t() + module.bias.float()
        for kernel in int8.Int8Linear.KERNELS:
            module.decode = module.batch = module.prefill = kernel
            got = module(x)
            assert got.shape == (rows, 40) and got.dtype == torch.float32
            assert ((got - want).norm() / want.norm()) < 0.02, kernel


def test_quantize_weight_error_is_half_a_step_per_row():
    torch.manual_seed(1)
    weight = torch.randn(2500, 64) * torch.linspace(0.01, 3, 2500)[:, None]
    q, scale = int8.quantize_weight(weight)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    error = (weight - q.float() * scale.float()[:, None]).abs()
    assert (error <= scale.float()[:, None] * 0.51 + weight.abs() * 0.01).all()


def test_the_cache_and_plan_are_made_once_and_then_used(memorized_model, tok, tmp_path, monkeypatch):
    first, plan = load(memorized_model, tmp_path, plan=None)
    assert set(plan.kernels) == {"int8"} and plan.activation in kernels.ACTIVATIONS
    files = sorted(p.name for p in (tmp_path / "int8").iterdir())
    assert len(files) == 2 and files[0].endswith(".plan.json") and files[1].endswith(".safetensors")

    def never(*args, **kwargs):
        raise AssertionError("done again although the cache was there")

    monkeypatch.setattr(checkpoint, "quantize_into", never)
    monkeypatch.setattr(kernels, "measure", never)
    monkeypatch.setattr(kernels, "start_probe", never)
    second, again = load(memorized_model, tmp_path, plan=None)
    assert again == plan
    assert replies(second, tok)[0] == replies(first, tok)[0] == EXPECTED


def test_the_cache_is_aligned_and_holds_only_int8_linears(memorized_model, tmp_path):
    load(memorized_model, tmp_path)
    (path,) = (tmp_path / "int8").glob("*.safetensors")
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("__pad")}
    assert all(v.data_ptr() % 64 == 0 for v in state.values())
    assert state["lm_head.weight"].dtype == torch.int8 and state["lm_head.scale"].dtype == torch.float32
    assert state["gpt_neox.embed_in.weight"].dtype == torch.float32
    assert "embed_out.weight" not in state


def test_the_cache_writer_takes_tensors_in_any_order_and_refuses_a_wrong_or_missing_one(tmp_path):
    path = tmp_path / "cache.safetensors"
    specs = {"a": (torch.int8, (3, 5)), "b": (torch.float32, (7,))}
    with int8.SafetensorsWriter(path, specs) as writer:
        writer.put("b", torch.arange(7, dtype=torch.float16))  # a float tensor becomes the layout's dtype
        with pytest.raises(ValueError, match="a is torch.int8 \\(5, 3\\)"):
            writer.put("a", torch.ones(5, 3, dtype=torch.int8))
        writer.put("a", torch.full((3, 5), -2, dtype=torch.int8))
    state = load_file(str(path))
    assert state["b"].tolist() == list(range(7)) and state["b"].dtype == torch.float32
    assert state["a"].tolist() == [[-2] * 5] * 3
    with pytest.raises(ValueError, match="1 tensors were never written \\(e.g. b\\)"):
        with int8.SafetensorsWriter(tmp_path / "half.safetensors", specs) as writer:
            writer.put("a", torch.zeros(3, 5, dtype=torch.int8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.safetensors"]  # nothing half-written is left


def test_changed_weights_get_a_new_cache_entry(model_copy, tmp_path):
    cache = tmp_path / "cache"
    load(model_copy, cache)
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, new modification time
    load(model_copy, cache)
    assert len(list((cache / "int8").glob("*.safetensors"))) == 2


def test_a_damaged_cache_is_rebuilt(memorized_model, tok, tmp_path):
    load(memorized_model, tmp_path)
    (path,) = (tmp_path / "int8").glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:1000])
    assert replies(load(memorized_model, tmp_path)[0], tok)[0] == EXPECTED
    assert path.stat().st_size > 1000


def test_an_unwritable_cache_is_one_clear_error(memorized_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ModelError) as raised:
        load(memorized_model, blocker)
    message = str(raised.value)
    assert "\n" not in message and "--quantize none" in message and str(blocker) in message


def test_a_pickle_checkpoint_is_quantized_too(model_copy, tok, tmp_path):
    state = load_file(str(model_copy / "model.safetensors"))
    (model_copy / "model.safetensors").unlink()
    torch.save(state, model_copy / "pytorch_model.bin")
    assert replies(load(model_copy, tmp_path / "cache")[0], tok)[0] == EXPECTED


# --- the engine's choice of path (rinna_cli.engine) ---------------------------------------


def test_quantize_choices():
    assert resolve_quantize("auto", "cpu", "auto") == "int8"
    assert resolve_quantize("auto", "cpu", "float32") is None  # an explicit dtype wins
    assert resolve_quantize("auto", "cuda", "auto") is None
    assert resolve_quantize("none", "cpu", "auto") is None
    assert resolve_quantize("int8", "cpu", "auto") == "int8"
    assert resolve_quantize("int4", "cpu", "auto") == "int4"
    with pytest.raises(UsageError, match="CPU only"):
        resolve_quantize("int4", "cuda", "auto")
    with pytest.raises(UsageError, match=r"float32 or bfloat16, measured on this machine\); drop --dtype float32"):
        resolve_quantize("int8", "cpu", "float32")


def test_quantize_none_loads_full_precision(memorized_model, tok, tmp_path):
    engine = Engine.load(memorized_model, "memorized", tok, "cpu", "auto", "none", tmp_path)
    assert engine.dtype == "bfloat16" and not (tmp_path / "int8").exists()
    assert replies(engine.model, tok)[0] == EXPECTED


def test_a_first_start_removes_the_caches_of_earlier_formats_and_keeps_other_models(memorized_model, tmp_path):
    folder = tmp_path / "int8"
    folder.mkdir()
    tensor = {"x": torch.zeros(4)}
    save_file(tensor, str(folder / "old.safetensors"), metadata={"format": "rinna-cli-int8-v2"})
    (folder / "old.plan.json").write_text("{}")
    save_file(tensor, str(folder / "other-model.safetensors"), metadata={"format": int8.FORMAT})
    (folder / ".half-written.safetensors.123.tmp").write_bytes(b"\0" * 8)
    said: list[str] = []
    load_quantized(memorized_model, [memorized_model / "model.safetensors"], AutoConfig.from_pretrained(memorized_model),
                   tmp_path, "int8", said.append, FIXED)  # fmt: skip
    names = sorted(p.name for p in folder.iterdir())
    assert "old.safetensors" not in names and "old.plan.json" not in names
    assert "other-model.safetensors" in names and ".half-written.safetensors.123.tmp" in names
    assert len([n for n in names if n.endswith(".safetensors")]) == 2  # the new cache and the other model's
    assert "removed old.safetensors, a cache of an earlier rinna-cli" in said
