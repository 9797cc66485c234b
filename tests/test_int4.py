"""int4 weights: the groupwise quantization, the layers that stay int8, exact memorized replies, the cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from rinna_cli import int4, kernels, native, quantized
from rinna_cli.int8 import Int8Linear
from rinna_cli.quantized import cache_path, load_quantized
from rinna_cli.tokenizer import Tokenizer
from tests.greedy import EXPECTED, replies


def load(folder: Path, cache: Path, plan):
    return load_quantized(folder, [folder / "model.safetensors"], AutoConfig.from_pretrained(folder), cache, "int4", plan=plan)


def plan(kernel: str, activation: str) -> kernels.Plan:
    return kernels.Plan({"int4": (kernel, kernel, kernel), "int8": ("int8pack", "int8pack", "int8pack")}, activation)


def test_group_sizes_follow_the_shape():
    assert int4.group_for(2816, 11264) == int4.GROUP_SIZE == 128
    assert int4.group_for(64, 128) == 64  # the memorized model's layers
    assert int4.group_for(96, 64) == 0  # inputs not a multiple of 64: int4dot cannot take it
    assert int4.group_for(192, 64) == 64
    assert int4.group_for(64, 482) == 0  # outputs not a multiple of 16: the kernel cannot take it
    assert int4.group_for(48, 64) == 0


def test_dequantized_weights_are_within_half_a_step_of_each_group():
    torch.manual_seed(0)
    weight = torch.randn(64, 256) * torch.linspace(0.01, 2, 64)[:, None]
    linear = torch.nn.Linear(256, 64, bias=False)
    linear.weight.data = weight
    module = int4.Int4Linear.quantize(linear)
    assert module.group_size == 128 and module.weight.dtype == torch.uint8 and module.weight.shape == (64, 128)
    module.decode = module.batch = module.prefill = "int4pack_f32"
    dequantized = module(torch.eye(256)).t()  # row i of the identity picks input i
    groups = weight.reshape(64, 2, 128)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    error = (dequantized - weight).abs().reshape(64, 2, 128)
    assert (error <= step[..., None] * 0.5 + groups.abs() * 0.01 + 1e-6).all()


@pytest.mark.parametrize("activation", kernels.ACTIVATIONS)
@pytest.mark.parametrize("kernel", int4.Int4Linear.KERNELS)
def test_the_memorized_replies_hold_with_int4(memorized_model, tmp_path, kernel, activation):
    model, chosen = load(memorized_model, tmp_path, plan(kernel, activation))
    assert type(model.gpt_neox.layers[0].mlp.dense_h_to_4h) is int4.Int4Linear
    assert type(model.lm_head) is Int8Linear  # the output head stays int8
    assert chosen.describe() == f"int4 decode {kernel}, batch {kernel}, prefill {kernel}; int8 decode int8pack, batch int8pack, prefill int8pack; {activation}, attention sdpa"
    assert replies(model, Tokenizer.from_folder(memorized_model))[0] == EXPECTED


def test_a_prompt_through_int4dot_and_decoding_with_torch_give_the_memorized_replies(memorized_model, tmp_path):
    mixed = kernels.Plan({"int4": ("int4pack_f32", "int4pack_f32", "int4dot"), "int8": ("int8pack", "int8pack", "int8pack")}, "float32")
    model, _ = load(memorized_model, tmp_path, mixed)
    assert replies(model, Tokenizer.from_folder(memorized_model))[0] == EXPECTED


def test_the_int4_cache_holds_our_codes_and_scales_only_the_same_on_every_cpu(memorized_model, tmp_path, monkeypatch):
    load(memorized_model, tmp_path, plan("int4dot", "float32"))
    (path,) = (tmp_path / "int4").glob("*.safetensors")
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("__pad")}
    name = "gpt_neox.layers.0.mlp.dense_h_to_4h"
    original = load_file(str(memorized_model / "model.safetensors"))[f"{name}.weight"]
    want = int4.quantize_weight(original, 64)
    packed = state[f"{name}.weight"]
    assert packed.dtype == torch.uint8 and packed.shape == (128, 32)  # two 4-bit codes per byte
    assert torch.equal(packed, want["weight"]) and torch.equal(state[f"{name}.scales_zeros"], want["scales_zeros"])
    assert state[f"{name}.scales_zeros"].shape == (8, 1, 2, 16)  # by panel of 16 rows
    assert {key.rsplit(".", 1)[1] for key in state if key.startswith(f"{name}.")} == {"weight", "scales_zeros", "bias"}
    assert state["lm_head.weight"].dtype == torch.int8
    config = AutoConfig.from_pretrained(memorized_model)
    assert cache_path(memorized_model, "int4", tmp_path, config) == path
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert cache_path(memorized_model, "int4", tmp_path, config) == path  # rinna-cli's layout on any CPU
    monkeypatch.setattr(int4, "FORMAT", "rinna-cli-int4-v9")
    assert cache_path(memorized_model, "int4", tmp_path, config) != path


def test_codes_are_packed_by_panels_of_16_rows_and_8_inputs_and_unpack_to_what_was_packed():
    codes = torch.randint(0, 16, (32, 128))
    packed = int4.pack(codes)
    assert packed.shape == (32, 64)
    flat = packed.reshape(-1)
    # panel 0, inputs 0..7: byte 4l + b is row l's input b (low half) and input 4 + b (high half)
    assert flat[4 * 5 + 2] == codes[5, 2] | (codes[5, 6] << 4)
    # panel 0, inputs 8..15 follow at byte 64; panel 1 (rows 16..31) after the 16 chunks of panel 0
    assert flat[64 + 4 * 15 + 3] == codes[15, 11] | (codes[15, 15] << 4)
    assert flat[16 * 64 + 4 * 1 + 0] == codes[17, 0] | (codes[17, 4] << 4)
    assert torch.equal(int4.unpack(packed), codes.to(torch.int32))
    pairs = torch.randn(32, 2, 2).to(torch.bfloat16)
    panels = int4.panel_pairs(pairs)
    assert panels.shape == (2, 2, 2, 16) and panels[1, 0, 1, 3] == pairs[19, 0, 1]
    assert torch.equal(int4.row_pairs(panels), pairs)


def test_torch_int4_kernel_reads_its_layout_made_in_memory_and_the_codes_are_not_fetched(memorized_model, tmp_path):
    model, _ = load(memorized_model, tmp_path, plan("int4pack", "float32"))
    layer = model.gpt_neox.layers[0].mlp.dense_h_to_4h
    assert layer._derived["int4pack"].dtype == torch.uint8  # made while loading, not in the first reply
    assert replies(model, Tokenizer.from_folder(memorized_model))[0] == EXPECTED
    resident = {id(t) for t in quantized._resident(model)}
    assert id(layer.weight) not in resident and id(layer.scales_zeros) in resident
    model, _ = load(memorized_model, tmp_path, plan("int4dot", "float32"))
    assert id(model.gpt_neox.layers[0].mlp.dense_h_to_4h.weight) in {id(t) for t in quantized._resident(model)}


def test_the_planner_times_torch_int4_kernel_without_the_making_of_its_layout(memorized_model, tmp_path, monkeypatch):
    real = int4.Int4Linear.torch_layout

    def slow(self):  # 0.1 s a matrix at rinna's size: far longer than the kernels' warm-up on this tiny model
        time.sleep(0.2)
        return real(self)

    monkeypatch.setattr(int4.Int4Linear, "torch_layout", slow)
    working = {"int4:int4dot", "int4:int4pack", "int8:int8dot"}
    model, _ = load(memorized_model, tmp_path, plan("int4dot", "float32"))
    native.library()  # built: its first call would take seconds of int4dot's warm-up
    measured = kernels.measure(model, "int4", working, budget_s=8.0)
    assert any(label.startswith("decode int4/int4pack ") for label in measured.timings_ms)
    assert any(label.startswith("decode int4/int4dot ") for label in measured.timings_ms)
