"""``rinna batch``: a file of prompts through the model, one JSON line out per line in (blank lines skipped).

Each input line is a prompt, or a JSON object ``{"id": …, "prompt": "…"}`` or
``{"id": …, "messages": [{"role": "user"|"assistant", "content": "…"}, …]}``
with optional sampling options (``temperature``, ``top_p``, ``top_k``,
``repetition_penalty``, ``max_new_tokens``, ``seed``). A line starting with
``{`` is read as JSON. Each output row is ``{"id", "reply", "finish_reason",
"prompt_tokens", "completion_tokens"}``, or ``{"id", "line", "error"}`` for a
line that cannot be run; the id is the given one or the line number.

Up to ``parallel`` prompts are generated at once (the engine batches them:
:class:`rinna_cli.batching.BatchingEngine` locally, the server behind
``--endpoint``). Rows go to ``-o OUT`` as they finish, resumably, or to standard
output in input order as soon as all earlier ones are done
(:mod:`rinna_cli.batch_output`).
"""

from __future__ import annotations

import codecs
import difflib
import json
import queue
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from rinna_cli import config, hub, inputs
from rinna_cli.batch_output import Item, OutFile, OutStream, error_row, key as _key, made_from, reply_row
from rinna_cli.contract import Engine, Sampling, check_fits
from rinna_cli.environment import Environment, model_files
from rinna_cli.errors import RinnaError, UsageError
from rinna_cli.inputs import compose_question
from rinna_cli.prompt import SYSTEM, USER
from rinna_cli.session import Conversation
from rinna_cli.tokenizer import Tokenizer

MAX_PARALLEL = 64
ROLES = {"user": USER, "assistant": SYSTEM}
FIELDS = {"id", "prompt", "messages", *config.SAMPLING_KEYS}


@dataclass(frozen=True)
class Progress:
    """How far a job is: ``done`` of ``total`` rows this run (``failed`` of them error rows), tokens generated."""

    done: int
    total: int
    failed: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Result:
    """What a job did: rows written, ids skipped (already in OUT), error rows, and whether Ctrl-C cut it short."""

    written: int
    skipped: int
    failed: int
    interrupted: bool
    tokens: int
    seconds: float

    @property
    def exit_code(self) -> int:
        """130 after Ctrl-C, 1 when some line failed, else 0."""
        return 130 if self.interrupted else 1 if self.failed else 0


def _conversation(tokenizer: Tokenizer, messages: object) -> Conversation:
    """The card's turns for ``messages``; ends with a user message."""
    if not isinstance(messages, list) or not messages:
        raise UsageError("messages must be a non-empty array of {role, content} objects")
    conversation = Conversation(tokenizer)
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise UsageError(f"message {number} must be an object with just role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            hint = " (rinna has no system turn)" if role == "system" else ""
            raise UsageError(f"message {number}: role must be user or assistant, not {role!r}{hint}")
        if not isinstance(content, str) or not content.strip():
            raise UsageError(f"message {number}: content must be a non-empty string")
        if role == "user":
            conversation.add_user(content.strip())
        else:
            conversation.add_reply(content.strip())
    if conversation.turns[-1].speaker != USER:
        raise UsageError("the last message must be the user's")
    return conversation


def parse_line(text: str, line: int, tokenizer: Tokenizer, defaults: Sampling, window: int) -> Item:
    """One input line as an :class:`Item`; never raises (a bad line becomes an error item)."""
    item_id: str | int = line
    try:
        options: dict = {}
        conversation = None
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except ValueError as err:
                raise UsageError(f"invalid JSON ({err})") from None
            if not isinstance(data, dict):
                raise UsageError("invalid JSON object")
            if "id" in data:
                if isinstance(data["id"], bool) or not isinstance(data["id"], (str, int)):
                    raise UsageError("id must be a string or an integer")
                item_id = data["id"]
            unknown = sorted(set(data) - FIELDS)
            if unknown:
                close = difflib.get_close_matches(unknown[0], sorted(FIELDS), n=1, cutoff=0.7)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UsageError(f"unknown field {unknown[0]!r}{hint}; known: {', '.join(sorted(FIELDS))}")
            if ("prompt" in data) == ("messages" in data):
                raise UsageError("give either prompt or messages")
            if "prompt" in data:
                if not isinstance(data["prompt"], str):
                    raise UsageError("prompt must be a string")
                text = data["prompt"]
            else:
                conversation = _conversation(tokenizer, data["messages"])
            options = {key: config.check(key, data[key]) for key in config.SAMPLING_KEYS if key in data}
        if conversation is None:
            conversation = Conversation(tokenizer)
            conversation.add_user(compose_question(text, None))
        sampling = replace(defaults, **options)
        prompt_ids = conversation.prompt_ids()
        check_fits(len(prompt_ids), sampling.max_new_tokens, window)
    except UsageError as err:
        message = str(err)
        if message.startswith("the question is empty"):
            message = "empty prompt"
        return Item(line, item_id, error=message)
    return Item(line, item_id, prompt_ids, sampling)


def read_items(
    data: bytes, tokenizer: Tokenizer, defaults: Sampling, window: int, what: str = "standard input"
) -> list[Item]:
    """Every line of ``data`` but blank ones as an item; a repeated id is an error on its later lines.

    Ids default to line numbers, so a given integer id can repeat another line's number. A leading UTF-8 byte order
    mark (Notepad's, Excel's) is dropped; input in another encoding throughout (UTF-16, Shift_JIS: no line that is
    not ASCII reads as UTF-8) is refused as :func:`rinna_cli.inputs.decode` refuses it, naming ``what``.
    """
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        if not any(not line.isascii() and _utf8(line) for line in data.split(b"\n")):
            inputs.decode(data, what)  # raises, with the iconv hint
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    items: list[Item] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(lines, 1):
        try:
            text = raw.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as err:
            items.append(Item(number, number, error=f"not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})"))
            continue
        if not text.strip():  # a blank line (an editor's last one, a separator) is no prompt: no row, no failure
            continue
        item = parse_line(text, number, tokenizer, defaults, window)
        key = _key(item.id)
        if item.error is not None:
            pass
        elif key in first_line:
            item = Item(number, item.id, error=f"duplicate id {key} (first on line {first_line[key]})")
        else:
            first_line[key] = number
        items.append(item)
    return items


def _utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _work(todo: list[Item], engine: Engine, parallel: int, stop: threading.Event) -> tuple[list, queue.SimpleQueue]:
    """Start ``parallel`` workers over the runnable items; each finished item comes as (index, row or None, tokens)."""
    pending: queue.SimpleQueue = queue.SimpleQueue()
    for index, item in enumerate(todo):
        if item.error is None:
            pending.put(index)
    finished: queue.SimpleQueue = queue.SimpleQueue()

    def work() -> None:
        while not stop.is_set():
            try:
                index = pending.get_nowait()
            except queue.Empty:
                return
            item = todo[index]
            assert item.prompt_ids is not None and item.sampling is not None
            try:
                reply = engine.generate(item.prompt_ids, item.sampling, stop=stop)
            except RinnaError as err:
                finished.put((index, error_row(item, str(err)), 0))
                continue
            except Exception as err:  # noqa: BLE001 - one line's failure never ends the job
                finished.put((index, error_row(item, f"{type(err).__name__}: {err}"), 0))
                continue
            if reply.finish_reason == "interrupted":
                finished.put((index, None, 0))  # in flight at Ctrl-C: not a finished reply
            else:
                finished.put((index, reply_row(item, reply), reply.completion_tokens))

    workers = [threading.Thread(target=work, name=f"rinna-batch-{n}", daemon=True) for n in range(parallel)]
    for worker in workers:
        worker.start()
    return workers, finished


class _Rows:
    """The rows of one run on their way out: to a file as they come, to a stream in input order; the counts."""

    def __init__(self, out: OutFile | OutStream, todo: list[Item], on_progress: Callable[[Progress], None]):
        self.out, self.todo, self.on_progress = out, todo, on_progress
        self.in_order = isinstance(out, OutStream)
        self.held: dict[int, dict | None] = {
            i: error_row(item, item.error) for i, item in enumerate(todo) if item.error
        }
        self.next_index = self.written = self.failed = self.tokens = 0
        self.started = time.perf_counter()
        if not self.in_order:
            for index in sorted(self.held):
                self._emit(self.held.pop(index))
        self.report()

    def add(self, index: int, row: dict | None, tokens: int) -> None:
        self.tokens += tokens
        if self.in_order:
            self.held[index] = row
            self.flush()
        elif row is not None:
            self._emit(row)
        self.report()

    def flush(self, final: bool = False) -> None:
        """Write the held rows that every earlier row is out before; all of them when ``final``."""
        while self.next_index < len(self.todo) and (self.next_index in self.held or final):
            row = self.held.pop(self.next_index, None)
            if row is not None:
                self._emit(row)
            self.next_index += 1

    def report(self) -> None:
        elapsed = time.perf_counter() - self.started
        self.on_progress(Progress(self.written, len(self.todo), self.failed, self.tokens, elapsed))

    def _emit(self, row: dict | None) -> None:
        assert row is not None
        self.out.write(row)
        self.written += 1
        self.failed += "error" in row


def run(
    items: list[Item],
    engine: Engine | None,
    out: OutFile | OutStream,
    parallel: int,
    on_progress: Callable[[Progress], None] = lambda _: None,
    stop: threading.Event | None = None,
) -> Result:
    """Run the items not yet in ``out``, ``parallel`` at a time; setting ``stop`` (Ctrl-C) keeps what finished.

    ``engine`` is any :class:`rinna_cli.contract.Engine` that takes ``parallel``
    calls at once (None when every item left is an error). Rows go to a file as they finish and to a stream in input order.
    """
    stop = stop or threading.Event()
    todo = [item for item in items if item.error or _key(item.id) not in out.done]
    workers, finished = _work(todo, engine, parallel, stop) if engine is not None else ([], queue.SimpleQueue())
    try:
        rows = _Rows(out, todo, on_progress)
        while any(worker.is_alive() for worker in workers) or not finished.empty():
            try:
                rows.add(*finished.get(timeout=0.1))
            except queue.Empty:
                continue
        rows.flush(final=True)
        rows.report()
        interrupted = stop.is_set() and rows.written < len(todo)
        if not interrupted:
            out.finish(items)
    finally:
        stop.set()  # a KeyboardInterrupt (second Ctrl-C) stops the workers after their token
        out.close()
    seconds = time.perf_counter() - rows.started
    return Result(rows.written, len(items) - len(todo), rows.failed, interrupted, rows.tokens, seconds)


def batched(engine: Engine, parallel: int) -> Engine:
    """A local engine behind a :class:`BatchingEngine` (a remote one batches on its server).

    A job wants throughput, not short stalls: every prompt is prefilled whole (never in
    chunks), as ``rinna ask`` does, so that greedy replies are byte-identical to its.
    """
    local = sys.modules.get("rinna_cli.engine")
    if local is not None and isinstance(engine, local.Engine):
        from rinna_cli.batching import BatchingEngine

        return BatchingEngine.wrap(engine, parallel, prefill_chunk=engine.window)
    return engine


class _Bar:
    """A rich progress bar on stderr: rows done of total, tokens/s, time left."""

    def __init__(self, env: Environment, skipped: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        self.bar = Bar(
            TextColumn("batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} tokens/s"),
            TextColumn("{task.fields[failed]}"),
            TimeRemainingColumn(),
            console=env.errors(),
        )
        self.task = self.bar.add_task("batch", total=None, rate="0.0", failed="")
        if skipped:
            self.bar.console.print(f"{skipped} rows already in the output file: skipped", markup=False, style="dim")

    def __call__(self, progress: Progress) -> None:
        failed = f"{progress.failed} failed" if progress.failed else ""
        self.bar.update(
            self.task, completed=progress.done, total=progress.total, rate=f"{progress.tokens_per_s:.1f}", failed=failed
        )

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def _read_source(env: Environment, source: str | None) -> bytes:
    if source in (None, "-"):
        if env.stdin is None or env.stdin_isatty:
            raise UsageError("no prompts: pass FILE, or pipe them in (one per line)")
        return env.stdin.buffer.read()
    try:
        return Path(source).read_bytes()
    except OSError as err:
        raise UsageError(f"{source}: cannot read it ({err.strerror or err})") from None


def batch(env: Environment, settings: config.Settings, source: str | None, output: Path | None, parallel: int) -> int:
    """``rinna batch``: returns the exit code (1 if some line failed, 130 after Ctrl-C)."""
    if not 1 <= parallel <= MAX_PARALLEL:
        raise UsageError(f"--parallel {parallel} is out of range; allowed: 1 <= parallel <= {MAX_PARALLEL}")
    tokenizer, window = model_files(settings)
    defaults = settings.sampling()
    check_fits(0, defaults.max_new_tokens, window)
    what = "standard input" if source in (None, "-") else str(source)
    items = read_items(_read_source(env, source), tokenizer, defaults, window, what)
    out: OutFile | OutStream
    if output is not None:
        model = hub.canonical(settings.model)  # -m sft and its hub id are one model
        items = [replace(item, made_from=made_from(item, model)) if not item.error else item for item in items]
        out = OutFile(output)
        stale = out.drop_stale(items)
        if stale:
            rows = "1 row of {} was" if stale == 1 else f"{stale} rows of {{}} were"
            env.warn(f"{rows.format(output)} made from another prompt or other options: made again now")
    else:
        out = OutStream(env.stdout)
    skipped = sum(1 for item in items if not item.error and _key(item.id) in out.done)
    engine = None  # not loaded when only error rows are left to write
    try:
        if skipped + sum(1 for item in items if item.error) < len(items):
            engine = batched(env.open_engine(env, settings, tokenizer, window), parallel)
    except BaseException:
        out.close()
        raise
    from rinna_cli.interrupt import sigint_sets

    stop = threading.Event()
    try:
        if env.stderr_isatty and not (output is None and env.stdout_isatty):  # rows on the terminal show progress
            with _Bar(env, skipped) as bar, sigint_sets(stop):
                result = run(items, engine, out, parallel, bar, stop)
        else:
            with sigint_sets(stop):
                result = run(items, engine, out, parallel, stop=stop)
    finally:
        close = getattr(engine, "close", None)
        if close is not None:  # the batching engine's scheduler thread ends before the interpreter does
            close()
    if result.failed:
        env.warn(f"{result.failed} of {len(items)} lines failed (their rows hold the error)")
    if result.interrupted:
        done = result.written + result.skipped
        where = f" in {output}; the same command again goes on with the rest" if output is not None else " written"
        env.errors().print(
            f"rinna: interrupted: {done} of {len(items)} rows{where}", markup=False, highlight=False, soft_wrap=True
        )
    return result.exit_code
