"""Continuous batching: many ``generate`` calls share each pass through the model's weights.

On a CPU, decoding one token is bound by reading the weights; a matrix multiply with
8 rows reads them once, as one with 1 row does. :class:`BatchingEngine` runs one
scheduler thread whose every step puts either one row per decoding sequence or the
prompts waiting to be prefilled through every linear layer together, then does
attention per sequence against that sequence's own KV cache. Sequences join and
leave between steps (no padding to the longest). While some sequences decode,
prompt steps alternate with decode steps and take at most a chunk of prompt tokens
(adapted so that such a step lasts about :data:`TARGET_STEP_S`): a long prompt
stalls the others a chunk at a time, a new prompt waits one step for its turn.
Each sequence's cache holds at most its prompt and ``max_new_tokens`` (the window).

GPT-NeoX's layers are run here from the loaded model's own modules (layer norms,
linear layers whatever their kind, e.g. :class:`rinna_cli.int8.Int8Linear`, the
rotary embedding), in transformers' order, and tokens are chosen with
transformers' logits processors: a greedy reply is the one
:class:`rinna_cli.engine.Engine` gives. Each sequence samples with its own
``torch.Generator`` seeded with its seed, the way the single engine seeds torch's
global one, so a seeded reply is the single engine's too, whatever else is in the
batch, with row-exact linear kernels (int8 ``_int_mm`` is). One exception: a prompt
prefilled in chunks (longer than the chunk, while others decode) has its attention
computed with a mask instead of the causal kernel, which can change float rounding;
``prefill_chunk=window`` never chunks (what ``rinna batch`` uses).

Imported only where a local model is loaded (torch).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

from rinna_cli.contract import Reply, Sampling, Step, Timing, check_fits
from rinna_cli.errors import ModelError, UsageError
from rinna_cli.streamer import ReplyDecoder
from rinna_cli.tokenizer import Tokenizer

# Prompt tokens per prompt step while others decode: the chunk adapts (halving or doubling) so
# that such a step takes about TARGET_STEP_S, bounding how long a long prompt stalls the others.
# A prompt that fits in a chunk is never split (it is prefilled whole, as the single engine does).
TARGET_STEP_S = 1.0
MIN_CHUNK, MAX_CHUNK, FIRST_CHUNK = 16, 1024, 128
RATE_WINDOW_S = 10.0  # /health's tokens/s is over the last this many seconds


def _ignore(step: Step) -> None:
    """The default ``on_step``."""


def _processors(sampling: Sampling) -> LogitsProcessorList:
    """transformers' processors, in its order, for what ``GenerationConfig`` would get from ``sampling``."""
    processors = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if not sampling.greedy:
        if sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=sampling.top_k))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=sampling.top_p))
    return processors


@dataclass(frozen=True)
class BatchStatus:
    """What the batch is doing now (``/health``)."""

    parallel: int  # sequences generated together at most
    running: int  # sequences in the batch (prefilling or decoding)
    prefilling: int  # of those, still reading their prompt
    waiting: int  # generate calls waiting for a place in the batch
    tokens_per_s: float  # tokens generated per second, all sequences together, over the last seconds
    prefill_chunk: int  # prompt tokens prefilled per step now


@dataclass(eq=False)
class _Sequence:
    """One ``generate`` call inside the scheduler."""

    prompt: list[int]
    sampling: Sampling
    stop: threading.Event
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    generated: list[int] = field(default_factory=list)
    fed: int = 0  # ids whose keys and values are in the cache
    keys: torch.Tensor | None = None  # (layers, heads, capacity, head size)
    values: torch.Tensor | None = None
    generator: torch.Generator | None = None
    processors: LogitsProcessorList | None = None

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    def next_ids(self, budget: int) -> list[int]:
        """The ids to feed this step: the next chunk of the prompt, or the last generated id."""
        if self.prefilling:
            return self.prompt[self.fed : self.fed + budget]
        return self.generated[-1:]


class BatchingEngine:
    """A loaded GPT-NeoX model serving up to ``parallel`` ``generate`` calls at once (threads); see the module docstring.

    Implements :class:`rinna_cli.contract.Engine`; calls beyond ``parallel`` wait for
    a place in the batch. ``prefill_chunk`` fixes the prompt tokens prefilled per step
    (default: adapted to the machine, see :data:`TARGET_STEP_S`).
    """

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        name: str,
        window: int,
        parallel: int = 4,
        prefill_chunk: int | None = None,
        kernels: str = "",
    ):
        if parallel < 1:
            raise UsageError(f"parallel = {parallel} is out of range; allowed: parallel >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.window = window
        self.parallel = parallel
        self.kernels = ", ".join(part for part in (kernels, f"batch of up to {parallel}") if part)
        self._base = model.base_model
        self._head = model.get_output_embeddings()
        self._layers = list(self._base.layers)
        attention = self._layers[0].attention
        self._heads = model.config.num_attention_heads
        self._head_size = attention.head_size
        self._scaling = attention.scaling
        self._parallel_residual = model.config.use_parallel_residual
        embedding = self._base.embed_in.weight
        self._device, self._dtype = embedding.device, embedding.dtype
        self._adaptive = prefill_chunk is None
        self._chunk = prefill_chunk or FIRST_CHUNK
        self._prefilled_last = False
        self._lock = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._produced: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._thread: threading.Thread | None = None
        self._closed = False

    @classmethod
    def wrap(cls, engine, parallel: int, prefill_chunk: int | None = None) -> BatchingEngine:
        """Batch the model of a loaded :class:`rinna_cli.engine.Engine` (it shares the weights; use one or the other)."""
        return cls(
            engine.model, engine.tokenizer, engine.name, engine.window, parallel, prefill_chunk,
            kernels=getattr(engine, "kernels", ""),
        )  # fmt: skip

    # -- the caller's side -------------------------------------------------------------

    def generate(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        on_step: Callable[[Step], None] = _ignore,
        stop: threading.Event | None = None,
    ) -> Reply:
        """Generate a reply to ``prompt_ids`` in the shared batch; ``on_step`` runs on the calling thread.

        Setting ``stop`` ends this sequence only, after the step in progress (or, while its
        prompt is being prefilled, before its first token); since ``on_step`` runs here while
        the batch goes on, a token more than ``on_step`` had seen may come. An exception from
        ``on_step`` stops the sequence and is raised here.
        """
        if not prompt_ids:
            raise UsageError("empty prompt")
        check_fits(len(prompt_ids), sampling.max_new_tokens, self.window)
        timing = Timing()
        sequence = _Sequence(list(prompt_ids), sampling, stop or threading.Event())
        self._submit(sequence)
        decoder = ReplyDecoder(self.tokenizer)
        try:
            while True:
                kind, value = sequence.events.get()
                if kind == "ids":
                    timing.token()
                    on_step(Step(decoder.push(value), value))
                elif kind == "error":
                    raise value
                else:
                    finish = value
                    break
            text = decoder.finish()
            if text:
                on_step(Step(text, []))
        except BaseException:
            sequence.stop.set()  # the scheduler drops it after its current step
            raise
        timing.end()
        return Reply(
            text=decoder.text,
            ids=decoder.ids,
            finish_reason=finish,
            prompt_tokens=len(prompt_ids),
            prefilled_tokens=len(prompt_ids),
            completion_tokens=len(sequence.generated),
            ttft_s=timing.ttft_s,
            tokens_per_s=timing.tokens_per_s(len(sequence.generated)),
            kernels=self.kernels,
        )

    def status(self) -> BatchStatus:
        with self._lock:
            now = time.perf_counter()
            while self._produced and self._produced[0][0] < now - RATE_WINDOW_S:
                self._produced.popleft()
            produced = sum(tokens for _, tokens in self._produced)
            span = now - self._produced[0][0] if self._produced else 0.0
            return BatchStatus(
                parallel=self.parallel,
                running=len(self._running),
                prefilling=sum(1 for sequence in self._running if sequence.prefilling),
                waiting=len(self._waiting),
                tokens_per_s=round(produced / span, 2) if span > 0 else 0.0,
                prefill_chunk=self._chunk,
            )

    def close(self) -> None:
        """Stop the scheduler; calls still running or waiting end with "interrupted"."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _submit(self, sequence: _Sequence) -> None:
        with self._lock:
            if self._closed:
                raise ModelError("the engine is closed")
            self._waiting.append(sequence)
            if self._thread is None:
                self._thread = threading.Thread(target=self._schedule, name="rinna-batching", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    # -- the scheduler -----------------------------------------------------------------

    def _schedule(self) -> None:
        """The scheduler thread: admit, step, finish, until closed."""
        while True:
            with self._lock:
                while not self._closed and not self._running and not self._waiting:
                    self._lock.wait()
                if self._closed:
                    for sequence in [*self._running, *self._waiting]:
                        sequence.events.put(("end", "interrupted"))
                    self._running, self._waiting = [], deque()
                    return
                while self._waiting and len(self._running) < self.parallel:
                    self._running.append(self._waiting.popleft())
                running = list(self._running)
            try:
                self._step(running)
            except BaseException as err:  # noqa: BLE001 - every caller gets the error; the scheduler goes on
                self._fail(running, err)

    def _step(self, running: list[_Sequence]) -> None:
        for sequence in running:
            if sequence.prefilling and sequence.stop.is_set():
                self._finish(sequence, "interrupted")
            elif sequence.keys is None:
                self._start(sequence)
        live = [sequence for sequence in running if sequence in self._running]
        decoding = [sequence for sequence in live if not sequence.prefilling]
        waiting = [sequence for sequence in live if sequence.prefilling]
        # A step is all decode rows or all prompt rows, so every row is multiplied as it would be alone
        # (a linear layer's kernel may depend on its row count). Prompt steps alternate with decode
        # steps while some sequences decode: they wait one chunk at most, a new prompt one step.
        prefill = bool(waiting) and (not decoding or not self._prefilled_last)
        self._prefilled_last = prefill
        chunk = self._chunk if decoding else self.window  # with nobody to stall, prompts go whole
        batch, budget = [], chunk
        for sequence in waiting if prefill else decoding:
            if prefill:
                remaining = len(sequence.prompt) - sequence.fed
                if budget <= 0 or budget < remaining <= chunk:
                    continue  # a prompt that fits a chunk is prefilled whole, as alone: in a later step
                ids = sequence.next_ids(budget)
                budget -= len(ids)
            else:
                ids = sequence.next_ids(budget)
            batch.append((sequence, ids))
        if not batch:
            return
        started = time.perf_counter()
        with torch.inference_mode():
            logits = self._forward(batch)
        produced = 0
        for (sequence, ids), row in zip(batch, logits):
            sequence.fed += len(ids)
            if row is not None:
                self._choose(sequence, row)
                produced += 1
        ended = time.perf_counter()
        with self._lock:
            self._produced.append((ended, produced))
        if self._adaptive and prefill and decoding:
            self._adapt(ended - started, chunk - budget)

    def _adapt(self, seconds: float, prefilled: int) -> None:
        """After a prompt step that decoding sequences waited for: halve the chunk if it was slower than
        the target, double it if it was much faster and used the whole chunk."""
        if seconds > TARGET_STEP_S and self._chunk > MIN_CHUNK:
            self._chunk //= 2
        elif seconds < TARGET_STEP_S / 3 and prefilled == self._chunk and self._chunk < MAX_CHUNK:
            self._chunk *= 2

    def _start(self, sequence: _Sequence) -> None:
        """A sequence enters the batch: its cache (room for its prompt and reply), generator and processors."""
        capacity = len(sequence.prompt) + sequence.sampling.max_new_tokens
        shape = (len(self._layers), self._heads, capacity, self._head_size)
        # torch.empty maps memory lazily: the cache costs what is written, not its capacity
        sequence.keys = torch.empty(shape, dtype=self._dtype, device=self._device)
        sequence.values = torch.empty(shape, dtype=self._dtype, device=self._device)
        sequence.generator = torch.Generator(device=self._device)
        if sequence.sampling.seed >= 0:
            sequence.generator.manual_seed(sequence.sampling.seed)
        else:
            sequence.generator.seed()
        sequence.processors = _processors(sequence.sampling)

    def _forward(self, batch: list[tuple[_Sequence, list[int]]]) -> list[torch.Tensor | None]:
        """One pass of all the batch's rows; the next-token logits of each sequence whose step ends its input."""
        ids = [i for _, chunk in batch for i in chunk]
        positions = [p for sequence, chunk in batch for p in range(sequence.fed, sequence.fed + len(chunk))]
        hidden = self._base.embed_in(torch.tensor(ids, device=self._device))
        cos, sin = self._base.rotary_emb(hidden[None], torch.tensor([positions], device=self._device))
        rows = len(ids)
        for index, layer in enumerate(self._layers):
            attention = layer.attention
            qkv = attention.query_key_value(layer.input_layernorm(hidden))
            qkv = qkv.view(1, rows, self._heads, 3 * self._head_size).transpose(1, 2)
            query, key, value = qkv.chunk(3, dim=-1)
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            outputs, row = [], 0
            for sequence, chunk in batch:
                outputs.append(self._attend(sequence, index, query, key, value, row, len(chunk)))
                row += len(chunk)
            context = torch.cat(outputs, dim=2).transpose(1, 2).reshape(rows, -1)
            attended = attention.dense(context)
            if self._parallel_residual:
                hidden = layer.mlp(layer.post_attention_layernorm(hidden)) + attended + hidden
            else:
                attended = attended + hidden
                hidden = layer.mlp(layer.post_attention_layernorm(attended)) + attended
        last, wanted, row = [], [], 0
        for sequence, chunk in batch:
            row += len(chunk)
            ends_input = sequence.fed + len(chunk) >= len(sequence.prompt)
            wanted.append(ends_input)
            if ends_input:
                last.append(row - 1)
        if not last:
            return [None] * len(batch)
        logits = iter(self._head(self._base.final_layer_norm(hidden[last])).float())
        return [next(logits)[None] if want else None for want in wanted]

    def _attend(self, sequence: _Sequence, layer: int, query, key, value, row: int, count: int) -> torch.Tensor:
        """Attention of ``count`` rows of one sequence against its cache, after storing their keys and values."""
        start, end = sequence.fed, sequence.fed + count
        keys, values = sequence.keys[layer], sequence.values[layer]
        keys[:, start:end] = key[0, :, row : row + count]
        values[:, start:end] = value[0, :, row : row + count]
        mask = None
        if count > 1 and start > 0:  # a later chunk: causal, offset by what is cached
            mask = torch.ones(count, end, dtype=torch.bool, device=self._device).tril(start)
        return F.scaled_dot_product_attention(
            query[:, :, row : row + count],
            keys[None, :, :end],
            values[None, :, :end],
            attn_mask=mask,
            is_causal=count > 1 and start == 0,
            scale=self._scaling,
        )

    def _choose(self, sequence: _Sequence, logits: torch.Tensor) -> None:
        """Pick the next id as transformers' generate does, hand it to the caller, and end the sequence if done."""
        sampling = sequence.sampling
        if sequence.processors:
            seen = torch.tensor([sequence.prompt + sequence.generated], device=self._device)
            logits = sequence.processors(seen, logits)
        if sampling.greedy:
            token = int(torch.argmax(logits, dim=-1))
        else:
            token = int(torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=sequence.generator))
        sequence.generated.append(token)
        sequence.events.put(("ids", [token]))
        if token == self.tokenizer.special.eos:
            self._finish(sequence, "stop")
        elif sequence.stop.is_set():
            self._finish(sequence, "interrupted")
        elif len(sequence.generated) >= sampling.max_new_tokens:
            self._finish(sequence, "length")

    def _finish(self, sequence: _Sequence, reason: str) -> None:
        with self._lock:
            if sequence in self._running:
                self._running.remove(sequence)
        sequence.keys = sequence.values = None  # the cache goes now, not when the caller lets go
        sequence.events.put(("end", reason))

    def _fail(self, running: list[_Sequence], err: BaseException) -> None:
        """A step failed: every sequence in it gets the error (out of memory as one line), the others go on."""
        message = str(err).lower()
        if (
            isinstance(err, (torch.OutOfMemoryError, MemoryError))
            or "out of memory" in message
            or "allocate" in message
        ):
            err = ModelError(
                "out of memory while generating; lower --parallel or --max-new-tokens, or shorten the prompts"
            )
        with self._lock:
            for sequence in running:
                if sequence in self._running:
                    self._running.remove(sequence)
                sequence.keys = sequence.values = None
                sequence.events.put(("error", err))
