"""Conversations on disk: transcripts (/save, --load) and the autosaved session log."""

from __future__ import annotations

import errno
import json
import os
import time

import pytest

from rinna_cli import store
from rinna_cli.errors import RinnaError
from rinna_cli.prompt import SYSTEM, USER
from rinna_cli.session import Turn
from rinna_cli.store import (
    TRANSCRIPT_FORMAT,
    Loaded,
    SessionLog,
    find_session,
    load_transcript,
    replay_log,
    save_transcript,
    sessions,
)

SETTINGS = {"temperature": 0.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0, "max_new_tokens": 128, "seed": -1}

TURNS = [
    Turn(USER, "日本のおすすめの観光地を教えてください。", [1, 2], time=1000.5),
    Turn(SYSTEM, "京都の清水寺がおすすめです。\n北海道の札幌も人気があります。", [3, 4], time=1001.25),
    Turn(USER, "一行目\n二行目\r\n  三行目  ", [5], time=1002.0),
    Turn(SYSTEM, "途中で止め", [6], time=1003.0, interrupted=True),
]


def as_tuples(turns):
    return [(t.speaker, t.text, t.interrupted) for t in turns]


def loaded_tuples(loaded: Loaded):
    return [(t.speaker, t.text, t.interrupted) for t in loaded.turns]


class Warnings(list):
    def __call__(self, message: str) -> None:
        self.append(message)


# -- transcripts --------------------------------------------------------------------------------


def test_transcript_round_trip(tmp_path):
    path = save_transcript(tmp_path / "会話.json", TURNS, "rinna/japanese-gpt-neox-3.6b-instruction-ppo", SETTINGS)
    assert path == tmp_path / "会話.json"
    loaded = load_transcript(path)
    assert loaded_tuples(loaded) == as_tuples(TURNS)
    assert loaded.model == "rinna/japanese-gpt-neox-3.6b-instruction-ppo"
    assert [t.time for t in loaded.turns] == [t.time for t in TURNS]
    # A transcript holds text, not ids: ids depend on the tokenizer and are recomputed.
    assert all(t.ids == [] for t in loaded.turns)


def test_transcript_is_readable_json_with_the_japanese_unescaped(tmp_path):
    path = save_transcript(tmp_path / "t.json", TURNS, "m", SETTINGS)
    text = path.read_text(encoding="utf-8")
    assert "清水寺" in text  # not \\u escapes
    document = json.loads(text)
    assert document["format"] == TRANSCRIPT_FORMAT
    assert document["version"] == 1
    assert document["settings"] == SETTINGS
    assert [t["speaker"] for t in document["turns"]] == [USER, SYSTEM, USER, SYSTEM]
    assert document["turns"][3]["interrupted"] is True


def test_empty_transcript_round_trip(tmp_path):
    loaded = load_transcript(save_transcript(tmp_path / "empty.json", [], "m", SETTINGS))
    assert loaded.turns == []


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("old", encoding="utf-8")
    save_transcript(path, TURNS, "m", SETTINGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]
    assert loaded_tuples(load_transcript(path)) == as_tuples(TURNS)


def test_failed_save_keeps_the_old_file_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    save_transcript(path, TURNS[:2], "m", SETTINGS)
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "replace", full_disk)
    with pytest.raises(RinnaError, match="No space left on device") as caught:
        save_transcript(path, TURNS, "m", SETTINGS)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


def test_save_into_a_missing_folder_is_an_error_naming_the_path(tmp_path):
    target = tmp_path / "missing" / "t.json"
    with pytest.raises(RinnaError) as caught:
        save_transcript(target, TURNS, "m", SETTINGS)
    assert str(target) in str(caught.value) and "cannot save" in str(caught.value)


def test_save_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = save_transcript(store.Path("~/t.json"), TURNS, "m", SETTINGS)
    assert path == tmp_path / "t.json" and path.is_file()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ('{"foo": 1}', "not a rinna-cli transcript"),
        ("[1, 2, 3]", "not a rinna-cli transcript"),
        ('"just a string"', "not a rinna-cli transcript"),
        ('{"format": "something-else", "turns": []}', "not a rinna-cli transcript"),
        (json.dumps({"format": TRANSCRIPT_FORMAT, "turns": {"a": 1}}), '"turns" must be a list'),
        (json.dumps({"format": TRANSCRIPT_FORMAT}), '"turns" must be a list'),
        (json.dumps({"format": TRANSCRIPT_FORMAT, "turns": ["hello"]}), "turn 1: not an object"),
        (json.dumps({"format": TRANSCRIPT_FORMAT, "turns": [{"speaker": "AI", "text": "x"}]}), "turn 1: speaker"),
        (
            json.dumps({"format": TRANSCRIPT_FORMAT, "turns": [{"speaker": USER, "text": "a"}, {"speaker": SYSTEM}]}),
            "turn 2: text must be a string",
        ),
        (json.dumps({"format": TRANSCRIPT_FORMAT, "turns": [{"speaker": USER, "text": 5}]}), "turn 1: text"),
        ('{"format": "%s", "turns": [{"speaker": "%s", "text": "a\\ud800b"}]}' % (TRANSCRIPT_FORMAT, USER), "not valid Unicode"),
    ],
)
def test_load_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RinnaError) as caught:
        load_transcript(path)
    assert str(path) in str(caught.value)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value).strip()


def test_load_of_a_missing_file_or_folder_or_binary(tmp_path):
    with pytest.raises(RinnaError, match="no such file"):
        load_transcript(tmp_path / "nope.json")
    with pytest.raises(RinnaError, match="cannot read"):
        load_transcript(tmp_path)
    binary = tmp_path / "b.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RinnaError, match="cannot read") as caught:
        load_transcript(binary)
    assert str(binary) in str(caught.value)


def test_load_checks_flags_and_model_types(tmp_path):
    path = tmp_path / "t.json"
    turns = [{"speaker": USER, "text": "a", "interrupted": "yes", "time": "noon"}, {"speaker": SYSTEM, "text": "b"}]
    path.write_text(json.dumps({"format": TRANSCRIPT_FORMAT, "model": ["x"], "turns": turns}), encoding="utf-8")
    before = time.time()
    loaded = load_transcript(path)
    assert [(t.speaker, t.text, t.ids, t.interrupted) for t in loaded.turns] == [(USER, "a", [], False), (SYSTEM, "b", [], False)]
    assert loaded.model is None
    assert all(before <= t.time <= time.time() for t in loaded.turns)  # no valid time in the file: the time it was read


# -- the session log ----------------------------------------------------------------------------


def make_log(tmp_path, warn=None) -> SessionLog:
    return SessionLog.create(tmp_path / "sessions", Warnings() if warn is None else warn, {"model": "m", "created": 1.0})


def log_records(log: SessionLog) -> list[dict]:
    return [json.loads(line) for line in log.path.read_text(encoding="utf-8").splitlines()]


def test_log_records_every_turn_with_settings_and_time(tmp_path):
    log = make_log(tmp_path)
    for turn in TURNS:
        log.turn(turn, SETTINGS)
    records = log_records(log)
    assert records[0]["type"] == "session" and records[0]["model"] == "m"
    turns = records[1:]
    assert [r["type"] for r in turns] == ["turn"] * 4
    assert [(r["speaker"], r["text"], r["interrupted"]) for r in turns] == as_tuples(TURNS)
    assert all(r["settings"] == SETTINGS for r in turns)
    assert [r["time"] for r in turns] == [t.time for t in TURNS]
    assert all(isinstance(r["at"], float) for r in records)
    assert [r["ids"] for r in turns] == [t.ids for t in TURNS]
    assert log.path.stat().st_mode & 0o777 == 0o600


def test_replay_applies_undo_and_reset(tmp_path):
    log = make_log(tmp_path)
    for turn in TURNS:
        log.turn(turn, SETTINGS)
    log.append({"type": "undo", "count": 2})
    loaded = replay_log(log.path)
    assert loaded_tuples(loaded) == as_tuples(TURNS[:2])
    assert [t.ids for t in loaded.turns] == [[1, 2], [3, 4]]
    assert loaded.model == "m"
    assert [t.time for t in loaded.turns] == [1000.5, 1001.25]
    log.append({"type": "reset"})
    log.turn(TURNS[2], SETTINGS)
    assert loaded_tuples(replay_log(log.path)) == as_tuples(TURNS[2:3])


@pytest.mark.parametrize("count", [-1, "2", None, True, 1.5, 99])
def test_replay_survives_odd_undo_counts(tmp_path, count):
    log = make_log(tmp_path)
    for turn in TURNS[:2]:
        log.turn(turn, SETTINGS)
    log.append({"type": "undo", "count": count})
    expected = [] if count == 99 else as_tuples(TURNS[:2])
    assert loaded_tuples(replay_log(log.path)) == expected


def test_replay_skips_a_torn_last_line(tmp_path):
    log = make_log(tmp_path)
    for turn in TURNS[:2]:
        log.turn(turn, SETTINGS)
    with open(log.path, "ab") as file:
        file.write('{"type": "turn", "speaker": "ユーザー", "text": "途'.encode()[:-1])  # cut mid-character
    assert loaded_tuples(replay_log(log.path)) == as_tuples(TURNS[:2])


def test_appending_after_a_torn_line_starts_a_new_line(tmp_path):
    # A resumed or reopened log whose last line was torn: the next record must not join it.
    log = make_log(tmp_path)
    log.turn(TURNS[0], SETTINGS)
    with open(log.path, "ab") as file:
        file.write(b'{"type": "turn", "spea')
    log.turn(TURNS[1], SETTINGS)
    assert loaded_tuples(replay_log(log.path)) == as_tuples(TURNS[:2])


def test_replay_refuses_a_file_that_is_not_a_session_log(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\nnot json\n', encoding="utf-8")
    with pytest.raises(RinnaError, match="not a rinna-cli session log") as caught:
        replay_log(path)
    assert str(path) in str(caught.value)
    with pytest.raises(RinnaError, match="not a rinna-cli session log"):
        load_transcript(path)


def test_replay_refuses_a_turn_with_a_bad_speaker(tmp_path):
    log = make_log(tmp_path)
    log.append({"type": "turn", "speaker": "bot", "text": "x"})
    with pytest.raises(RinnaError, match="speaker must be one of"):
        replay_log(log.path)


def test_load_transcript_reads_a_session_log_too(tmp_path):
    log = make_log(tmp_path)
    for turn in TURNS:
        log.turn(turn, SETTINGS)
    assert loaded_tuples(load_transcript(log.path)) == as_tuples(TURNS)
    copy = tmp_path / "copy.json"  # a session log under another suffix is recognised by its first record
    copy.write_bytes(log.path.read_bytes())
    assert loaded_tuples(load_transcript(copy)) == as_tuples(TURNS)


def test_two_logs_created_in_the_same_second_are_different_files(tmp_path, monkeypatch):
    monkeypatch.setattr(store.time, "strftime", lambda fmt: "20240101-000000")
    first, second, third = (make_log(tmp_path) for _ in range(3))
    assert len({first.path, second.path, third.path}) == 3
    for log in (first, second, third):
        assert not log.failed
        assert [r["type"] for r in log_records(log)] == ["session"]


def test_create_never_takes_an_existing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(store.time, "strftime", lambda fmt: "20240101-000000")
    monkeypatch.setattr(store.os, "getpid", lambda: 42)
    folder = tmp_path / "sessions"
    folder.mkdir()
    for n in range(1000):
        (folder / f"20240101-000000-42{f'-{n}' if n else ''}.jsonl").write_text("someone else's\n")
    warn = Warnings()
    log = make_log(tmp_path, warn)
    assert log.failed and len(warn) == 1
    assert all(p.read_text() == "someone else's\n" for p in folder.iterdir())


def test_unwritable_folder_warns_once_and_carries_on(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    warn = Warnings()
    log = SessionLog.create(blocker / "sessions", warn, {"model": "m"})
    for turn in TURNS:
        log.turn(turn, SETTINGS)
    assert len(warn) == 1
    assert "cannot autosave" in warn[0] and str(blocker / "sessions") in warn[0] and "/save" in warn[0]
    assert blocker.read_text() == "not a folder"


def test_full_disk_warns_once_and_keeps_earlier_lines(tmp_path, monkeypatch):
    warn = Warnings()
    log = make_log(tmp_path, warn)
    log.turn(TURNS[0], SETTINGS)
    before = log.path.read_bytes()

    def no_space(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "write", no_space)
    for turn in TURNS[1:]:
        log.turn(turn, SETTINGS)
    monkeypatch.undo()
    assert len(warn) == 1 and "No space left on device" in warn[0]
    assert log.path.read_bytes() == before
    assert loaded_tuples(replay_log(log.path)) == as_tuples(TURNS[:1])


def test_short_write_is_cut_back_to_whole_lines(tmp_path, monkeypatch):
    warn = Warnings()
    log = make_log(tmp_path, warn)
    log.turn(TURNS[0], SETTINGS)
    before = log.path.read_bytes()
    real_write = os.write

    def half_write(fd, data):
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr(store.os, "write", half_write)
    log.turn(TURNS[1], SETTINGS)
    monkeypatch.undo()
    assert len(warn) == 1 and "No space left" in warn[0]
    assert log.path.read_bytes() == before


def dated_log(tmp_path, age: float, *turns: Turn, interactive: bool | None = True) -> SessionLog:
    """A session log holding ``turns``, last written ``age`` seconds ago (no ``interactive`` key when None)."""
    header = {"model": "m", "created": 1.0} | ({} if interactive is None else {"interactive": interactive})
    log = SessionLog.create(tmp_path / "sessions", Warnings(), header)
    for turn in turns:
        log.turn(turn, SETTINGS)
    now = time.time()
    os.utime(log.path, (now - age, now - age))
    return log


def test_the_last_session_is_the_newest_interactive_one_with_a_turn(tmp_path):
    folder = tmp_path / "sessions"
    with pytest.raises(RinnaError, match="no saved chat session"):
        find_session(folder)
    dated_log(tmp_path, 30, TURNS[0])
    newer = dated_log(tmp_path, 20, TURNS[2], TURNS[3])
    dated_log(tmp_path, 10, TURNS[0], interactive=False)  # a piped run is never "the last session"
    dated_log(tmp_path, 0)  # a chat opened and closed without a message
    (folder / "notes.txt").write_text("ignored")
    (folder / "foreign.jsonl").write_text('{"event": "click"}\n')
    assert find_session(folder).path == newer.path
    assert find_session(folder, "").path == newer.path


def test_only_empty_or_piped_sessions_leave_nothing_to_resume(tmp_path):
    dated_log(tmp_path, 0)
    dated_log(tmp_path, 0, TURNS[0], interactive=False)
    with pytest.raises(RinnaError, match="no saved chat session"):
        find_session(tmp_path / "sessions")


def test_sessions_are_listed_newest_first_with_their_first_message(tmp_path):
    old = dated_log(tmp_path, 30, TURNS[0], TURNS[1], interactive=None)  # written before the flag: interactive
    piped = dated_log(tmp_path, 10, TURNS[2], interactive=False)
    reset = dated_log(tmp_path, 20, TURNS[0])
    reset.append({"type": "reset"})
    reset.turn(TURNS[2], SETTINGS)
    now = time.time()
    os.utime(reset.path, (now - 20, now - 20))
    dated_log(tmp_path, 0)
    listed = sessions(tmp_path / "sessions")
    assert [(i.path, i.turns, i.first, i.interactive) for i in listed] == [
        (piped.path, 1, TURNS[2].text, False),
        (reset.path, 1, TURNS[2].text, True),  # the conversation the log ends with
        (old.path, 2, TURNS[0].text, True),
    ]
    assert [i.id for i in listed] == [piped.path.stem, reset.path.stem, old.path.stem]
    assert listed[0].modified == pytest.approx(now - 10, abs=1)


def test_a_session_is_found_by_number_id_or_a_unique_prefix(tmp_path):
    folder = tmp_path / "sessions"
    old, new, newest = (dated_log(tmp_path, age, TURNS[0]).path for age in (30, 20, 10))
    old, new, newest = (path.rename(folder / name) for path, name in ((old, "20260101-a.jsonl"),
                        (new, "20260102-b.jsonl"), (newest, "20260102-c.jsonl")))  # fmt: skip
    now = time.time()
    for path, age in ((old, 30), (new, 20), (newest, 10)):
        os.utime(path, (now - age, now - age))
    assert find_session(folder, "1").path == newest  # the numbers of the list
    assert find_session(folder, "3").path == old
    assert find_session(folder, "20260102-b").path == new
    assert find_session(folder, "20260101").path == old  # a unique prefix
    with pytest.raises(RinnaError, match=r"no session number 4: 3 saved in .*rinna sessions"):
        find_session(folder, "4")
    with pytest.raises(RinnaError, match="no session number 0"):
        find_session(folder, "0")
    with pytest.raises(RinnaError, match="no session 'nope' in"):
        find_session(folder, "nope")
    with pytest.raises(RinnaError, match="'20260102' matches 2 sessions: 20260102-c, 20260102-b"):
        find_session(folder, "20260102")


def test_stored_settings_are_read_back(tmp_path):
    other = {**SETTINGS, "temperature": 0.3}
    path = save_transcript(tmp_path / "t.json", TURNS, "m", other)
    assert load_transcript(path).settings == other
    log = make_log(tmp_path)
    log.turn(TURNS[0], SETTINGS)
    log.turn(TURNS[1], other)  # a log's settings: those of its last turn
    assert replay_log(log.path).settings == other
    assert replay_log(make_log(tmp_path).path).settings == {}


def test_save_without_replace_never_overwrites(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("precious")
    with pytest.raises(FileExistsError):
        save_transcript(path, TURNS, "m", SETTINGS, replace=False)
    assert path.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]  # no temporary file left
    fresh = save_transcript(tmp_path / "new.json", TURNS, "m", SETTINGS, replace=False)
    assert loaded_tuples(load_transcript(fresh)) == as_tuples(TURNS)


def test_log_survives_text_with_a_lone_surrogate(tmp_path):
    warn = Warnings()
    log = make_log(tmp_path, warn)
    log.turn(Turn(USER, "caf\udce9", [1]), SETTINGS)
    log.turn(TURNS[1], SETTINGS)
    assert warn == [] and log.path.read_bytes().decode("utf-8")  # still UTF-8
    with pytest.raises(RinnaError, match="line 2: text is not valid Unicode"):
        replay_log(log.path)  # refused on the way back in, never handed to the tokenizer
