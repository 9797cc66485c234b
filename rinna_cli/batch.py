"""``rinna batch``: a file of prompts through the model, one JSON line out per line in.

Each input line is a prompt, or a JSON object ``{"id": …, "prompt": "…"}`` or
``{"id": …, "messages": [{"role": "user"|"assistant", "content": "…"}, …]}``
with optional sampling options (``temperature``, ``top_p``, ``top_k``,
``repetition_penalty``, ``max_new_tokens``, ``seed``). A line starting with
``{`` is read as JSON. Each output row is ``{"id", "reply", "finish_reason",
"prompt_tokens", "completion_tokens"}``, or ``{"id", "line", "error"}`` for a
line that cannot be run; the id is the given one or the line number.

Up to ``parallel`` prompts are generated at once (the engine batches them:
:class:`rinna_cli.batching.BatchingEngine` locally, the server behind
``--endpoint``). Written to ``-o OUT``, every finished row is appended at once
(one ``write`` of a whole line, so a kill loses only the replies in flight) and
the file is put in input order when the run completes; a rerun with the same
OUT skips the ids it already holds and retries its error rows. On standard
output rows come in input order as soon as all earlier ones are done.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Callable

from rinna_cli import config
from rinna_cli.contract import Engine, Reply, Sampling, check_fits
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
class Item:
    """One input line, ready to run (``prompt_ids``) or refused (``error``)."""

    line: int  # 1-based
    id: str | int
    prompt_ids: list[int] | None = None
    sampling: Sampling | None = None
    error: str | None = None


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


def _key(value: str | int) -> str:
    """An id as a dictionary key: 1 and "1" are different ids."""
    return json.dumps(value, ensure_ascii=False)


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
                raise UsageError(f"unknown field {unknown[0]!r}; known: {', '.join(sorted(FIELDS))}")
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


def read_items(data: bytes, tokenizer: Tokenizer, defaults: Sampling, window: int) -> list[Item]:
    """Every line of ``data`` as an item; a repeated id is an error on its later lines.

    Ids default to line numbers, so a given integer id can repeat another line's number.
    """
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    items, first_line = [], {}
    for number, raw in enumerate(lines, 1):
        try:
            text = raw.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as err:
            items.append(Item(number, number, error=f"not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})"))
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


def reply_row(item: Item, reply: Reply) -> dict:
    return {
        "id": item.id,
        "reply": reply.text,
        "finish_reason": reply.finish_reason,
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
    }


def error_row(item: Item, error: str) -> dict:
    return {"id": item.id, "line": item.line, "error": error}


def _encode(row: dict) -> bytes:
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


class OutFile:
    """``-o OUT``: the ids already done, rows appended whole, and input order restored at the end."""

    def __init__(self, path: Path):
        self.path = path
        self.done: set[str] = set()
        kept = self._read()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if kept is not None:  # error rows (retried now) or a torn last line: rewrite without them first
            self._replace(kept)

    def _read(self) -> list[bytes] | None:
        """The rows worth keeping, or None when all are; fills :attr:`done`."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise UsageError(f"-o {self.path}: cannot read it ({err.strerror or err})") from None
        rows = data.split(b"\n")
        torn = rows.pop() != b""  # a last line without its newline was cut by a kill
        kept, dropped = [], torn
        for number, raw in enumerate(rows, 1):
            try:
                row = json.loads(raw)
                key = _key(row["id"])
            except (ValueError, KeyError, TypeError):
                raise UsageError(
                    f"-o {self.path}: line {number} is not a row of rinna batch; pass another file to write to"
                ) from None
            if "error" in row or key in self.done:
                dropped = True
                continue
            self.done.add(key)
            kept.append(raw + b"\n")
        return kept if dropped else None

    def _replace(self, rows: list[bytes]) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_bytes(b"".join(rows))
            os.chmod(temporary, os.stat(self.path).st_mode & 0o777)
            os.replace(temporary, self.path)
        finally:
            temporary.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def write(self, row: dict) -> None:
        data = _encode(row)
        while data:  # one write for a line in practice; the loop only guards a short write
            data = data[os.write(self._fd, data) :]

    def finish(self, order: list[Item]) -> None:
        """Put the rows in input order (rows of ids not in this input last), atomically."""
        rows = [raw + b"\n" for raw in self.path.read_bytes().split(b"\n") if raw]
        line_of: dict[str, int] = {}
        for item in order:
            if item.error is None:
                line_of.setdefault(_key(item.id), item.line)

        def rank(raw: bytes) -> int:
            row = json.loads(raw)
            return row["line"] if "error" in row else line_of.get(_key(row["id"]), len(order) + 1)

        ranked = sorted(rows, key=rank)
        if ranked != rows:
            self._replace(ranked)

    def close(self) -> None:
        os.close(self._fd)


class OutStream:
    """Standard output: rows in input order, each as soon as every earlier one is written."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.done: set[str] = set()

    def write(self, row: dict) -> None:
        self.stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.stream.flush()

    def finish(self, order: list[Item]) -> None:
        pass

    def close(self) -> None:
        pass


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
    skipped = len(items) - len(todo)
    started = time.perf_counter()
    pending = queue.SimpleQueue()
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
    rows: dict[int, dict | None] = {index: error_row(item, item.error) for index, item in enumerate(todo) if item.error}
    in_order = isinstance(out, OutStream)
    next_index, written, failed, tokens, received = 0, 0, 0, 0, len(rows)

    def emit(row: dict) -> None:
        nonlocal written, failed
        out.write(row)
        written += 1
        failed += "error" in row

    def flush(final: bool = False) -> None:
        nonlocal next_index
        while next_index < len(todo) and (next_index in rows or final):
            row = rows.pop(next_index, None)
            if row is not None:
                emit(row)
            next_index += 1

    def report() -> None:
        on_progress(Progress(written, len(todo), failed, tokens, time.perf_counter() - started))

    try:
        if not in_order:
            for index in sorted(rows):
                emit(rows.pop(index))
        report()
        while any(worker.is_alive() for worker in workers) or not finished.empty():
            try:
                index, row, count = finished.get(timeout=0.1)
            except queue.Empty:
                continue
            received += 1
            tokens += count
            if in_order:
                rows[index] = row
                flush()
            elif row is not None:
                emit(row)
            report()
        flush(final=True)
        report()
        interrupted = stop.is_set() and written < len(todo)
        if not interrupted:
            out.finish(items)
    finally:
        stop.set()  # a KeyboardInterrupt (second Ctrl-C) stops the workers after their token
        out.close()
    return Result(written, skipped, failed, interrupted, tokens, time.perf_counter() - started)


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
    items = read_items(_read_source(env, source), tokenizer, defaults, window)
    out = OutFile(output) if output is not None else OutStream(env.stdout)
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
    if env.stderr_isatty:
        with _Bar(env, skipped) as bar, sigint_sets(stop):
            result = run(items, engine, out, parallel, bar, stop)
    else:
        with sigint_sets(stop):
            result = run(items, engine, out, parallel, stop=stop)
    if result.failed:
        env.warn(f"{result.failed} of {len(items)} lines failed (their rows hold the error)")
    return result.exit_code
