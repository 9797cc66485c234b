"""The model: loading, generation with streaming, and a KV cache kept across turns.

The only module that imports torch and transformers. The cache holds the keys
and values of the ids last seen; a new prompt that shares a prefix with them
(the next turn of a chat, a ``/retry`` or ``/undo``) prefills only the rest.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from threading import Event
from typing import Any, Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationConfig, StoppingCriteria
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from rinna_cli import quantized
from rinna_cli.config import cache_dir as default_cache_dir
from rinna_cli.contract import OnStep, Reply, Sampling, Step, Timing, ignore_step
from rinna_cli.errors import ModelError, UsageError, is_out_of_memory
from rinna_cli.hub import context_window, read_config
from rinna_cli.interrupt import in_a_daemon_thread
from rinna_cli.streamer import ReplyDecoder
from rinna_cli.tokenizer import Tokenizer

hf_logging.set_verbosity_error()  # rinna-cli reports problems itself, in one line
hf_logging.disable_progress_bar()  # loading shows one spinner on a terminal's stderr instead

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OOM_HINT = "try --dtype bfloat16 or float16, or --device cpu"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _first_line(err: BaseException) -> str:
    """The first line of an error's message, without the ANSI styling some libraries add."""
    return (_ANSI.sub("", str(err)).strip().splitlines() or [type(err).__name__])[0]


def resolve_device(name: str) -> str:
    """``auto`` is cuda, then mps, then cpu; an explicit device must exist."""
    mps = getattr(torch.backends, "mps", None)
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": bool(mps and mps.is_available())}
    if name == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if available[d])
    if not available.get(name, False):
        # the setting may come from RINNA_DEVICE or config.toml: named as a setting, the flag as the way out
        raise UsageError(f"device {name} is not available on this machine (use --device auto or cpu)")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` is float16 on a GPU and bfloat16 on the CPU (half the memory of float32; used with ``--quantize none``)."""
    if name == "auto":
        return torch.float16 if device in ("cuda", "mps") else torch.bfloat16
    return DTYPES[name]


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ModelError(f"{folder}: no model weights (model.safetensors or pytorch_model.bin)")
    return files


def resolve_quantize(name: str, device: str, dtype: str) -> str | None:
    """The quantization scheme: ``auto`` is int8 on the CPU unless a dtype is asked for; int8/int4 only on the CPU."""
    if name in quantized.SCHEMES:
        if device != "cpu":
            raise UsageError(f"--quantize {name} runs on the CPU only (device is {device}); use --quantize none")
        if dtype != "auto":
            raise UsageError(
                f"--quantize {name} picks its own compute dtype (float32 or bfloat16, measured on this machine); "
                f"drop --dtype {dtype} or use --quantize none"
            )
        return name
    return "int8" if name == "auto" and device == "cpu" and dtype == "auto" else None


def _from_pretrained(folder: Path, files: list[Path], torch_dtype: torch.dtype):
    model, info = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch_dtype,
        trust_remote_code=False,
        use_safetensors=files[0].suffix == ".safetensors",
        local_files_only=True,
        output_loading_info=True,
    )
    missing = sorted((info or {}).get("missing_keys") or ())
    if missing:  # transformers would fill them with random values and the replies would be noise
        raise ModelError(
            f"{folder}: the weights lack {len(missing)} of the model's tensors (e.g. {missing[0]}); "
            "the files are incomplete or belong to another model"
        )
    return model


class _GrowingLayer(DynamicLayer):
    """A :class:`DynamicLayer` that writes each step into spare room instead of concatenating.

    transformers' layer copies the whole cache on every generated token (``torch.cat``),
    half the decode time at a 600-token context on a CPU; here the keys and values are
    views into buffers that grow by :data:`GROWTH` tokens at a time. Cropping (inherited)
    shortens the views; the room stays for the next turn.
    """

    GROWTH = 512
    _buffers: tuple[Any, Any] | None = None  # (keys, values) with room to grow
    keys: Any  # DynamicLayer's, views into the buffers
    values: Any

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._buffers = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[-2]
        keys, values, used = self.reserve(count, key_states, value_states)
        keys[..., used : used + count, :] = key_states
        values[..., used : used + count, :] = value_states
        return self.extend(count)

    def reserve(self, count: int, key_like=None, value_like=None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The buffers, with room for ``count`` more tokens, and the tokens held; new buffers are shaped like
        ``key_like`` and ``value_like`` (default: the cache's). A kernel that writes the keys and values itself
        (:mod:`rinna_cli.attention`) calls this, then :meth:`extend`."""
        key_like = self.keys if key_like is None else key_like
        value_like = self.values if value_like is None else value_like
        used = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        needed = used + count
        if self._buffers is None or needed > self._buffers[0].shape[-2]:
            room = -(-needed // self.GROWTH) * self.GROWTH
            buffers = (
                key_like.new_empty((*key_like.shape[:-2], room, key_like.shape[-1])),
                value_like.new_empty((*value_like.shape[:-2], room, value_like.shape[-1])),
            )
            if used:
                buffers[0][..., :used, :] = self.keys
                buffers[1][..., :used, :] = self.values
            self._buffers = buffers
        return (*self._buffers, used)

    def extend(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The views take the next ``count`` tokens written into the buffers (:meth:`reserve`)."""
        assert self._buffers is not None
        needed = (self.keys.shape[-2] if self.keys.dim() == 4 else 0) + count
        self.keys, self.values = self._buffers[0][..., :needed, :], self._buffers[1][..., :needed, :]
        return self.keys, self.values


class _GrowingCache(DynamicCache):
    """A :class:`DynamicCache` of :class:`_GrowingLayer` layers."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=_GrowingLayer)


class _Stop(StoppingCriteria):
    """Ends generation after the current token once ``event`` is set (Ctrl-C)."""

    def __init__(self, event: Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _Streamer(BaseStreamer):
    """transformers' streamer interface over :class:`ReplyDecoder`; skips the prompt, times the tokens."""

    def __init__(self, decoder: ReplyDecoder, on_step: OnStep, timing: Timing):
        self.decoder = decoder
        self.on_step = on_step
        self.timing = timing
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.timing.token()
        ids = value.reshape(-1).tolist()
        self.on_step(Step(self.decoder.push(ids), ids))

    def end(self):
        text = self.decoder.finish()
        if text:
            self.on_step(Step(text, []))


class Engine:
    """A loaded rinna model with its tokenizer and a conversation KV cache."""

    def __init__(self, model, tokenizer: Tokenizer, name: str, window: int):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.window = window
        self.device = str(model.device.type)
        self.dtype = str(model.dtype).removeprefix("torch.")
        self.kernels = ""  # the kernel plan of a quantized model, e.g. "int8 decode int8dot, batch int8dot, ..."
        self._cache: DynamicCache | None = None
        self._cached_ids: list[int] = []

    @classmethod
    def load(
        cls,
        folder: Path,
        name: str,
        tokenizer: Tokenizer,
        device: str = "auto",
        dtype: str = "auto",
        quantize: str = "auto",
        cache_dir: Path | None = None,
        progress: Callable[[str], None] = lambda _: None,
    ) -> Engine:
        """Load the weights (safetensors preferred, pickles only with ``weights_only``); never runs model code.

        ``quantize`` "auto" means int8 weights on the CPU when no ``dtype`` is asked for; the int8
        weights are cached in ``cache_dir`` after the first start (see :mod:`rinna_cli.int8`).
        """
        # In a thread that ends with the load: with GNU OpenMP (torch's Linux wheels) each thread that
        # runs a parallel kernel keeps its own team of workers until it ends, and loading runs many
        # (quantizing, measuring the kernels). Left on the main thread, that team makes every parallel
        # kernel of the thread that generates (the batching scheduler, serve's worker) wait for its
        # workers to be woken. 2-core AMD EPYC (Zen 4), full-size int8 model, first start, generating
        # on another thread: 3.9-4.3 tok/s after loading on the main thread, 5.1-5.7 loaded this way.
        return in_a_daemon_thread(
            lambda: cls._load(folder, name, tokenizer, device, dtype, quantize, cache_dir, progress), "rinna-load"
        )

    @classmethod
    def _load(
        cls,
        folder: Path,
        name: str,
        tokenizer: Tokenizer,
        device: str,
        dtype: str,
        quantize: str,
        cache_dir: Path | None,
        progress: Callable[[str], None],
    ) -> Engine:
        config = read_config(folder)
        files = _weight_files(folder)
        device = resolve_device(device)
        scheme = resolve_quantize(quantize, device, dtype)
        kernels = ""
        try:
            with warnings.catch_warnings():  # e.g. torch's pickle-protocol notice: the error below says it all
                warnings.simplefilter("ignore")
                if scheme:
                    model, plan = quantized.load_quantized(
                        folder,
                        files,
                        AutoConfig.from_pretrained(folder),
                        cache_dir or default_cache_dir(),
                        scheme,
                        progress,
                    )
                    kernels = plan.describe()
                else:
                    model = _from_pretrained(folder, files, resolve_dtype(dtype, device))
                    model.to(device)
        except ModelError:
            raise
        except Exception as err:  # noqa: BLE001 - every loader failure becomes one line naming the folder
            if is_out_of_memory(err):
                raise ModelError(f"{folder}: out of memory while loading the model; {OOM_HINT}") from None
            if isinstance(err, pickle.UnpicklingError):
                raise ModelError(
                    f"{folder}: {files[0].name} is not a plain-tensor checkpoint (it holds other objects or is "
                    "damaged); pickles are read only with torch's weights_only loader, which refused it"
                ) from None
            raise ModelError(f"{folder}: cannot load the weights ({type(err).__name__}: {_first_line(err)})") from None
        model.eval()
        engine = cls(model, tokenizer, name, context_window(config))
        if scheme:
            engine.dtype, engine.kernels = scheme, kernels
        return engine

    def _reuse_cache(self, prompt_ids: list[int]) -> int:
        """Crop the cache to the prefix it shares with ``prompt_ids`` (leaving one id to feed); return its length."""
        shared = 0
        limit = min(len(self._cached_ids), len(prompt_ids) - 1)
        while shared < limit and self._cached_ids[shared] == prompt_ids[shared]:
            shared += 1
        if self._cache is None or shared == 0:
            self._cache, self._cached_ids = _GrowingCache(), []
            return 0
        if shared < self._cache.get_seq_length():
            self._cache.crop(shared - self._cache.get_seq_length())
        self._cached_ids = self._cached_ids[:shared]
        return shared

    def _config(self, sampling: Sampling) -> GenerationConfig:
        special = self.tokenizer.special
        sample = not sampling.greedy
        knobs = (
            {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k} if sample else {}
        )
        return GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sample,
            repetition_penalty=sampling.repetition_penalty,
            eos_token_id=special.eos,
            pad_token_id=special.pad if special.pad is not None else special.eos,
            bos_token_id=special.bos,
            **knobs,
        )

    def generate(
        self, prompt_ids: list[int], sampling: Sampling, on_step: OnStep = ignore_step, stop: Event | None = None
    ) -> Reply:
        """Generate a reply to ``prompt_ids`` (see :class:`rinna_cli.contract.Engine`), reusing the KV cache."""
        if not prompt_ids:
            raise UsageError("empty prompt")
        stop = stop or Event()
        cached = self._reuse_cache(prompt_ids)
        decoder = ReplyDecoder(self.tokenizer)
        timing = Timing()
        streamer = _Streamer(decoder, on_step, timing)
        if sampling.seed >= 0:
            torch.manual_seed(sampling.seed)
        else:
            torch.seed()
        input_ids = torch.tensor([prompt_ids], device=self.model.device)
        try:
            with torch.inference_mode():
                output = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=self._config(sampling),
                    cache=self._cache,
                    streamer=streamer,
                    stopping_criteria=[_Stop(stop)],
                )
        except BaseException as err:
            self._cache, self._cached_ids = None, []
            if isinstance(err, Exception) and is_out_of_memory(err):
                raise ModelError(
                    f"out of memory while generating; lower --max-new-tokens or shorten the prompt, or {OOM_HINT}"
                ) from None
            raise
        timing.end()
        generated = output[0, len(prompt_ids) :].tolist()
        assert self._cache is not None
        self._cached_ids = (prompt_ids + generated)[: self._cache.get_seq_length()]
        eos = self.tokenizer.special.eos
        finish = "stop" if eos in generated else "interrupted" if stop.is_set() else "length"
        return Reply(
            text=decoder.text,
            ids=decoder.ids,
            finish_reason=finish,
            prompt_tokens=len(prompt_ids),
            prefilled_tokens=len(prompt_ids) - cached,
            completion_tokens=len(generated),
            ttft_s=timing.ttft_s,
            tokens_per_s=timing.tokens_per_s(len(generated)),
            kernels=self.kernels,
        )

    def forget(self) -> None:
        """Drop the KV cache (the next prompt is prefilled whole)."""
        self._cache, self._cached_ids = None, []
