"""Continuous batching: many ``generate`` calls share each pass through the model's weights.

On a CPU, decoding one token is bound by reading the weights; a matrix multiply with
8 rows reads them once, as one with 1 row does. :class:`BatchingEngine` runs one
scheduler thread; every step puts one row per decoding sequence *and* the prompt rows
of sequences still being prefilled through every linear layer together
(:class:`rinna_cli.batched_forward.BatchedForward`), so a new prompt is read in the
very next step, riding along with the others' tokens. Sequences join and leave between
steps (no padding to the longest). While others decode, a step takes at most a chunk of
prompt tokens (:data:`MIN_CHUNK` and up, adapted so that the step lasts about
:data:`TARGET_STEP_S`): a prompt that fits a chunk is read whole, as alone; a longer one
is read a chunk a step, so it stalls the others about a second at a time. Each
sequence's cache holds at most its prompt and ``max_new_tokens`` (the window).

A greedy reply is the one :class:`rinna_cli.engine.Engine` gives, and a seeded one too
(each sequence has its own generator), whatever else is in the batch, with row-exact
linear kernels (int8 ``_int_mm`` is). One exception: a prompt read in chunks (longer
than the chunk, while others decode) has its later chunks' attention masked instead of
computed by the causal kernel, which can change float rounding; ``prefill_chunk=window``
never chunks (what ``rinna batch`` uses).

Imported only where a local model is loaded (torch).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from rinna_cli.batched_forward import BatchedForward, Sequence
from rinna_cli.contract import Reply, Sampling, Step, Timing, check_fits
from rinna_cli.errors import ModelError, UsageError, is_out_of_memory
from rinna_cli.streamer import ReplyDecoder
from rinna_cli.tokenizer import Tokenizer

# Prompt tokens per step while others decode: the chunk adapts (halving or doubling) so that such a
# step takes about TARGET_STEP_S. A prompt that fits in a chunk is never split; MIN_CHUNK keeps the
# chat-sized prompts whole even on a slow machine (a split prompt waits a step per chunk).
TARGET_STEP_S = 1.0
MIN_CHUNK, MAX_CHUNK, FIRST_CHUNK = 256, 2048, 512
RATE_WINDOW_S = 10.0  # /health's tokens/s is over the last this many seconds


def _ignore(step: Step) -> None:
    """The default ``on_step``."""


@dataclass(frozen=True)
class BatchStatus:
    """What the batch is doing now (``/health``)."""

    parallel: int  # sequences generated together at most
    running: int  # sequences in the batch (prefilling or decoding)
    prefilling: int  # of those, still reading their prompt
    waiting: int  # generate calls waiting for a place in the batch
    tokens_per_s: float  # tokens generated per second, all sequences together, over the last seconds
    prefill_chunk: int  # prompt tokens prefilled per step now, at most, while others decode


def plan(running: list[Sequence], chunk: int, window: int) -> tuple[list[tuple[Sequence, list[int]]], int]:
    """A step's rows: every decoding sequence's last id, and up to ``chunk`` prompt ids (the window if
    none decodes). A prompt that fits the chunk goes whole or waits a step; a longer one takes what is left.

    Returns the rows, decode rows first, and the number of prompt ids among them.
    """
    rows = [(sequence, sequence.next_ids(1)) for sequence in running if not sequence.prefilling]
    budget, prefilled = chunk if rows else window, 0
    for sequence in running:
        if (
            sequence.prefilling
            and budget - prefilled > 0
            and (sequence.remaining <= budget - prefilled or sequence.remaining > chunk)
        ):
            rows.append((sequence, sequence.next_ids(budget - prefilled)))
            prefilled += len(rows[-1][1])
    return rows, prefilled


class BatchingEngine:
    """A loaded GPT-NeoX model serving up to ``parallel`` ``generate`` calls at once (threads); see the module docstring.

    Implements :class:`rinna_cli.contract.Engine`; calls beyond ``parallel`` wait for
    a place in the batch. ``prefill_chunk`` fixes the prompt tokens prefilled per step
    while others decode (default: adapted to the machine, see :data:`TARGET_STEP_S`).
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
        self._pass = BatchedForward(model)
        self._adaptive = prefill_chunk is None
        self._chunk = prefill_chunk or FIRST_CHUNK
        self._lock = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
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
        the batch goes on, the tokens of steps it had not yet seen still come (one on an idle
        machine, more where this thread waits for a core). An exception from ``on_step`` stops
        the sequence and is raised here.
        """
        if not prompt_ids:
            raise UsageError("empty prompt")
        check_fits(len(prompt_ids), sampling.max_new_tokens, self.window)
        timing = Timing()
        sequence = Sequence(list(prompt_ids), sampling, stop or threading.Event())
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

    def _submit(self, sequence: Sequence) -> None:
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

    def _step(self, running: list[Sequence]) -> None:
        """One pass: the decoding sequences' next tokens and the next prompt rows, together."""
        for sequence in running:
            if sequence.prefilling and sequence.stop.is_set():
                self._finish(sequence, "interrupted")
            elif sequence.keys is None:
                self._pass.start(sequence)
        live = [sequence for sequence in running if sequence in self._running]
        decoding = any(not sequence.prefilling for sequence in live)
        rows, prefilled = plan(live, self._chunk, self.window)
        if not rows:
            return
        started = time.perf_counter()
        logits = self._pass.forward(rows)
        produced = 0
        for (sequence, ids), row in zip(rows, logits):
            sequence.fed += len(ids)
            if row is not None:
                self._choose(sequence, row)
                produced += 1
        ended = time.perf_counter()
        with self._lock:
            self._produced.append((ended, produced))
        if self._adaptive and prefilled and decoding:
            self._adapt(ended - started, prefilled)

    def _adapt(self, seconds: float, prefilled: int) -> None:
        """After a step with prompt rows that decoding sequences waited for: halve the chunk if it was slower
        than the target, double it if it was much faster and used the whole chunk."""
        if seconds > TARGET_STEP_S and self._chunk > MIN_CHUNK:
            self._chunk //= 2
        elif seconds < TARGET_STEP_S / 3 and prefilled == self._chunk and self._chunk < MAX_CHUNK:
            self._chunk *= 2

    def _choose(self, sequence: Sequence, logits: torch.Tensor) -> None:
        """Pick the next id, hand it to the caller, and end the sequence if done."""
        token = sequence.pick(logits)
        sequence.generated.append(token)
        sequence.events.put(("ids", [token]))
        if token == self.tokenizer.special.eos:
            self._finish(sequence, "stop")
        elif sequence.stop.is_set():
            self._finish(sequence, "interrupted")
        elif len(sequence.generated) >= sequence.sampling.max_new_tokens:
            self._finish(sequence, "length")

    def _finish(self, sequence: Sequence, reason: str) -> None:
        with self._lock:
            if sequence in self._running:
                self._running.remove(sequence)
        sequence.release()
        sequence.events.put(("end", reason))

    def _fail(self, running: list[Sequence], err: BaseException) -> None:
        """A step failed: every sequence in it gets the error (out of memory as one line), the others go on."""
        err = _one_line(err)
        with self._lock:
            for sequence in running:
                if sequence in self._running:
                    self._running.remove(sequence)
                sequence.release()
                sequence.events.put(("error", err))


def _one_line(err: BaseException) -> BaseException:
    """Running out of memory as a one-line error with what to lower; any other error as it is."""
    if is_out_of_memory(err):
        return ModelError(
            "out of memory while generating; lower --parallel or --max-new-tokens, or shorten the prompts"
        )
    return err
