"""transformers' attention through rinna_cli.attention: the native kernel for an unmasked step of one row, SDPA's
path (the same function transformers runs) for everything else."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rinna_cli import attention, native

HEADS, SIZE = 4, 16


@pytest.fixture()
def calls(monkeypatch) -> list:
    seen: list = []
    real = native.Library.attend
    monkeypatch.setattr(native.Library, "attend", lambda self, q, *rest: seen.append(q.shape) or real(self, q, *rest))
    return seen


class Module(torch.nn.Module):
    is_causal = True


def _step(batch: int, rows: int, tokens: int, dtype=torch.float32):
    torch.manual_seed(6)
    return [torch.randn(batch, HEADS, n, SIZE).to(dtype) for n in (rows, tokens, tokens)]


def test_one_unmasked_row_takes_the_kernel_with_sdpas_result_and_layout(calls):
    q, k, v = _step(1, 1, 9)
    with torch.inference_mode():
        got, weights = attention.forward(Module(), q, k, v, None, scaling=0.3)
        want, _ = sdpa_attention_forward(Module(), q, k, v, None, scaling=0.3)
    assert calls == [(1, HEADS, 1, SIZE)] and weights is None
    assert got.shape == want.shape == (1, 1, HEADS, SIZE) and (got - want).abs().max() < 1e-6


@pytest.mark.parametrize(
    "case", ["mask", "two sequences", "a prompt", "float16", "fewer key heads", "dropout", "gradients"]
)
def test_everything_else_is_sdpas_exactly(calls, case):
    q, k, v = _step(2 if case == "two sequences" else 1, 3 if case == "a prompt" else 1, 9,
                    torch.float16 if case == "float16" else torch.float32)  # fmt: skip
    module = Module()
    if case == "fewer key heads":  # grouped-query attention, as transformers gives it
        k, v, module.num_key_value_groups = k[:, :2], v[:, :2], 2
    mask = torch.ones(1, 1, q.shape[2], 9, dtype=torch.bool) if case == "mask" else None
    dropout = 0.1 if case == "dropout" else 0.0
    context = torch.enable_grad() if case == "gradients" else torch.inference_mode()
    with context:
        torch.manual_seed(7)
        got, _ = attention.forward(module, q, k, v, mask, dropout=dropout, scaling=0.3)
        torch.manual_seed(7)
        want, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=0.3)
    assert calls == [] and torch.equal(got, want)


def _tiny_model(dtype: torch.dtype, rotary_pct: float = 1.0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(8)
    config = GPTNeoXConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
                           intermediate_size=256, use_parallel_residual=False, max_position_embeddings=64,
                           rotary_pct=rotary_pct)  # fmt: skip
    return GPTNeoXForCausalLM(config).to(dtype).eval()


@pytest.fixture()
def rotations(monkeypatch) -> list:
    """The shapes DecodeLayer rotated (its own path, not transformers')."""
    seen: list = []
    real = attention.rotate
    monkeypatch.setattr(attention, "rotate", lambda pairs, cos, sin: seen.append(pairs.shape) or real(pairs, cos, sin))
    return seen


def _decode(model, prompt: list[list[int]], steps: int) -> torch.Tensor:
    """The logits of a prompt and of ``steps`` greedy decode steps after it, through the engine's growing cache."""
    from rinna_cli.engine import _GrowingCache

    cache, logits = _GrowingCache(), []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor(prompt), cache=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        for _ in range(steps):
            out = model(input_ids=logits[-1].argmax(-1, keepdim=True), cache=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits)


@pytest.mark.parametrize(("dtype", "rotary_pct"), [(torch.float32, 1.0), (torch.bfloat16, 1.0), (torch.float32, 0.25)])
def test_a_decode_layer_gives_the_bits_of_transformers_layer(calls, rotations, dtype, rotary_pct):
    """A decode step of one sequence takes DecodeLayer's few operations (the kernel once a layer), with the very
    logits of transformers' GPTNeoXLayer; a prompt, two sequences at a time, and a model rotating part of each head
    (not rinna's) are transformers' own."""
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer

    model = _tiny_model(dtype, rotary_pct)
    attention.use(model, "attend")
    assert all(type(layer) is attention.DecodeLayer for layer in model.gpt_neox.layers)
    lean = _decode(model, [[5, 17, 3, 42, 8]], 6)
    assert len(calls) == 6 * 2  # each decode step, each layer
    assert rotations == ([(1, HEADS, 1, 2, 64 // HEADS)] * 6 * 2 if rotary_pct == 1.0 else [])
    rotations.clear()
    for layer in model.gpt_neox.layers:
        layer.__class__ = GPTNeoXLayer
    calls.clear()
    plain = _decode(model, [[5, 17, 3, 42, 8]], 6)
    assert len(calls) == 6 * 2  # rinna-cli's kernel through transformers' attention interface
    assert torch.equal(lean, plain)
    attention.use(model, "attend")
    calls.clear()
    pair = _decode(model, [[5, 17, 3], [9, 1, 4]], 2)  # two rows a step: transformers' path, SDPA
    assert calls == [] and rotations == [] and pair.shape == (3, 2, 100)


def test_sdpa_puts_transformers_layers_back():
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer

    model = _tiny_model(torch.float32)
    attention.use(model, "attend")
    attention.use(model, "sdpa")
    assert attention.chosen(model.config) == "sdpa"
    assert all(type(layer) is GPTNeoXLayer for layer in model.gpt_neox.layers)


def _quantized_model(kind: str, dtype: torch.dtype, decode: str):
    """The tiny model with int8 or int4 layers (the head int8, as rinna-cli's int4 model), every kernel ``decode``
    (int4 layers: int4dot), activations in ``dtype``, rinna-cli's attention."""
    from rinna_cli import int4, int8, kernels

    model = _tiny_model(torch.float32)
    for name, parent, attribute, linear in int8.linears(model):
        quantized = int4.Int4Linear.quantize(linear) if kind == "int4" and name != "lm_head" else None
        setattr(parent, attribute, quantized or int8.Int8Linear.quantize(linear))
    chosen = {"int8": (decode,) * 3} | ({"int4": ("int4dot",) * 3} if kind == "int4" else {})
    kernels.apply(model, kernels.Plan(chosen, str(dtype).removeprefix("torch."), attention="attend"))
    return model


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_step_on_rinna_clis_kernels_takes_one_native_call_for_attention_with_the_same_bits(
    monkeypatch, kind, dtype
):
    """Where rinna-cli's kernels decode a layer's linears, its attention half is one call (decode.c) writing into the
    engine's cache, growing as it goes; the logits are those of the operations it replaces. A kernel of torch's
    (int_mm) decodes as before."""
    from rinna_cli.engine import _GrowingLayer

    monkeypatch.setattr(_GrowingLayer, "GROWTH", 4)  # the cache grows during the decode steps below
    fused: list = []
    real = native.Library.decode_attention
    monkeypatch.setattr(native.Library, "decode_attention", lambda self, *a: fused.append(1) or real(self, *a))
    prompt = [[5, 17, 3, 42, 8]]
    model = _quantized_model(kind, dtype, "int8dot")
    one_call = _decode(model, prompt, 9)
    assert len(fused) == 9 * 2  # each decode step, each layer
    fused.clear()
    with monkeypatch.context() as unfused:
        unfused.setattr(attention.DecodeLayer, "_fused", lambda *args: None)
        assert torch.equal(_decode(model, prompt, 9), one_call) and fused == []
    if kind == "int8":  # int_mm gives int8dot's bits through torch's kernel: transformers' operations, no fused call
        assert torch.equal(_decode(_quantized_model(kind, dtype, "int_mm"), prompt, 9), one_call) and fused == []


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("activation", ["float32", "bfloat16"])
def test_the_engines_fused_decode_steps_give_the_memorized_replies(
    memorized_model, tmp_path, monkeypatch, scheme, activation
):
    """``rinna ask``/``chat``'s engine, its decode steps through decode.c (a chat's later turns reuse and crop the
    cache): every memorized reply exactly."""
    from transformers import AutoConfig

    from rinna_cli import kernels
    from rinna_cli.contract import Sampling
    from rinna_cli.engine import Engine
    from rinna_cli.quantized import load_quantized
    from rinna_cli.session import Conversation
    from rinna_cli.tokenizer import Tokenizer
    from tests.fixtures.memorized_data import CONVERSATIONS

    steps: list = []
    real = native.Library.decode_attention
    monkeypatch.setattr(native.Library, "decode_attention", lambda self, step: steps.append(step.tokens) or real(self, step))
    chosen = {"int8": ("int8dot",) * 3} | ({"int4": ("int4dot",) * 3} if scheme == "int4" else {})
    files = sorted(memorized_model.glob("*.safetensors"))
    plan = kernels.Plan(chosen, activation, attention="attend")
    model, _ = load_quantized(memorized_model, files, AutoConfig.from_pretrained(memorized_model), tmp_path, scheme,
                              plan=plan)  # fmt: skip
    tokenizer = Tokenizer.from_folder(memorized_model)
    engine = Engine(model, tokenizer, "memorized", 2048)
    for turns in CONVERSATIONS:
        conversation = Conversation(tokenizer)
        for question, answer in turns:
            conversation.add_user(question)
            reply = engine.generate(conversation.prompt_ids(), Sampling(0.0, 1.0, 0, 1.0, 96, 0))
            assert reply.text == answer, (scheme, activation, question)
            conversation.add_reply(reply.text, reply.ids)
    assert len(steps) > 100
