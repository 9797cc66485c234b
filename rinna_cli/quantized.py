"""The quantized CPU model (``--quantize int8`` or ``int4``): one entry point for the engine.

First start: the checkpoint is quantized a layer at a time into the cache (while a
child process probes which kernels run, :func:`rinna_cli.kernels.start_probe`, once per
CPU and torch), then the kernels are measured on the loaded model and the plan is saved
beside the weights.
Later starts memory-map the cached weights and read the plan; a plan made on another
CPU, torch or thread count is measured again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from safetensors import safe_open
from torch import nn

from rinna_cli import checkpoint, int4, int8, kernels, mapped
from rinna_cli.errors import ModelError, is_out_of_memory

SCHEMES = ("int8", "int4")


def _layout(scheme: str, config) -> tuple[str, nn.Module]:
    """The cache format and the meta-device model of ``scheme``."""
    if scheme == "int4":
        return int4.FORMAT, int8.meta_model(config, int4.choose)
    return int8.FORMAT, int8.meta_model(config)


def cache_path(folder: Path, scheme: str, cache_dir: Path, config) -> Path:
    return cache_dir / scheme / f"{int8.cache_key(folder, _layout(scheme, config)[0])}.safetensors"


def load_quantized(
    folder: Path,
    files: list[Path],
    config,
    cache_dir: Path,
    scheme: str = "int8",
    progress: Callable[[str], None] = lambda _: None,
    plan: kernels.Plan | None = None,
) -> tuple[nn.Module, kernels.Plan]:
    """The ``scheme`` model from the cache (quantizing it first if absent or damaged) with its kernel plan applied.

    ``files`` are the checkpoint's safetensors files or ``pytorch_model*.bin`` pickles;
    ``config`` is the transformers config. Raises :class:`ModelError` when the cache
    cannot be written; other loader errors propagate for the engine to word. A ``plan``
    given is used as it is (nothing measured or saved): to force kernels.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}")
    format, model = _layout(scheme, config)
    path = cache_dir / scheme / f"{int8.cache_key(folder, format)}.safetensors"
    plan_path = path.with_suffix(".plan.json")
    plan = plan or kernels.cached_plan(plan_path, scheme)
    working = None if plan else kernels.cached_probe(cache_dir)
    loaded, probe = None, None
    if path.is_file():
        progress(f"loading {scheme} weights")
        try:
            loaded = int8.load(config, path, model)
        except Exception as err:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
            if is_out_of_memory(err):
                raise
            path.unlink(missing_ok=True)
            model = _layout(scheme, config)[1]
    if loaded is None:
        probe = None if plan or working is not None else kernels.start_probe()  # runs while they are quantized
        progress(f"quantizing to {scheme} (first start only)")
        try:
            checkpoint.quantize_into(files, model, path, format)
        except OSError as err:
            _stop(probe)
            if is_out_of_memory(err):
                raise
            raise ModelError(
                f"cannot write the {scheme} weights to {path.parent} ({err.strerror or err}); "
                "free some space there or use --quantize none"
            ) from None
        except BaseException:
            _stop(probe)
            raise
        loaded = int8.load(config, path, _layout(scheme, config)[1])
        for stale in prune_stale(path.parent, format):
            progress(f"removed {stale.name}, a cache of an earlier rinna-cli")
    if plan is None:
        progress("measuring the kernels (first start on this machine)")
        probed = True  # every kernel had its trial (a probe that crashed or hung left the rest untried)
        if working is None:
            probe = probe or kernels.start_probe()
            working = kernels.probe_answer(probe, cache_dir)
            probed = probe.returncode == 0
        plan = kernels.measure(loaded, scheme, working)
        try:
            if plan.settled and probed:  # else measured (and probed) again next time
                kernels.save_plan(plan_path, plan)
        except OSError:  # the weights are cached: a plan that cannot be saved is measured again next time
            pass
    kernels.apply(loaded, plan)
    mapped.fetch_ahead(_resident(loaded))
    return loaded, plan


def prune_stale(folder: Path, format: str) -> list[Path]:
    """Delete the caches in ``folder`` written in another format than ``format`` (and their plans): no version that
    writes ``format`` reads them (an int4 cache of torch's layout is 5.3 GB). Those of other models are kept."""
    removed = []
    for path in folder.glob("*.safetensors"):
        try:
            with safe_open(str(path), "pt") as cache:
                written = (cache.metadata() or {}).get("format")
        except Exception:  # noqa: BLE001 - one being written, or damaged: not ours to judge
            continue
        if written != format:
            path.unlink(missing_ok=True)
            path.with_suffix(".plan.json").unlink(missing_ok=True)
            removed.append(path)
    return removed


def _resident(model: nn.Module) -> list:
    """The tensors a reply reads and keeps, in the order a prompt reads them: all but int4's codes where torch's int4
    kernel reads its own layout made from them (:mod:`rinna_cli.int4`)."""
    unread = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, int4.Int4Linear) and module.decode in int4.TORCH_LAYOUT
    }
    return [tensor for name, tensor in model.named_parameters() if name not in unread]


def _stop(probe) -> None:
    if probe is not None:
        probe.kill()
        probe.wait()
