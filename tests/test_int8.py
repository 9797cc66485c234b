"""int8 weights: exact replies with both kernels, the on-disk cache, and its failure modes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rinna_cli import int8
from rinna_cli.engine import Engine, resolve_quantize
from rinna_cli.errors import ModelError, UsageError
from rinna_cli.session import Conversation
from rinna_cli.tokenizer import Tokenizer
from tests.fixtures.memorized_data import CONVERSATIONS

GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "max_new_tokens": 96, "seed": 0}


@pytest.fixture(scope="module")
def tok(memorized_model) -> Tokenizer:
    return Tokenizer.from_folder(memorized_model)


@pytest.fixture()
def model_copy(memorized_model, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(memorized_model, folder)
    return folder


def replies(engine: Engine, tok: Tokenizer) -> list[list[str]]:
    out = []
    for turns in CONVERSATIONS:
        conversation, texts = Conversation(tok), []
        for question, _ in turns:
            conversation.add_user(question)
            reply = engine.generate(conversation.prompt_ids(), GREEDY)
            conversation.add_reply(reply.text, reply.ids)
            texts.append(reply.text)
        out.append(texts)
    return out


EXPECTED = [[answer for _, answer in turns] for turns in CONVERSATIONS]


def load(folder: Path, tok: Tokenizer, cache: Path) -> Engine:
    return Engine.load(folder, "memorized", tok, "cpu", "auto", "auto", cache)


@pytest.mark.parametrize("kernel", int8.KERNELS)
def test_both_kernels_give_the_memorized_replies(memorized_model, tok, tmp_path, monkeypatch, kernel):
    monkeypatch.setattr(int8.Int8Linear, "kernel", kernel)
    engine = load(memorized_model, tok, tmp_path)
    assert engine.dtype == "int8"
    assert all(isinstance(m, int8.Int8Linear) for m in (engine.model.lm_head, engine.model.gpt_neox.layers[0].mlp.dense_h_to_4h))
    assert replies(engine, tok) == EXPECTED


def test_int_mm_is_the_kernel_here():
    assert int8.best_kernel() == "int_mm" == int8.Int8Linear.kernel


def test_kernels_agree_with_the_dequantized_matmul():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    module = int8.Int8Linear.quantize(linear)
    x = torch.randn(3, 5, 96)
    want = x.to(torch.bfloat16).float() @ (module.weight.float() * module.scale.float()[:, None]).t() + module.bias.float()
    for kernel in int8.KERNELS:
        module.kernel = kernel
        got = module(x.to(torch.bfloat16))
        assert got.shape == (3, 5, 40) and got.dtype == torch.float32
        assert ((got.float() - want).norm() / want.norm()) < 0.02


def test_quantize_weight_error_is_half_a_step_per_row():
    torch.manual_seed(1)
    weight = torch.randn(2500, 64) * torch.linspace(0.01, 3, 2500)[:, None]
    q, scale = int8.quantize_weight(weight)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    error = (weight - q.float() * scale.float()[:, None]).abs()
    assert (error <= scale.float()[:, None] * 0.51 + weight.abs() * 0.01).all()


def test_the_cache_is_written_once_and_then_used(memorized_model, tok, tmp_path, monkeypatch):
    first = load(memorized_model, tok, tmp_path)
    files = list((tmp_path / "int8").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"

    def no_quantizing(*args, **kwargs):
        raise AssertionError("quantized again although the cache was there")

    monkeypatch.setattr(int8, "quantize_checkpoint", no_quantizing)
    second = load(memorized_model, tok, tmp_path)
    assert replies(second, tok) == replies(first, tok) == EXPECTED


def test_the_cache_is_aligned_and_holds_only_int8_linears(memorized_model, tok, tmp_path):
    load(memorized_model, tok, tmp_path)
    (path,) = (tmp_path / "int8").iterdir()
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("__pad")}
    assert all(v.data_ptr() % 64 == 0 for v in state.values())
    assert state["lm_head.weight"].dtype == torch.int8 and state["lm_head.scale"].dtype == torch.float32
    assert state["gpt_neox.embed_in.weight"].dtype == torch.float32
    assert "embed_out.weight" not in state


def test_changed_weights_get_a_new_cache_entry(model_copy, tok, tmp_path):
    cache = tmp_path / "cache"
    load(model_copy, tok, cache)
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, new modification time
    load(model_copy, tok, cache)
    assert len(list((cache / "int8").iterdir())) == 2


def test_a_damaged_cache_is_rebuilt(memorized_model, tok, tmp_path):
    load(memorized_model, tok, tmp_path)
    (path,) = (tmp_path / "int8").iterdir()
    path.write_bytes(path.read_bytes()[:1000])
    assert replies(load(memorized_model, tok, tmp_path), tok) == EXPECTED
    assert path.stat().st_size > 1000


def test_an_unwritable_cache_is_one_clear_error(memorized_model, tok, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ModelError) as raised:
        load(memorized_model, tok, blocker)
    message = str(raised.value)
    assert "\n" not in message and "--quantize none" in message and str(blocker) in message


def test_a_pickle_checkpoint_is_quantized_too(model_copy, tok, tmp_path):
    state = load_file(str(model_copy / "model.safetensors"))
    (model_copy / "model.safetensors").unlink()
    torch.save(state, model_copy / "pytorch_model.bin")
    assert replies(load(model_copy, tok, tmp_path / "cache"), tok) == EXPECTED


def test_quantize_choices():
    assert resolve_quantize("auto", "cpu", "auto") is True
    assert resolve_quantize("auto", "cpu", "float32") is False  # an explicit dtype wins
    assert resolve_quantize("auto", "cuda", "auto") is False
    assert resolve_quantize("none", "cpu", "auto") is False
    assert resolve_quantize("int8", "cpu", "float32") is True
    with pytest.raises(UsageError, match="CPU only"):
        resolve_quantize("int8", "cuda", "auto")
    with pytest.raises(UsageError, match="float32"):
        resolve_quantize("int8", "cpu", "bfloat16")


def test_quantize_none_loads_full_precision(memorized_model, tok, tmp_path):
    engine = Engine.load(memorized_model, "memorized", tok, "cpu", "auto", "none", tmp_path)
    assert engine.dtype == "bfloat16" and not (tmp_path / "int8").exists()
    assert replies(engine, tok) == EXPECTED
