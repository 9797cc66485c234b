"""Settings: shipped defaults < user config < RINNA_* environment < flags, all checked by config.check."""

from __future__ import annotations

import dataclasses
import math

import pytest

from rinna_cli import config, hub
from rinna_cli.errors import UsageError

DEFAULT_MODEL = "rinna/japanese-gpt-neox-3.6b-instruction-sft"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty user config home; the process environment cannot leak RINNA_* values in."""
    monkeypatch.setenv("RINNA_CLI_HOME", str(tmp_path))
    return tmp_path


def write_config(home, text: str):
    path = home / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load(flags=None, environ=None):
    warnings: list[str] = []
    settings = config.load(flags or {}, environ or {}, warn=warnings.append)
    return settings, warnings


# ---- shipped defaults -------------------------------------------------------------


def test_shipped_defaults_follow_the_model_card(home):
    settings, warnings = load()
    assert warnings == []
    assert settings.model == DEFAULT_MODEL == hub.DEFAULT_MODEL
    assert settings.temperature == 0.7  # the card's generate(temperature=0.7)
    assert settings.max_new_tokens == 128  # the card's max_new_tokens=128
    assert settings.top_k == 50  # transformers' default; the card sets none
    assert settings.top_p == 1.0
    assert settings.repetition_penalty == 1.0
    assert settings.seed == -1
    assert (settings.device, settings.dtype) == ("auto", "auto")
    assert type(settings.top_k) is int and type(settings.max_new_tokens) is int and type(settings.temperature) is float


def test_sampling_holds_only_sampling_options(home):
    from rinna_cli.contract import Sampling

    settings, _ = load()
    assert settings.sampling() == Sampling(
        temperature=0.7, top_p=1.0, top_k=50, repetition_penalty=1.0, max_new_tokens=128, seed=-1
    )
    assert type(settings.sampling().top_k) is int and type(settings.sampling().temperature) is float


def test_user_config_path_follows_rinna_cli_home(home):
    assert config.app_dir() == home
    assert config.user_config_path() == home / "config.toml"


# ---- precedence -------------------------------------------------------------------


def test_precedence_flag_over_env_over_user_config_over_defaults(home):
    write_config(home, "temperature = 0.1\ntop_k = 10\nmax_new_tokens = 64\nmodel = \"sft-v2\"\n")
    environ = {"RINNA_TEMPERATURE": "0.2", "RINNA_TOP_K": "20"}
    settings, _ = load({"temperature": 0.3, "top_k": None, "top_p": None}, environ)
    assert settings.temperature == 0.3  # flag
    assert settings.top_k == 20  # env beats user config; a None flag means "not given"
    assert settings.max_new_tokens == 64  # user config beats defaults
    assert settings.model == "sft-v2"
    assert settings.top_p == 1.0  # default


@pytest.mark.parametrize(
    "layers, expected",
    [
        ({}, 0.7),
        ({"file": 0.1}, 0.1),
        ({"file": 0.1, "env": "0.2"}, 0.2),
        ({"env": "0.2"}, 0.2),
        ({"file": 0.1, "env": "0.2", "flag": 0.3}, 0.3),
        ({"file": 0.1, "flag": 0.3}, 0.3),
        ({"flag": 0.0}, 0.0),  # a falsy flag is still given
        ({"file": 0.1, "env": ""}, 0.1),  # an empty variable is unset
    ],
)
def test_each_layer(home, layers, expected):
    if "file" in layers:
        write_config(home, f"temperature = {layers['file']}\n")
    environ = {"RINNA_TEMPERATURE": layers["env"]} if "env" in layers else {}
    flags = {"temperature": layers["flag"]} if "flag" in layers else {}
    settings, _ = load(flags, environ)
    assert settings.temperature == expected


def test_every_key_has_an_environment_variable(home):
    environ = {
        "RINNA_MODEL": "ppo",
        "RINNA_DEVICE": "cpu",
        "RINNA_DTYPE": "bfloat16",
        "RINNA_QUANTIZE": "none",
        "RINNA_TEMPERATURE": "1.5",
        "RINNA_TOP_P": "0.9",
        "RINNA_TOP_K": "0",
        "RINNA_REPETITION_PENALTY": "1.1",
        "RINNA_MAX_NEW_TOKENS": "256",
        "RINNA_SEED": "42",
        "RINNA_ENDPOINT": "http://gpu-box:8000/v1",
        "RINNA_API_KEY_ENV": "GPU_BOX_KEY",
        "RINNA_SYSTEM_MESSAGES": "merge",
    }
    settings, _ = load(environ=environ)
    assert dataclasses.asdict(settings) == {
        "model": "ppo",
        "device": "cpu",
        "dtype": "bfloat16",
        "quantize": "none",
        "temperature": 1.5,
        "top_p": 0.9,
        "top_k": 0,
        "repetition_penalty": 1.1,
        "max_new_tokens": 256,
        "seed": 42,
        "endpoint": "http://gpu-box:8000/v1",
        "api_key_env": "GPU_BOX_KEY",
        "system_messages": "merge",
    }


def test_process_environment_is_used_by_default(home, monkeypatch):
    monkeypatch.setenv("RINNA_MAX_NEW_TOKENS", "7")
    assert config.load({}, warn=lambda m: None).max_new_tokens == 7


# ---- invalid values name the key and the place ----------------------------------------


def test_toml_syntax_error_names_the_file(home):
    path = write_config(home, "temperature = = 0.5\n")
    with pytest.raises(UsageError) as err:
        load()
    assert str(path) in str(err.value)
    assert "TOML" in str(err.value)
    assert err.value.exit_code == 2


def test_wrong_type_names_file_key_and_kind(home):
    path = write_config(home, 'temperature = "hot"\n')
    with pytest.raises(UsageError) as err:
        load()
    message = str(err.value)
    assert str(path) in message
    assert "temperature" in message
    assert "number" in message


@pytest.mark.parametrize(
    "line, key, kind",
    [
        ("top_k = 1.5", "top_k", "integer"),
        ("top_k = true", "top_k", "integer"),
        ("max_new_tokens = [1]", "max_new_tokens", "integer"),
        ("temperature = false", "temperature", "number"),
        ("seed = \"abc\"", "seed", "integer"),
    ],
)
def test_wrong_types_in_file(home, line, key, kind):
    path = write_config(home, line + "\n")
    with pytest.raises(UsageError) as err:
        load()
    assert str(path) in str(err.value) and key in str(err.value) and kind in str(err.value)


@pytest.mark.parametrize(
    "line, message",
    [
        ('device = "tpu"', "device must be one of auto, cpu, cuda, mps"),
        ('dtype = "int8"', "dtype must be one of auto, float32, bfloat16, float16"),
        ('system_messages = "drop"', "system_messages must be one of reject, merge (got 'drop')"),
        ('model = ""', "model must be a non-empty string"),
        ("model = 3", "model must be a non-empty string"),
    ],
)
def test_bad_choices_in_file(home, line, message):
    path = write_config(home, line + "\n")
    with pytest.raises(UsageError) as err:
        load()
    assert str(err.value).startswith(f"{path}: {message}")


def test_system_messages_default_to_reject_and_are_configurable(home):
    assert load()[0].system_messages == "reject"  # rinna's exact format unless asked otherwise
    write_config(home, 'system_messages = "merge"\n')
    assert load()[0].system_messages == "merge"
    assert load(environ={"RINNA_SYSTEM_MESSAGES": "reject"})[0].system_messages == "reject"


def test_bad_environment_value_names_the_variable(home):
    with pytest.raises(UsageError) as err:
        load(environ={"RINNA_TOP_P": "most"})
    assert str(err.value).startswith("RINNA_TOP_P: top_p must be a number")


def test_bad_flag_names_the_flag(home):
    with pytest.raises(UsageError) as err:
        load({"top_p": 1.5})
    assert str(err.value).startswith("--top-p: top_p = 1.5 is out of range")


def test_unknown_key_warns_with_did_you_mean(home):
    path = write_config(home, "temprature = 0.5\nmax_tokens = 10\ncolour = \"red\"\n")
    settings, warnings = load()
    assert settings.temperature == 0.7  # ignored, not failed
    assert warnings == [
        f"{path}: unknown key 'temprature' ignored (did you mean 'temperature'?)",
        f"{path}: unknown key 'max_tokens' ignored (did you mean 'max_new_tokens'?)",
        f"{path}: unknown key 'colour' ignored",
    ]


def test_unknown_key_default_warning_goes_to_stderr(home, capsys):
    write_config(home, "temprature = 0.5\n")
    config.load({}, {})
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("rinna: warning: ")
    assert "did you mean 'temperature'?" in captured.err


def test_user_config_that_is_not_utf8(home):
    path = home / "config.toml"
    path.write_bytes(b"temperature = 0.5 # \xff\xfe\n")
    with pytest.raises(UsageError) as err:
        load()
    assert str(err.value) == (
        f"the config file {path} is not UTF-8 (byte 0xff at offset 20); convert it first, e.g. "
        "`iconv -f SHIFT_JIS -t UTF-8`"
    )


def test_user_config_with_a_byte_order_mark(home):
    """As Windows editors save it: the mark is dropped, as on standard input."""
    (home / "config.toml").write_bytes("\ufefftemperature = 0.5\n".encode())
    settings, warnings = load()
    assert settings.temperature == 0.5 and warnings == []


# ---- ranges ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("temperature", -1, "0.0 <= temperature <= 5.0"),
        ("temperature", 5.5, "0.0 <= temperature <= 5.0"),
        ("top_p", 1.5, "0.0 < top_p <= 1.0"),
        ("top_p", 0, "0.0 < top_p <= 1.0"),
        ("top_p", 0.0, "0.0 < top_p <= 1.0"),
        ("top_k", -3, "0 <= top_k <= 100000"),
        ("max_new_tokens", 0, "1 <= max_new_tokens <= 2047"),
        ("max_new_tokens", 2048, "1 <= max_new_tokens <= 2047"),
        ("repetition_penalty", 0, "0.0 < repetition_penalty <= 10.0"),
        ("seed", -2, "-1 <= seed <= 4294967295"),
    ],
)
def test_out_of_range(home, key, value, allowed):
    with pytest.raises(UsageError) as err:
        config.check(key, value)
    assert allowed in str(err.value)
    assert "out of range" in str(err.value)
    # the same from every layer
    with pytest.raises(UsageError, match="out of range"):
        load({key: value})
    with pytest.raises(UsageError, match="out of range"):
        load(environ={f"RINNA_{key.upper()}": str(value)})
    path = write_config(home, f"{key} = {value}\n")
    with pytest.raises(UsageError) as err:
        load()
    assert str(err.value).startswith(f"{path}: {key} = {value} is out of range; allowed: {allowed}")


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", math.nan, math.inf])
def test_non_finite_temperature_is_refused(raw):
    with pytest.raises(UsageError, match="out of range"):
        config.check("temperature", raw)


@pytest.mark.parametrize(
    "key, value",
    [("temperature", 0), ("temperature", 5), ("top_p", 1), ("top_p", 1e-9), ("top_k", 0), ("max_new_tokens", 1),
     ("max_new_tokens", 2047), ("seed", -1), ("seed", 2**32 - 1)],
)  # fmt: skip
def test_range_edges_are_allowed(key, value):
    assert config.check(key, value) == value


# ---- check() parses strings (for /set and the environment) ------------------------------


@pytest.mark.parametrize(
    "key, raw, expected",
    [
        ("temperature", "0.3", 0.3),
        ("temperature", " 1 ", 1.0),
        ("top_p", "0.95", 0.95),
        ("top_k", "40", 40),
        ("max_new_tokens", "512", 512),
        ("seed", "-1", -1),
        ("repetition_penalty", "1.2", 1.2),
        ("device", "cuda", "cuda"),
        ("dtype", "float16", "float16"),
        ("model", "ppo", "ppo"),
    ],
)
def test_check_parses_strings(key, raw, expected):
    value = config.check(key, raw)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    "key, raw, fragment",
    [
        ("top_k", "4.5", "top_k must be an integer"),
        ("top_k", "many", "top_k must be an integer"),
        ("temperature", "", "temperature must be a number"),
        ("temperature", "warm", "temperature must be a number"),
        ("device", "gpu", "device must be one of"),
        ("nope", "1", "unknown setting 'nope'"),
    ],
)
def test_check_refuses_bad_strings(key, raw, fragment):
    with pytest.raises(UsageError) as err:
        config.check(key, raw, "/set")
    assert str(err.value).startswith(f"/set: {fragment}")


def test_check_rejects_bools_as_numbers():
    for key in ("temperature", "top_k", "seed"):
        with pytest.raises(UsageError):
            config.check(key, True)


def test_with_value_returns_a_checked_copy(home):
    settings, _ = load()
    changed = settings.with_value("temperature", "0.2", "/set")
    assert changed.temperature == 0.2 and settings.temperature == 0.7
    assert changed.with_value("top_k", "5").top_k == 5
    with pytest.raises(UsageError, match="/set: top_p = 2.0 is out of range"):
        settings.with_value("top_p", "2.0", "/set")


# ---- model aliases ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, repo",
    [
        ("sft", "rinna/japanese-gpt-neox-3.6b-instruction-sft"),
        ("sft-v2", "rinna/japanese-gpt-neox-3.6b-instruction-sft-v2"),
        ("ppo", "rinna/japanese-gpt-neox-3.6b-instruction-ppo"),
        ("rinna/japanese-gpt-neox-3.6b-instruction-ppo", "rinna/japanese-gpt-neox-3.6b-instruction-ppo"),
        ("someone/else", "someone/else"),
        ("./sft", "./sft"),
        ("SFT", "SFT"),
    ],
)
def test_model_aliases(name, repo):
    assert hub.expand(name) == repo


def test_default_model_is_the_sft_alias():
    assert hub.expand("sft") == hub.DEFAULT_MODEL == DEFAULT_MODEL


def test_canonical_model_names_match_across_spellings(tmp_path, monkeypatch):
    assert hub.canonical("sft") == hub.canonical("rinna/japanese-gpt-neox-3.6b-instruction-sft")
    assert hub.canonical("ppo") != hub.canonical("sft")
    folder = tmp_path / "model"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    assert hub.canonical("./model") == hub.canonical(str(folder)) == str(folder.resolve())


def test_a_misspelt_variable_is_told_and_others_are_not(home):
    settings, warnings = load(environ={"RINNA_TEMPRATURE": "1.5", "RINNA_TOP_K": "5"})
    assert warnings == ["unknown variable RINNA_TEMPRATURE ignored (did you mean RINNA_TEMPERATURE?)"]
    assert settings.temperature == 0.7 and settings.top_k == 5
    # rinna-cli's other variables, and names like none of its settings, are not warned about
    assert load(environ={"RINNA_CLI_HOME": str(home), "RINNA_API_KEY": "k", "RINNA_TEST_VLLM_URL": "u"})[1] == []
