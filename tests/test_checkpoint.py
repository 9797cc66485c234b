"""Checkpoints read a layer at a time: the same tensors from safetensors and pickles, in bounded memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks import model as bench_model
from rinna_cli import checkpoint
from tests import prewarmed

ROOT = Path(__file__).resolve().parent.parent


def test_pickles_and_safetensors_give_the_same_groups(memorized_model, tmp_path):
    state = load_file(str(memorized_model / "model.safetensors"))
    torch.save(state, tmp_path / "pytorch_model.bin")
    wanted = {checkpoint.model_name(key) for key in state}
    from_safetensors = [dict(g) for g in checkpoint.layers([memorized_model / "model.safetensors"], wanted)]
    from_pickle = [dict(g) for g in checkpoint.layers([tmp_path / "pytorch_model.bin"], wanted)]
    assert [sorted(g) for g in from_pickle] == [sorted(g) for g in from_safetensors]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(from_pickle, from_safetensors) for k in a)
    names = [sorted(g) for g in from_safetensors]
    layer0 = next(g for g in names if g[0].startswith("gpt_neox.layers.0."))
    assert all(name.startswith("gpt_neox.layers.0.") for name in layer0) and len(layer0) > 8  # a whole layer at once
    assert ["lm_head.weight"] in names  # rinna's embed_out, under the model's name


def test_a_pickle_with_other_objects_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.zeros(2), "when": __import__("datetime").date(2024, 1, 1)}, path)
    with pytest.raises(Exception) as raised:
        list(checkpoint.layers([path], {"weight"}))
    assert "weights_only" in str(raised.value) or "Unpickl" in type(raised.value).__name__


def test_an_old_pickle_that_cannot_be_mapped_is_read_once(memorized_model, tmp_path, monkeypatch):
    state = load_file(str(memorized_model / "model.safetensors"))
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    reads, load = [], torch.load
    monkeypatch.setattr(
        torch, "load", lambda *args, **kwargs: reads.append(kwargs.get("mmap")) or load(*args, **kwargs)
    )
    groups = list(checkpoint.layers([tmp_path / "pytorch_model.bin"], {checkpoint.model_name(key) for key in state}))
    assert reads == [True, None]  # the mapping is refused once, then the file is read whole once
    assert len(groups) > 3 and sum(len(group) for group in groups) == len(state)


_CHILD = r"""
import json, sys, torch
from pathlib import Path
from transformers import AutoConfig
import transformers.models.gpt_neox.modeling_gpt_neox  # its code (90 MB) is no weight memory
from rinna_cli import checkpoint, int8, kernels
from rinna_cli.quantized import cache_path, load_quantized
def peak():  # VmHWM: ru_maxrss would start at the parent's RSS at fork
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
folder, file, cache = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
config = AutoConfig.from_pretrained(folder)
before = peak()
checkpoint.quantize_into([folder / file], int8.meta_model(config), cache_path(folder, "int8", cache, config), int8.FORMAT)
quantized = peak()
model, _ = load_quantized(folder, [folder / file], config, cache, "int8", plan=kernels.Plan({"int8": ("int_mm", "int_mm", "int_mm")}, "float32"))
model(torch.tensor([[5, 6, 7]]))
print(json.dumps({"before": before, "quantized": quantized, "peak": peak()}))
"""


@pytest.fixture(scope="module")
def full_width(tmp_path_factory) -> Path:
    """rinna's full width (hidden 2816, vocabulary 32000) with 2 layers, float16: as safetensors, a pickle, an old pickle."""
    folder = tmp_path_factory.mktemp("full-width")
    (folder / "config.json").write_text(json.dumps(bench_model.config_dict(2)))
    specs = bench_model._tensor_specs(folder)
    bench_model.write_safetensors(folder / "model.safetensors", specs)
    state = load_file(str(folder / "model.safetensors"))
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "old").mkdir()
    torch.save(state, folder / "old" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    return folder


def _first_start(full_width: Path, tmp_path: Path, file: str) -> tuple[int, int, int, int]:
    """Of a first start from ``file``: (growth of peak RSS while quantizing, then with the model loaded and run,
    size of the int8 cache, bytes of one float16 layer)."""
    source, name = tmp_path / "model", Path(file).name
    source.mkdir()
    (source / "config.json").write_text((full_width / "config.json").read_text())
    (source / name).symlink_to(full_width / file)
    done = prewarmed.run([sys.executable, "-c", _CHILD, str(source), name, str(tmp_path / "cache")], cwd=ROOT)
    assert done.returncode == 0, done.stderr.decode()
    measured = json.loads(done.stdout.decode().strip().splitlines()[-1])
    (cache,) = (tmp_path / "cache" / "int8").glob("*.safetensors")
    layer = 2 * sum(s.numel() for k, s in load_file(str(full_width / "model.safetensors")).items() if ".layers.0." in k)
    before = measured["before"]
    return measured["quantized"] - before, measured["peak"] - before, cache.stat().st_size, layer


# Quantizing holds the float16 layer being read, its quantized tensors until they are written, the
# temporaries and the allocator's slack: measured 0.30 GB (1.55 layers) on a Xeon (stop 19). Holding the
# quantized model until the end added the whole cache (0.64 GB here); reading the whole 2-layer checkpoint
# at once 1.40 GB: both far above this bound.
SLACK_LAYERS = 2.5


@pytest.mark.parametrize("file", ["pytorch_model.bin", "model.safetensors"])
def test_a_first_start_holds_one_layer_not_the_quantized_weights(full_width, tmp_path, file):
    quantizing, loaded, cache, layer = _first_start(full_width, tmp_path, file)
    assert quantizing <= SLACK_LAYERS * layer, (quantizing, cache, layer)
    # then the cache is mapped: what a forward pass touches of it, and no copy
    assert loaded <= cache + SLACK_LAYERS * layer, (loaded, cache, layer)


def test_the_bound_fails_when_the_whole_checkpoint_is_read(full_width, tmp_path):
    """An old pickle cannot be mapped and is read whole: the same bound must catch that."""
    quantizing, _, cache, layer = _first_start(full_width, tmp_path, "old/pytorch_model.bin")
    assert quantizing > SLACK_LAYERS * layer, (quantizing, cache, layer)  # the float16 checkpoint (0.74 GB)


_INT4_CHILD = r"""
import json, struct, sys, torch
from pathlib import Path
from transformers import AutoConfig
from rinna_cli import int4, kernels, mapped
from rinna_cli.quantized import load_quantized
fetching = []
if sys.argv[3] == "prompt":  # what the prompt itself reads, not what loading fetches ahead
    mapped.fetch_ahead = lambda tensors: None
else:
    ahead = mapped.fetch_ahead
    mapped.fetch_ahead = lambda tensors: fetching.append(ahead(tensors))
def present(tensors):  # bytes of these tensors' pages mapped into this process (/proc/self/pagemap bit 63)
    total = 0
    with open("/proc/self/pagemap", "rb") as pagemap:
        for t in tensors:
            first, last = t.data_ptr() // 4096, (t.data_ptr() + t.numel() * t.element_size() - 1) // 4096
            pagemap.seek(first * 8)
            total += sum(entry >> 63 for (entry,) in struct.iter_unpack("<Q", pagemap.read((last - first + 1) * 8)))
    return total * 4096
folder, cache = Path(sys.argv[1]), Path(sys.argv[2])
config = AutoConfig.from_pretrained(folder)
plan = kernels.Plan({"int4": ("int4dot", "int4dot", "int4dot"), "int8": ("int8pack_f32", "int8pack_f32", "int8pack_f32")}, "float32")
model, _ = load_quantized(folder, [folder / "model.safetensors"], config, cache, "int4", plan=plan)
layers = [m for m in model.modules() if type(m) is int4.Int4Linear]
weights = [m.weight for m in layers]
sizes = {"weights": sum(t.numel() for t in weights), "tensors": sorted(n for n, _ in layers[0].named_parameters())}
if fetching:
    fetching[0].join()
    print(json.dumps({"sizes": sizes, "loaded": {"weights": present(weights),
                                                 "head": present([model.get_output_embeddings().weight])}}))
    sys.exit(0)
with torch.inference_mode():
    before = present(weights)
    out = model(torch.arange(5, 55)[None], use_cache=True)
    prefill = present(weights)
print(json.dumps({"sizes": sizes, "before": before, "prefill": prefill}))
"""


def test_an_int4_prompt_reads_the_int4_weights_themselves(full_width, tmp_path):
    """int4dot multiplies a prompt too: the cache holds the codes and their scales only (no int8 copy for prompts),
    and a prompt faults them in as a decode step would."""
    done = prewarmed.run([sys.executable, "-c", _INT4_CHILD, str(full_width), str(tmp_path / "cache"), "prompt"], cwd=ROOT)
    assert done.returncode == 0, done.stderr.decode()
    measured = json.loads(done.stdout.decode().strip().splitlines()[-1])
    sizes = measured["sizes"]
    assert sizes["weights"] == 12 * 2816 * 2816 and sizes["tensors"] == ["bias", "scales_zeros", "weight"]  # 2 layers
    assert measured["before"] <= 0.01 * sizes["weights"], measured  # nothing fetched ahead in this run
    assert measured["prefill"] >= 0.99 * sizes["weights"], measured


def test_loading_fetches_the_weights_ahead(full_width, tmp_path):
    """Before any prompt, a background thread maps the weights a reply reads (the first token need not fault them in
    a page at a time), the int8 output head included."""
    done = prewarmed.run([sys.executable, "-c", _INT4_CHILD, str(full_width), str(tmp_path / "cache"), "fetch"], cwd=ROOT)
    assert done.returncode == 0, done.stderr.decode()
    measured = json.loads(done.stdout.decode().strip().splitlines()[-1])
    sizes, loaded = measured["sizes"], measured["loaded"]
    assert loaded["weights"] >= 0.99 * sizes["weights"], measured
    assert loaded["head"] >= 0.99 * 32000 * 2816, measured  # the int8 output head too
