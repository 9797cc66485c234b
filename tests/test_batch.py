"""``rinna batch``'s job: lines in, JSON rows out in order, bad lines as error rows, resumable, Ctrl-C safe."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from rinna_cli import batch, config
from rinna_cli.contract import Sampling
from rinna_cli.environment import Environment
from rinna_cli.session import Conversation
from rinna_cli.tokenizer import Tokenizer
from tests import prewarmed
from tests.fixtures.memorized_data import CONVERSATIONS, NAME_Q
from tests.helpers import RINNA, process_env

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = Sampling(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=64, seed=0)
((SIGHT_Q, SIGHT_A),) = CONVERSATIONS[0]
((MOUNT_Q, MOUNT_A),) = CONVERSATIONS[1]
(TARO_1, TARO_R), (_, TARO_A) = CONVERSATIONS[4]


@pytest.fixture(scope="module")
def tokenizer(memorized_model) -> Tokenizer:
    return Tokenizer.from_folder(memorized_model)


def _ids(tokenizer: Tokenizer, *turns: tuple[str, str]) -> list[int]:
    conversation = Conversation(tokenizer)
    for speaker, text in turns:
        conversation.add_user(text) if speaker == "user" else conversation.add_reply(text)
    return conversation.prompt_ids()


def _line(**fields) -> str:
    return json.dumps(fields, ensure_ascii=False)


def test_a_plain_line_is_the_prompt_of_ask(tokenizer):
    item = batch.parse_line(f"  {SIGHT_Q}  ", 3, tokenizer, DEFAULTS, 2048)
    assert (item.line, item.id, item.error, item.sampling) == (3, 3, None, DEFAULTS)
    assert item.prompt_ids == _ids(tokenizer, ("user", SIGHT_Q))


def test_json_lines_give_id_prompt_history_and_options(tokenizer):
    item = batch.parse_line(_line(id="q1", prompt=MOUNT_Q, temperature=0.5, seed=9), 1, tokenizer, DEFAULTS, 2048)
    assert (item.id, item.prompt_ids) == ("q1", _ids(tokenizer, ("user", MOUNT_Q)))
    assert (item.sampling.temperature, item.sampling.seed, item.sampling.max_new_tokens) == (0.5, 9, 64)
    messages = [
        {"role": "user", "content": TARO_1},
        {"role": "assistant", "content": TARO_R},
        {"role": "user", "content": NAME_Q},
    ]
    item = batch.parse_line(_line(id=7, messages=messages), 2, tokenizer, DEFAULTS, 2048)
    assert (item.id, item.error) == (7, None)
    assert item.prompt_ids == _ids(tokenizer, ("user", TARO_1), ("assistant", TARO_R), ("user", NAME_Q))
    assert batch.parse_line('"{not json"', 4, tokenizer, DEFAULTS, 2048).prompt_ids == _ids(
        tokenizer, ("user", '"{not json"')
    )


@pytest.mark.parametrize(
    "text, error",
    [
        ('{"id": 1, "prompt": "x"', "invalid JSON (Expecting ',' delimiter: line 1 column 24 (char 23))"),
        ("", "empty prompt"),
        ("   ", "empty prompt"),
        (_line(prompt="  "), "empty prompt"),
        (_line(prompt=1), "prompt must be a string"),
        (_line(id=1.5, prompt="x"), "id must be a string or an integer"),
        (_line(prompt="x", messages=[]), "give either prompt or messages"),
        (_line(id="a"), "give either prompt or messages"),
        (
            _line(prompt="x", temprature=1),
            "unknown field 'temprature' (did you mean 'temperature'?); known: id, max_new_tokens, messages, prompt, "
            "repetition_penalty, seed, temperature, top_k, top_p",
        ),
        (_line(prompt="x", max_tokens=8), "unknown field 'max_tokens' (did you mean 'max_new_tokens'?); known: "),
        (_line(prompt="x", meta={"a": 1}), "unknown field 'meta'; known: "),
        (
            _line(prompt="x", temperature=9),
            "temperature = 9 is out of range; allowed: 0.0 <= temperature <= 5.0 (0 = greedy)",
        ),
        (
            _line(messages=[{"role": "system", "content": "x"}]),
            "message 1: role must be user or assistant, not 'system' (rinna has no system turn)",
        ),
        (
            _line(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]),
            "the last message must be the user's",
        ),
        (_line(messages="hi"), "messages must be a non-empty array of {role, content} objects"),
        (_line(prompt="猫" * 3000), "the prompt is"),
    ],
)
def test_bad_lines_become_errors(tokenizer, text, error):
    item = batch.parse_line(text, 5, tokenizer, DEFAULTS, 2048)
    assert item.prompt_ids is None and item.error.startswith(error), item.error


def test_blank_lines_are_no_prompts_and_no_failures(tokenizer):
    """An editor's last blank line made a row {"error": "empty prompt"} and exit 1; piped chat skips them too."""
    items = batch.read_items(f"{SIGHT_Q}\n\n  \r\n{MOUNT_Q}\n\n".encode(), tokenizer, DEFAULTS, 2048)
    assert [(i.line, i.id, i.error) for i in items] == [(1, 1, None), (4, 4, None)]


def test_read_items_numbers_lines_and_refuses_repeats(tokenizer):
    data = f"{SIGHT_Q}\r\n{_line(id='m', prompt=MOUNT_Q)}\n".encode() + b"\xff\n"
    data += f"{_line(id='m', prompt='x')}\n{MOUNT_Q}\n".encode()
    items = batch.read_items(data, tokenizer, DEFAULTS, 2048)
    assert [(i.line, i.id, i.error) for i in items] == [
        (1, 1, None),
        (2, "m", None),
        (3, 3, "not UTF-8 (byte 0xff at offset 0)"),
        (4, "m", 'duplicate id "m" (first on line 2)'),
        (5, 5, None),
    ]
    assert items[0].prompt_ids == _ids(tokenizer, ("user", SIGHT_Q))


INPUT = (
    "\n".join(
        [
            SIGHT_Q,
            _line(id="mount", prompt=MOUNT_Q),
            _line(
                id="taro",
                messages=[
                    {"role": "user", "content": TARO_1},
                    {"role": "assistant", "content": TARO_R},
                    {"role": "user", "content": NAME_Q},
                ],
            ),
            '{"id": "broken"',
            "",
            _line(id="short", prompt=MOUNT_Q, max_new_tokens=3),
        ]
    )
    + "\n"
)
EXPECTED = [
    {"id": 1, "reply": SIGHT_A, "finish_reason": "stop", "prompt_tokens": 23, "completion_tokens": 31},
    {"id": "mount", "reply": MOUNT_A, "finish_reason": "stop", "prompt_tokens": 9, "completion_tokens": 21},
    {"id": "taro", "reply": TARO_A, "finish_reason": "stop", "prompt_tokens": 38, "completion_tokens": 8},
    {"id": 4, "line": 4, "error": "invalid JSON (Expecting ',' delimiter: line 1 column 16 (char 15))"},
    {"id": "short", "reply": MOUNT_A[:3], "finish_reason": "length", "prompt_tokens": 9, "completion_tokens": 3},
]


def _settings(model: Path, **flags) -> config.Settings:
    return config.load({"model": str(model), "temperature": 0.0, "max_new_tokens": 64, **flags}, environ={})


def _env(stdin: bytes = b"") -> Environment:
    return Environment(
        stdin=io.TextIOWrapper(io.BytesIO(stdin)), stdout=io.StringIO(), stderr=io.StringIO(),
        stdin_isatty=False, stdout_isatty=False, stderr_isatty=False,
    )  # fmt: skip


def _rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def _file_rows(path: Path) -> list[dict]:
    """OUT's rows without what each reply was made from (16 hex digits on every reply row written now)."""
    rows = _rows(path.read_text(encoding="utf-8"))
    for row in rows:
        made = row.pop("input", None)
        assert made is None or re.fullmatch("[0-9a-f]{16}", made), made
    return rows


def test_standard_output_gets_rows_in_input_order_and_exit_1(memorized_model):
    env = _env(INPUT.encode())
    assert batch.batch(env, _settings(memorized_model), "-", None, parallel=3) == 1
    assert _rows(env.stdout.getvalue()) == EXPECTED
    assert (
        env.stderr.getvalue() == "rinna: warning: 1 of 5 lines failed (their rows hold the error)\n"
    )  # no progress on a pipe


class Counting:
    """An engine that counts and delegates (to see which lines a resumed job runs)."""

    def __init__(self, engine):
        self.engine, self.prompts = engine, []
        self.name, self.window, self.tokenizer = engine.name, engine.window, engine.tokenizer

    def generate(self, prompt_ids, sampling, on_step=lambda step: None, stop=None):
        self.prompts.append(prompt_ids)
        return self.engine.generate(prompt_ids, sampling, on_step, stop)


def test_rerun_with_the_same_out_resumes(memorized_model, tmp_path, monkeypatch, tokenizer):
    """Ids already in OUT are skipped, error rows retried, a torn last line dropped; OUT ends in input order."""
    source = tmp_path / "in.jsonl"
    source.write_text(INPUT, encoding="utf-8")
    out = tmp_path / "out.jsonl"
    out.write_bytes(
        (
            json.dumps(EXPECTED[1], ensure_ascii=False) + "\n" + json.dumps(EXPECTED[3]) + "\n" + '{"id": 1, "rep'
        ).encode()
    )
    counted = []
    real = batch.batched
    monkeypatch.setattr(
        batch, "batched", lambda engine, parallel: counted.append(Counting(real(engine, parallel))) or counted[0]
    )
    env = _env()
    assert batch.batch(env, _settings(memorized_model), str(source), out, parallel=2) == 1
    assert _file_rows(out) == EXPECTED
    assert sorted(counted[0].prompts) == sorted(
        [_ids(tokenizer, ("user", SIGHT_Q)), _ids(tokenizer, ("user", TARO_1), ("assistant", TARO_R), ("user", NAME_Q)),
         _ids(tokenizer, ("user", MOUNT_Q))]
    )  # fmt: skip
    assert env.stdout.getvalue() == ""
    counted.clear()
    assert (
        batch.batch(_env(), _settings(memorized_model), str(source), out, parallel=2) == 1
    )  # only the bad lines again
    assert _file_rows(out) == EXPECTED and counted == []


def test_out_that_is_not_a_batch_file_is_refused(memorized_model, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("my notes\n")
    with pytest.raises(batch.UsageError, match=r"notes.txt: line 1 is not a row of rinna batch"):
        batch.batch(_env(SIGHT_Q.encode()), _settings(memorized_model), "-", out, parallel=1)
    assert out.read_text() == "my notes\n"


def test_parallel_and_input_are_checked(memorized_model):
    with pytest.raises(batch.UsageError, match=r"--parallel 0 is out of range; allowed: 1 <= parallel <= 64"):
        batch.batch(_env(), _settings(memorized_model), "-", None, parallel=0)
    env = _env()
    env.stdin_isatty = True
    with pytest.raises(batch.UsageError, match="no prompts: pass FILE, or pipe them in"):
        batch.batch(env, _settings(memorized_model), None, None, parallel=1)
    with pytest.raises(batch.UsageError, match="missing.txt: cannot read it"):
        batch.batch(_env(), _settings(memorized_model), "missing.txt", None, parallel=1)


def test_run_keeps_parallel_calls_in_flight(tokenizer):
    """``run`` has up to ``parallel`` generate calls in flight: what a batching engine or a server batches."""
    from rinna_cli.contract import Reply

    inside, peak, lock = [0], [0], threading.Lock()
    barrier = threading.Barrier(3, timeout=10)

    class Slow:
        def generate(self, prompt_ids, sampling, on_step=None, stop=None):
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            barrier.wait()  # only passes with 3 calls at once
            with lock:
                inside[0] -= 1
            return Reply("ok", [5], "length", len(prompt_ids), len(prompt_ids), 1, 0.0, 0.0)

    items = batch.read_items(("\n".join([SIGHT_Q] * 6) + "\n").encode(), tokenizer, DEFAULTS, 2048)
    out = batch.OutStream(io.StringIO())
    result = batch.run(items, Slow(), out, parallel=3)
    assert peak[0] == 3 and (result.written, result.failed, result.exit_code) == (6, 0, 0)
    assert [row["id"] for row in _rows(out.stream.getvalue())] == [1, 2, 3, 4, 5, 6]


def _job(source: Path, out: Path, model: Path, tokens: int) -> list[str]:
    """The real ``rinna batch`` (float32: no first-start quantizing in each process)."""
    return [*RINNA, "batch", str(source), "-o", str(out), "--model", str(model), "-t", "0", "-n", str(tokens),
            "--quantize", "none", "--parallel", "2"]  # fmt: skip


def _job_env(tmp_path: Path) -> dict:
    return process_env(tmp_path / "hf", tmp_path / "home", OMP_NUM_THREADS="1")


def _wait_for_rows(out: Path, count: int, process, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= count:
            return
        time.sleep(0.05)
    pytest.fail(f"{out} did not reach {count} rows")


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_an_interrupted_job_keeps_finished_rows_and_resumes(tiny_model, tmp_path, how, run_cli):
    """Ctrl-C (exit 130) or SIGKILL mid-run: OUT holds whole rows only; the rerun adds the rest, none twice."""
    source = tmp_path / "in.txt"
    source.write_text("".join(f"吾輩は猫である。{i}\n" for i in range(8)), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    command = _job(source, out, tiny_model, tokens=200)
    process = prewarmed.popen(command, env=_job_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_rows(out, 1, process)
    process.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == (130 if how == "ctrl-c" else -signal.SIGKILL), stderr
    kept = _rows(out.read_text(encoding="utf-8"))
    assert out.read_bytes().endswith(b"\n") and 1 <= len(kept) < 8
    if how == "ctrl-c":  # says how far it got and how to go on
        assert stderr.decode().endswith(
            f"rinna: interrupted: {len(kept)} of 8 rows in {out}; the same command again goes on with the rest\n"
        ), stderr
    assert all(row["finish_reason"] in ("stop", "length") for row in kept)
    rerun = run_cli(*command[len(RINNA) :], stdin=None)  # the same command again (in this process)
    assert (rerun.code, rerun.stdout, rerun.stderr) == (0, "", "")
    final = _rows(out.read_text(encoding="utf-8"))
    assert [row["id"] for row in final] == list(range(1, 9))
    assert [row for row in final if row["id"] in {r["id"] for r in kept}] == sorted(kept, key=lambda row: row["id"])


def test_progress_bar_on_a_terminal(memorized_model, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    source = tmp_path / "in.txt"
    source.write_text(f"{SIGHT_Q}\n{MOUNT_Q}\n{{\"id\"\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    command = _job(source, out, memorized_model, tokens=64)
    child = prewarmed.spawn(
        command[0], command[1:], env=_job_env(tmp_path), encoding="utf-8", timeout=120, dimensions=(24, 120)
    )
    child.expect(pexpect.EOF)
    child.close()
    shown = child.before
    assert child.exitstatus == 1
    assert "batch" in shown and "3/3" in shown and "tokens/s" in shown and "1 failed" in shown
    assert "rinna: warning: 1 of 3 lines failed" in shown
    assert [row.get("reply") for row in _rows(out.read_text(encoding="utf-8"))] == [SIGHT_A, MOUNT_A, None]


def test_rows_on_the_terminal_show_no_bar_among_them(memorized_model, tmp_path):
    """With stdout the terminal too, the bar's line was drawn into the rows (``batch ━━ 0/? …   {"id": 1, …``)."""
    pexpect = pytest.importorskip("pexpect")
    source = tmp_path / "in.txt"
    source.write_text(f"{SIGHT_Q}\n{MOUNT_Q}\n", encoding="utf-8")
    command = [arg for arg in _job(source, tmp_path / "unused.jsonl", memorized_model, tokens=64)]
    at = command.index("-o")
    del command[at : at + 2]  # rows to the terminal
    child = prewarmed.spawn(
        command[0], command[1:], env=_job_env(tmp_path), encoding="utf-8", timeout=120, dimensions=(24, 120)
    )
    child.expect(pexpect.EOF)
    child.close()
    shown = child.before.replace("\r\n", "\n")
    assert child.exitstatus == 0
    rows = [json.loads(line[line.index('{"id"') :]) for line in shown.splitlines() if '{"id"' in line]
    assert [row["reply"] for row in rows] == [SIGHT_A, MOUNT_A] and "tokens/s" not in shown  # the loading spinner ends


def test_rinna_batch_command(memorized_model, tmp_path, run_cli):
    """The command (in this process, int8 by default): FILE, -o OUT, --parallel, ask's options; exit 1 when a line failed."""
    source = tmp_path / "in.txt"
    source.write_text(INPUT, encoding="utf-8")
    out = tmp_path / "out.jsonl"
    done = run_cli("batch", str(source), "-o", str(out), "--parallel", "3", "--model", str(memorized_model), "-t", "0",
                   "-n", "64", stdin=None)  # fmt: skip
    assert (done.code, done.stdout) == (1, ""), done.stderr
    assert done.stderr == "rinna: warning: 1 of 5 lines failed (their rows hold the error)\n"
    assert _file_rows(out) == EXPECTED


def test_a_byte_order_mark_is_dropped_and_a_file_in_another_encoding_refused(memorized_model, tmp_path, run_cli):
    """Notepad and Excel start UTF-8 files with a mark: the first prompt is the question, not mark plus question. A
    file of Shift_JIS or UTF-16 lines is refused up front with iconv's hint, not answered line by line in error rows."""
    flags = ("--model", str(memorized_model), "-t", "0", "-n", "64")
    marked = "\ufeff" + _line(id="a", prompt=MOUNT_Q) + "\r\n" + MOUNT_Q + "\n"
    done = run_cli("batch", *flags, stdin=marked.encode())
    assert done.code == 0, done.stderr
    assert [(row["id"], row["reply"]) for row in _rows(done.stdout)] == [("a", MOUNT_A), (2, MOUNT_A)]
    source = tmp_path / "sjis.txt"
    source.write_bytes(f"{MOUNT_Q}\n{SIGHT_Q}\nok\n".encode("shift_jis"))
    done = run_cli("batch", str(source), *flags, stdin=None)
    assert (done.code, done.stdout) == (2, "")
    assert done.stderr.startswith(f"rinna: error: {source} is not UTF-8 (byte 0x90 at offset 0);")
    assert "iconv -f SHIFT_JIS -t UTF-8" in done.stderr
    source.write_bytes(f"{MOUNT_Q}\n".encode("utf-16"))
    done = run_cli("batch", str(source), *flags, stdin=None)
    assert (done.code, done.stderr) == (2, f"rinna: error: {source} is UTF-16, not UTF-8; convert it first, e.g. "
                                           "`iconv -f UTF-16 -t UTF-8`\n")  # fmt: skip


def test_a_rerun_with_other_prompts_or_options_under_the_same_ids_makes_those_rows_again(memorized_model, tmp_path,
                                                                                        run_cli):  # fmt: skip
    """Resuming into the same OUT kept the reply to line 1 of another file (or of a run with -n 3) as line 1's."""
    source, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    flags = ("-o", str(out), "--model", str(memorized_model), "-t", "0", "-n", "64")
    source.write_text(f"{MOUNT_Q}\n{SIGHT_Q}\n", encoding="utf-8")
    assert run_cli("batch", str(source), *flags, stdin=None).code == 0
    first = _rows(out.read_text(encoding="utf-8"))
    assert [row["reply"] for row in first] == [MOUNT_A, SIGHT_A]
    source.write_text(f"{NAME_Q}\n{SIGHT_Q}\n", encoding="utf-8")  # line 1 another question
    done = run_cli("batch", str(source), *flags, stdin=None)
    assert done.code == 0 and done.stderr == (
        f"rinna: warning: 1 row of {out} was made from another prompt or other options: made again now\n"
    )
    again = _rows(out.read_text(encoding="utf-8"))
    assert [row["id"] for row in again] == [1, 2] and again[1] == first[1]  # line 2 kept as it was
    assert again[0]["reply"] != MOUNT_A and again[0]["input"] != first[0]["input"]
    done = run_cli("batch", str(source), *flags[:-1], "3", stdin=None)  # -n 3: both made again
    assert done.stderr == f"rinna: warning: 2 rows of {out} were made from another prompt or other options: made again now\n" and all(
        row["completion_tokens"] == 3 for row in _rows(out.read_text(encoding="utf-8"))
    )
    done = run_cli("batch", str(source), *flags[:-1], "3", stdin=None)  # the same again: nothing made
    assert (done.code, done.stderr) == (0, "")
