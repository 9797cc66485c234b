"""The commands in-process: ``cli.run`` with in-memory streams and a scripted engine (no weights, no fork)."""

from __future__ import annotations

import json
import re

import pytest

from rinna_cli import store
from rinna_cli.contract import Sampling
from rinna_cli.prompt import SYSTEM, USER
from rinna_cli.session import Conversation
from tests.fixtures.memorized_data import CONVERSATIONS

STATS = re.compile(r"^(\d+) tokens, prompt (\d+) \((\d+) prefilled\), first token \d+\.\d\d s, \d+\.\d tokens/s\n$")
QUESTION, ANSWER = CONVERSATIONS[0][0]


@pytest.fixture
def model(memorized_model) -> str:
    return str(memorized_model)


def prompt_of(tokenizer, *texts: str) -> list[int]:
    conversation = Conversation(tokenizer)
    conversation.add_user("\n\n".join(texts))
    return conversation.prompt_ids()


def test_ask_streams_the_reply_and_passes_the_options(run_cli, scripted_engine, model):
    scripted_engine.enqueue(ANSWER)
    ran = run_cli("ask", "-m", model, "-t", "0", "-n", "32", "--seed", "3", QUESTION, engine=scripted_engine)
    assert (ran.code, ran.stdout, ran.stderr) == (0, f"{ANSWER}\n", "")
    assert scripted_engine.prompts == [prompt_of(scripted_engine.tokenizer, QUESTION)]
    assert scripted_engine.samplings == [
        Sampling(temperature=0.0, top_p=1.0, top_k=50, repetition_penalty=1.0, max_new_tokens=32, seed=3)
    ]


def test_ask_reads_the_material_from_stdin(run_cli, scripted_engine, model):
    ran = run_cli("ask", "-m", model, "要約して", stdin="吾輩は猫である。\n".encode(), engine=scripted_engine)
    assert ran.code == 0 and ran.stdout == "はい。\n"
    assert scripted_engine.prompts == [prompt_of(scripted_engine.tokenizer, "要約して", "吾輩は猫である。")]


def test_ask_json_and_stats(run_cli, scripted_engine, model):
    scripted_engine.enqueue(ANSWER)
    ran = run_cli("ask", "-m", model, "--json", "--stats", QUESTION, engine=scripted_engine)
    fields = json.loads(ran.stdout)
    ids = scripted_engine.tokenizer.encode(ANSWER.replace("\n", "<NL>"))
    assert fields == {
        "reply": ANSWER, "model": model, "prompt_tokens": len(scripted_engine.prompts[0]),
        "completion_tokens": len(ids) + 1, "finish_reason": "stop", "ttft_s": 0.01, "tokens_per_s": 123.4,
    }  # fmt: skip
    stats = STATS.match(ran.stderr)
    assert stats and int(stats.group(1)) == len(ids) + 1


def test_show_prompt_opens_no_engine(run_cli, model):
    def no_engine(*args):
        raise AssertionError("--show-prompt must not open the engine")

    ran = run_cli("ask", "-m", model, "--show-prompt", "猫", open_engine=no_engine)
    assert ran.code == 0 and ran.stdout == "ユーザー: 猫<NL>システム: \n" and re.fullmatch(r"\d+ tokens\n", ran.stderr)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-n", "2048"], "max_new_tokens = 2048 is out of range; allowed: 1 <= max_new_tokens <= 2047"),
        (["-t", "hot"], "Invalid value for '--temperature' / '-t': Input should be a valid number, unable to parse"),
        (["--top-p", "0"], "--top-p: top_p = 0.0 is out of range; allowed: 0.0 < top_p <= 1.0 (1 = off)"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(run_cli, scripted_engine, model, args, message):
    ran = run_cli("ask", "-m", model, *args, "猫", engine=scripted_engine)
    assert ran.code == 2 and ran.stdout == "" and ran.stderr.startswith("rinna: error: ")
    assert message in ran.stderr and ran.stderr.count("\n") == 1
    assert scripted_engine.prompts == []


def test_the_window_rule_speaks_once(run_cli, scripted_engine, model):
    long = "吾輩は猫である。" * 700
    ran = run_cli("ask", "-m", model, "-n", "1000", long, engine=scripted_engine)
    assert ran.code == 2 and scripted_engine.prompts == []
    assert re.fullmatch(
        r"rinna: error: the prompt is \d+ tokens; with max_new_tokens = 1000 at most 1048 fit in the model's "
        r"2048-token window\n",
        ran.stderr,
    )


def test_no_question_on_a_terminal_stdin(run_cli, scripted_engine, model):
    ran = run_cli("ask", "-m", model, engine=scripted_engine, stdin_isatty=True)
    assert ran.code == 2
    assert ran.stderr == "rinna: error: no question: pass it as an argument or on standard input\n"


def test_piped_chat_answers_each_line_and_logs_it(run_cli, scripted_engine, model, tmp_path, monkeypatch):
    monkeypatch.setenv("RINNA_CLI_HOME", str(tmp_path))
    (first_q, first_a), (second_q, second_a) = CONVERSATIONS[4]
    scripted_engine.enqueue(first_a, second_a)
    ran = run_cli("chat", "-m", model, stdin=f"{first_q}\n\n{second_q}\n".encode(), engine=scripted_engine)
    assert (ran.code, ran.stdout, ran.stderr) == (0, f"{first_a}\n{second_a}\n", "")
    (log,) = (tmp_path / "sessions").glob("*.jsonl")
    turns = store.replay_log(log).turns
    assert [(t.speaker, t.text) for t in turns] == [
        (USER, first_q),
        (SYSTEM, first_a),
        (USER, second_q),
        (SYSTEM, second_a),
    ]


def test_chat_resume_and_load_exclude_each_other(run_cli, scripted_engine, model, tmp_path):
    ran = run_cli("chat", "-m", model, "--resume", "--load", str(tmp_path / "x.json"), engine=scripted_engine)
    assert (ran.code, ran.stderr) == (2, "rinna: error: --resume and --load cannot be used together\n")


def test_tokenize_counts_in_process(run_cli, model):
    ran = run_cli("tokenize", "-m", model, "--count", stdin="猫\n".encode())
    assert ran.code == 0 and ran.stdout.strip().isdigit() and ran.stderr == ""


def test_warnings_have_one_printer(run_cli, scripted_engine, model, tmp_path, monkeypatch):
    monkeypatch.setenv("RINNA_CLI_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text("temprature = 0.5\n", encoding="utf-8")
    ran = run_cli("ask", "-m", model, "猫", engine=scripted_engine)
    assert ran.code == 0
    assert ran.stderr == (
        f"rinna: warning: {tmp_path / 'config.toml'}: unknown key 'temprature' ignored (did you mean 'temperature'?)\n"
    )


# --- issue 14: the first hour of a new user ----------------------------------------------------------


def test_ctrl_c_during_ask_json_prints_the_partial_object(run_cli, scripted_engine, model):
    """A real SIGINT after the first of three steps: the object still comes, finish_reason "interrupted", exit 130."""
    scripted_engine.enqueue("一二三四五六")
    scripted_engine.interrupt_at = 1
    ran = run_cli("ask", "-m", model, "--json", QUESTION, engine=scripted_engine)
    assert ran.code == 130 and ran.stderr == ""
    fields = json.loads(ran.stdout)
    assert ran.stdout.count("\n") == 1
    assert (fields["reply"], fields["finish_reason"]) == ("一二", "interrupted")
    assert fields["completion_tokens"] == len(scripted_engine.tokenizer.encode("一二"))


def test_show_prompt_json(run_cli, model, memorized_tokenizer):
    ran = run_cli("ask", "-m", model, "--show-prompt", "--json", "-n", "100", "猫", open_engine=None)
    ids = prompt_of(memorized_tokenizer, "猫")
    assert (ran.code, ran.stderr) == (0, "")
    assert json.loads(ran.stdout) == {
        "prompt": "ユーザー: 猫<NL>システム: ", "ids": ids, "prompt_tokens": len(ids), "window": 2048,
        "max_new_tokens": 100, "fits": True,
    }  # fmt: skip


def test_show_prompt_says_when_the_prompt_cannot_fit(run_cli, model, memorized_tokenizer):
    long = "吾輩は猫である。" * 700
    size = len(prompt_of(memorized_tokenizer, long))
    ran = run_cli("ask", "-m", model, "--show-prompt", long)
    assert ran.code == 0 and ran.stdout.startswith("ユーザー: 吾輩は猫である。")
    assert ran.stderr == (
        f"{size} tokens\nrinna: warning: the prompt is {size} tokens; with max_new_tokens = 128 at most 1920 fit "
        "in the model's 2048-token window: rinna ask would refuse it\n"
    )
    as_json = json.loads(run_cli("ask", "-m", model, "--show-prompt", "--json", long).stdout)
    assert (as_json["prompt_tokens"], as_json["fits"]) == (size, False)


@pytest.mark.parametrize(
    ("args", "stdout"),
    [(["--count", "--json"], '{"count": 2}\n'), (["--json", "--count"], '{"count": 2}\n'), (["--count"], "2\n")],
)
def test_tokenize_count_honours_json(run_cli, model, memorized_tokenizer, args, stdout):
    assert len(memorized_tokenizer.encode("吾輩は猫である")) == 2
    ran = run_cli("tokenize", "-m", model, *args, "吾輩は猫である")
    assert (ran.code, ran.stdout, ran.stderr) == (0, stdout, "")


def test_a_file_as_the_model_is_called_a_file(run_cli, scripted_engine, tmp_path):
    path = tmp_path / "passwd"
    path.write_text("root:x:0:0\n", encoding="utf-8")
    ran = run_cli("ask", "-m", str(path), "猫", engine=scripted_engine)
    assert (ran.code, ran.stdout) == (1, "")
    assert ran.stderr == (
        f"rinna: error: {path}: a file, not a model folder (--model takes a folder holding config.json, "
        "spiece.model and the weights, a hub id or an alias)\n"
    )


def test_a_missing_model_folder_is_named_as_given(run_cli, scripted_engine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = run_cli("ask", "-m", "./nonexist", "猫", engine=scripted_engine)
    assert (ran.code, ran.stdout, ran.stderr) == (1, "", "rinna: error: ./nonexist: no such model folder\n")


def test_a_utf8_byte_order_mark_on_stdin_is_dropped(run_cli, scripted_engine, model):
    ran = run_cli("ask", "-m", model, stdin=b"\xef\xbb\xbf" + "猫\n".encode(), engine=scripted_engine)
    assert ran.code == 0 and scripted_engine.prompts == [prompt_of(scripted_engine.tokenizer, "猫")]
    shown = run_cli("tokenize", "-m", model, "--json", stdin=b"\xef\xbb\xbf" + "猫\n".encode())
    assert json.loads(shown.stdout)["text"] == "猫"


@pytest.mark.parametrize("encoding, name", [("utf-16", "UTF-16"), ("utf-16-be", None), ("utf-32", "UTF-32")])
def test_utf16_on_stdin_is_named(run_cli, scripted_engine, model, encoding, name):
    data = "猫です\n".encode(encoding)
    if name is None:  # big-endian with its mark
        data, name = b"\xfe\xff" + data, "UTF-16"
    for command in (["ask", "-m", model], ["tokenize", "-m", model]):
        ran = run_cli(*command, stdin=data, engine=scripted_engine)
        assert (ran.code, ran.stdout) == (2, "")
        assert ran.stderr == (
            f"rinna: error: standard input is {name}, not UTF-8; convert it first, e.g. `iconv -f {name} -t UTF-8`\n"
        )
    assert scripted_engine.prompts == []


def test_shift_jis_on_stdin_keeps_the_shift_jis_hint(run_cli, model):
    ran = run_cli("ask", "-m", model, stdin="猫です".encode("shift_jis"))
    assert ran.stderr == (
        "rinna: error: standard input is not UTF-8 (byte 0x94 at offset 0); "
        "convert it first, e.g. `iconv -f SHIFT_JIS -t UTF-8`\n"
    )


@pytest.mark.parametrize(("args", "instruction"), [((), ""), (("要約して",), "要約して\n\n")])
def test_an_overlong_stdin_says_how_many_tokens_fit(run_cli, scripted_engine, model, args, instruction):
    tokenizer = scripted_engine.tokenizer
    room = 2048 - 100 - len(prompt_of(tokenizer, instruction))
    limit = 2048 * tokenizer.max_piece_bytes
    ran = run_cli("ask", "-m", model, "-n", "100", *args, stdin=b"a" * (limit + 1), engine=scripted_engine)
    assert (ran.code, ran.stdout) == (2, "")
    assert ran.stderr == (
        f"rinna: error: standard input is over {limit:,} bytes, more than the model's 2048-token window holds; "
        f"with max_new_tokens = 100 at most {room:,} tokens of it fit: pass a shorter text\n"
    )
    assert scripted_engine.prompts == []


def test_an_argument_that_is_not_utf8_is_refused_by_name(run_cli, scripted_engine, model):
    """In-process, argv as Python decodes it (surrogateescape); the real process: test_command_line."""
    ran = run_cli("ask", "-m", model, "-t", "0", "abc\udc80", engine=scripted_engine)
    assert (ran.code, ran.stdout) == (2, "")
    assert ran.stderr == (
        "rinna: error: the question argument is not UTF-8 (byte 0x80 at offset 3 of 'abc\\x80'); "
        "convert it first, e.g. `iconv -f SHIFT_JIS -t UTF-8`\n"
    )
    from_env = run_cli("tokenize", "猫", environ={"RINNA_MODEL": "/tmp/\udcff"})
    assert (from_env.code, from_env.stderr) == (
        2,
        "rinna: error: RINNA_MODEL is not UTF-8 (byte 0xff at offset 5 of '/tmp/\\xff'); "
        "convert it first, e.g. `iconv -f SHIFT_JIS -t UTF-8`\n",
    )
    assert scripted_engine.prompts == []


def test_an_error_holding_bytes_that_are_not_utf8_is_printed_escaped(run_cli):
    ran = run_cli("tokenize", "--bogus-\udc80", "猫")
    assert (ran.code, ran.stderr) == (2, "rinna: error: No such option: --bogus-\\x80 (see 'rinna tokenize --help')\n")


def test_defaults_shown_in_help_do_not_override_the_config(run_cli, scripted_engine, model):
    """The options' defaults are the shipped values now; only what is on the command line beats the environment."""
    environ = {"RINNA_TEMPERATURE": "0.3", "RINNA_MAX_NEW_TOKENS": "64"}
    run_cli("ask", "-m", model, "猫", engine=scripted_engine, environ=environ)
    run_cli("ask", "-m", model, "-t", "0.7", "-n", "128", "猫", engine=scripted_engine, environ=environ)
    assert [(s.temperature, s.max_new_tokens) for s in scripted_engine.samplings] == [(0.3, 64), (0.7, 128)]
