"""The job queue of ``rinna serve``: up to ``parallel`` replies generated at once, ``queue_size`` more waiting, the rest refused.

With ``parallel`` > 1 the engine must accept concurrent ``generate`` calls (a batching
engine, :class:`rinna_cli.batching.BatchingEngine`); with 1 (the plain engine) one
reply is generated at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import deque
from typing import AsyncIterator

from rinna_cli.contract import Engine, Reply, Sampling, Step
from rinna_cli.errors import RinnaError
from rinna_cli.serve.requests import ApiError


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class State:
    """What the server holds: the engine, the places of the running jobs (``parallel``), and the counters of ``/health``."""

    def __init__(self, engine: Engine, name: str, api_key: str | None, queue_size: int, parallel: int = 1):
        self.engine = engine
        self.name = name
        self.api_key = api_key
        self.queue_size = queue_size
        self.parallel = parallel
        self.places = asyncio.Semaphore(parallel)
        self.pending = 0  # admitted requests: those generating and those waiting
        self.running: set[Job] = set()
        self.closing = False
        self.jobs: set[Job] = set()
        self.generated_tokens = 0
        self.completions = 0
        self.last: dict | None = None
        self.recent: deque[dict] = deque(maxlen=16)
        self.created = int(time.time())

    def admit(self) -> None:
        if self.closing:
            raise ApiError(503, "the server is shutting down", kind="server_error")
        if self.pending >= self.parallel + self.queue_size:
            generating = "one reply is" if self.parallel == 1 else f"{self.parallel} replies are"
            raise ApiError(
                429,
                f"busy: {generating} being generated and {self.queue_size} more requests are waiting; "
                "try again shortly",
                kind="rate_limit_error",
            )
        self.pending += 1

    def start(self, prompt_ids: list[int], sampling: Sampling) -> Job:
        """A job for the request, admitted to the queue (or refused with 429/503)."""
        self.admit()
        return Job(self, prompt_ids, sampling)

    def finished(self, job: Job) -> None:
        self.running.discard(job)
        self.pending -= 1
        self.jobs.discard(job)
        if job.reply is not None:
            self.generated_tokens += job.reply.completion_tokens
            self.completions += 1
            self.last = {
                "prompt_tokens": job.reply.prompt_tokens,
                "completion_tokens": job.reply.completion_tokens,
                "finish_reason": job.reply.finish_reason,
            }
            self.recent.append(self.last)

    def health(self) -> dict:
        running = len(self.running)
        batch = {"running": running, "waiting": self.pending - running, "parallel": self.parallel}
        status = getattr(self.engine, "status", None)  # a batching engine says more (prefilling, tokens/s)
        if callable(status) and dataclasses.is_dataclass(said := status()) and not isinstance(said, type):
            batch.update({k: v for k, v in dataclasses.asdict(said).items() if k not in batch})
        return {
            "status": "ok",
            "model": self.name,
            "busy": running > 0,
            "queued": self.pending - running,
            "queue_size": self.queue_size,
            "batch": batch,
            "generating_tokens": sum(job.tokens for job in self.running),
            "generated_tokens": self.generated_tokens,
            "completions": self.completions,
            "last": self.last,
            "recent": list(self.recent),
        }


class Job:
    """One generation: waits for the engine, runs in a thread, and queues its steps for the response."""

    def __init__(self, state: State, prompt_ids: list[int], sampling: Sampling):
        self.state = state
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.stop = threading.Event()
        self.events: asyncio.Queue = asyncio.Queue()
        self.reply: Reply | None = None
        self.error: str | None = None
        self.tokens = 0  # generated so far
        self._loop = asyncio.get_running_loop()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        state = self.state
        state.jobs.add(self)
        try:
            async with state.places:
                if self.stop.is_set():
                    return
                state.running.add(self)
                finished: asyncio.Future = self._loop.create_future()
                thread = threading.Thread(
                    target=self._generate, args=(finished,), name="rinna-serve-generate", daemon=True
                )
                thread.start()
                try:
                    await asyncio.shield(finished)
                except asyncio.CancelledError:
                    self.stop.set()
                    await finished  # the engine stops after the current token; hold the place until it has
                    raise
        finally:
            state.finished(self)
            self.events.put_nowait(None)

    def on_step(self, step: Step) -> None:
        """The engine's callback, in the generation thread: each step becomes one chunk."""
        self.tokens += len(step.ids)
        if step.text or step.ids:
            try:
                self._loop.call_soon_threadsafe(self.events.put_nowait, step)
            except RuntimeError:  # the event loop is gone (shutdown)
                self.stop.set()

    def _generate(self, finished: asyncio.Future) -> None:
        try:
            self.reply = self.state.engine.generate(self.prompt_ids, self.sampling, self.on_step, self.stop)
        except RinnaError as err:
            self.error = str(err)
        except Exception as err:  # noqa: BLE001 - reported to the client in one line, the server keeps running
            self.error = f"{type(err).__name__}: {err}"
        finally:
            try:
                self._loop.call_soon_threadsafe(_settle, finished)
            except RuntimeError:
                pass

    async def steps(self) -> AsyncIterator[Step]:
        while True:
            step = await self.events.get()
            if step is None:
                return
            yield step

    async def result(self) -> Reply:
        async for _ in self.steps():
            pass
        if self.error is not None:
            raise ApiError(500, f"generation failed: {self.error}", kind="server_error")
        if self.reply is None:
            raise ApiError(503, "the server is shutting down", kind="server_error")
        return self.reply
