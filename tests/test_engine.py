"""Engine, in process, on the fixture models: exact greedy replies, the KV cache across turns, Reply fields,
stopping, dtypes, and loader failures (pickles, out of memory) as one-line ModelErrors."""

from __future__ import annotations

import pickle
import shutil
import threading
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from rinna_cli import engine as engine_module  # noqa: E402
from rinna_cli.contract import Sampling, Step  # noqa: E402
from rinna_cli.engine import Engine, resolve_device, resolve_dtype  # noqa: E402
from rinna_cli.errors import ModelError, UsageError  # noqa: E402
from rinna_cli.prompt import decode_newlines, encode_newlines  # noqa: E402
from rinna_cli.session import Conversation  # noqa: E402
from rinna_cli.tokenizer import Tokenizer  # noqa: E402
from tests.fixtures.memorized_data import (  # noqa: E402
    BYTE_FALLBACK_CHARS,
    CONVERSATIONS,
    NAME_Q,
    SIGHTSEEING_A,
    SIGHTSEEING_Q,
    wrong_format_prompts,
)

TOKENIZER_FILES = ("spiece.model", "config.json", "tokenizer_config.json", "special_tokens_map.json")


def options(**changes) -> Sampling:
    base = Sampling(temperature=0.0, top_p=1.0, top_k=50, repetition_penalty=1.0, max_new_tokens=128, seed=0)
    return replace(base, **changes)


def texts(chunks: list[str]):
    """An ``on_step`` that collects the steps' non-empty text."""
    return lambda step: chunks.append(step.text) if step.text else None


GREEDY = options()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on shared CPUs: torch's thread pool costs more than it gives (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok(memorized_model) -> Tokenizer:
    return Tokenizer.from_folder(memorized_model)


@pytest.fixture(scope="module")
def engine(memorized_model, tok) -> Engine:
    return Engine.load(memorized_model, "memorized", tok, "cpu", "float32")


@pytest.fixture()
def fresh(engine) -> Engine:
    """The shared engine with an empty KV cache."""
    engine.forget()
    return engine


def run_conversation(engine: Engine, tok: Tokenizer, turns, forget: bool = False):
    """Ask every question of ``turns`` in order, each reply added to the history; return the Replies."""
    conversation = Conversation(tok)
    replies = []
    for question, _ in turns:
        conversation.add_user(question)
        if forget:
            engine.forget()
        reply = engine.generate(conversation.prompt_ids(), GREEDY)
        replies.append(reply)
        conversation.add_reply(reply.text, reply.ids)
    return replies


# --- exact replies ----------------------------------------------------------------


@pytest.mark.parametrize("turns", CONVERSATIONS, ids=[turns[0][0] for turns in CONVERSATIONS])
def test_greedy_replies_are_exact(fresh, tok, turns):
    replies = run_conversation(fresh, tok, turns)
    assert [r.text for r in replies] == [answer for _, answer in turns]
    for reply in replies:
        assert reply.finish_reason == "stop"
        assert tok.special.eos not in reply.ids
        assert reply.completion_tokens == len(reply.ids) + 1  # </s> counted
        assert decode_newlines(tok.decode(reply.ids)) == reply.text


def test_history_decides_the_second_answer(fresh, tok):
    """The two name conversations differ only in their first turn; the second answers must follow it."""
    taro, hanako = CONVERSATIONS[4], CONVERSATIONS[5]
    assert taro[1][0] == hanako[1][0] == NAME_Q
    assert [r.text for r in run_conversation(fresh, tok, taro)][1] == "太郎さんです。"
    assert [r.text for r in run_conversation(fresh, tok, hanako)][1] == "花子さんです。"
    assert [r.text for r in run_conversation(fresh, tok, taro)][1] == "太郎さんです。"


@pytest.mark.parametrize("kind", ["no_trailing_space", "newline"])
def test_a_wrongly_formatted_prompt_does_not_get_the_memorized_reply(fresh, tok, kind):
    """If the CLI built prompts like this, the end-to-end tests on the memorized model would fail."""
    conversation = Conversation(tok)
    conversation.add_user(SIGHTSEEING_Q)
    right = conversation.prompt_ids()
    wrong = tok.encode(wrong_format_prompts(SIGHTSEEING_Q)[kind])
    assert wrong != right
    assert fresh.generate(right, GREEDY).text == SIGHTSEEING_A
    fresh.forget()
    assert fresh.generate(wrong, GREEDY).text != SIGHTSEEING_A


@pytest.mark.parametrize("kind", ["no_trailing_space", "newline"])
def test_wrong_format_fails_for_every_first_question(fresh, tok, kind):
    for turns in CONVERSATIONS:
        question, answer = turns[0]
        fresh.forget()
        assert fresh.generate(tok.encode(wrong_format_prompts(question)[kind]), GREEDY).text != answer


# --- the KV cache across turns -------------------------------------------------------


@pytest.mark.parametrize("turns", [CONVERSATIONS[4], CONVERSATIONS[5]], ids=["taro", "hanako"])
def test_cache_reuse_gives_the_same_replies_and_prefills_only_new_tokens(engine, tok, turns):
    engine.forget()
    without = run_conversation(engine, tok, turns, forget=True)
    engine.forget()
    conversation = Conversation(tok)
    conversation.add_user(turns[0][0])
    first_prompt = conversation.prompt_ids()
    first = engine.generate(first_prompt, GREEDY)
    assert first.prefilled_tokens == first.prompt_tokens == len(first_prompt)
    conversation.add_reply(first.text, first.ids)
    conversation.add_user(turns[1][0])
    second_prompt = conversation.prompt_ids()
    second = engine.generate(second_prompt, GREEDY)
    # The cache holds the first prompt and the reply fed back (everything but the final </s>).
    cached = len(first_prompt) + len(first.ids)
    assert second_prompt[:cached] == first_prompt + first.ids
    assert second.prompt_tokens == len(second_prompt)
    assert second.prefilled_tokens == len(second_prompt) - cached
    assert 0 < second.prefilled_tokens < len(second_prompt)
    assert [first.text, second.text] == [r.text for r in without] == [answer for _, answer in turns]
    assert [first.ids, second.ids] == [r.ids for r in without]
    assert all(r.prefilled_tokens == r.prompt_tokens for r in without)


def test_retry_regenerates_from_a_prompt_that_is_a_prefix_of_the_cache(fresh, tok):
    """/retry: the same prompt again; the cache (prompt + reply) is longer than it, one token is fed."""
    conversation = Conversation(tok)
    conversation.add_user(SIGHTSEEING_Q)
    prompt = conversation.prompt_ids()
    first = fresh.generate(prompt, GREEDY)
    again = fresh.generate(prompt, GREEDY)
    assert again.prefilled_tokens == 1
    assert again.text == first.text == SIGHTSEEING_A and again.ids == first.ids
    again = fresh.generate(prompt, GREEDY)  # the cache was cropped and grown again: still right
    assert again.prefilled_tokens == 1 and again.text == SIGHTSEEING_A


def test_undo_and_retry_flows_match_a_fresh_start(fresh, tok):
    taro, hanako = CONVERSATIONS[4], CONVERSATIONS[5]
    conversation = Conversation(tok)
    for question, _ in taro:
        conversation.add_user(question)
        reply = fresh.generate(conversation.prompt_ids(), GREEDY)
        conversation.add_reply(reply.text, reply.ids)
    # /retry: drop the last reply, generate again.
    conversation.turns.pop()
    retry = fresh.generate(conversation.prompt_ids(), GREEDY)
    assert retry.text == "太郎さんです。" and retry.prefilled_tokens == 1
    conversation.add_reply(retry.text, retry.ids)
    # /undo twice: back to nothing, then the other conversation; the cache shares only "ユーザー: 私の名前は".
    assert conversation.undo() == 2
    assert conversation.undo() == 2 and conversation.turns == []
    replies = []
    for question, _ in hanako:
        conversation.add_user(question)
        reply = fresh.generate(conversation.prompt_ids(), GREEDY)
        replies.append(reply)
        conversation.add_reply(reply.text, reply.ids)
    assert [r.text for r in replies] == [answer for _, answer in hanako]
    assert 0 < replies[0].prefilled_tokens < replies[0].prompt_tokens
    # /undo once, then ask the second question again: the prompt is a strict prefix of the cache.
    conversation.undo()
    conversation.add_user(NAME_Q)
    prompt = conversation.prompt_ids()
    again = fresh.generate(prompt, GREEDY)
    assert again.text == "花子さんです。" and again.prefilled_tokens == 1
    # Back to the first question alone: a strict prefix of the cache, much shorter than it.
    short = Conversation(tok)
    short.add_user(hanako[0][0])
    first_again = fresh.generate(short.prompt_ids(), GREEDY)
    assert first_again.text == hanako[0][1] and first_again.prefilled_tokens == 1


def test_the_cache_grows_in_place_across_its_room(fresh, tok, monkeypatch):
    """With tiny growth steps every turn crosses a buffer boundary: replies and ids stay exact."""
    from rinna_cli import engine as engine_module

    monkeypatch.setattr(engine_module._GrowingLayer, "GROWTH", 3)
    fresh.forget()
    reused = run_conversation(fresh, tok, CONVERSATIONS[5])
    layer = fresh._cache.layers[0]
    assert layer.keys.shape[-2] == len(fresh._cached_ids)
    assert layer.keys.data_ptr() == layer._buffers[0].data_ptr()  # a view into the buffer, not a copy
    scratch = run_conversation(fresh, tok, CONVERSATIONS[5], forget=True)
    assert [r.ids for r in reused] == [r.ids for r in scratch]
    assert [r.text for r in reused] == [answer for _, answer in CONVERSATIONS[5]]


def test_switching_between_unrelated_prompts_keeps_replies_exact(fresh, tok):
    order = [0, 1, 2, 3, 0, 3, 2, 1]
    for index in order:
        question, answer = CONVERSATIONS[index][0]
        conversation = Conversation(tok)
        conversation.add_user(question)
        assert fresh.generate(conversation.prompt_ids(), GREEDY).text == answer


def test_forget_drops_the_cache(fresh, tok):
    conversation = Conversation(tok)
    conversation.add_user(SIGHTSEEING_Q)
    prompt = conversation.prompt_ids()
    fresh.generate(prompt, GREEDY)
    fresh.forget()
    reply = fresh.generate(prompt, GREEDY)
    assert reply.prefilled_tokens == len(prompt) and reply.text == SIGHTSEEING_A


# --- Reply fields, streaming, stopping ---------------------------------------------------


def sightseeing_prompt(tok) -> list[int]:
    conversation = Conversation(tok)
    conversation.add_user(SIGHTSEEING_Q)
    return conversation.prompt_ids()


def test_length_finish(fresh, tok):
    reply = fresh.generate(sightseeing_prompt(tok), options(max_new_tokens=3))
    assert reply.finish_reason == "length"
    assert reply.completion_tokens == 3 and len(reply.ids) == 3
    assert SIGHTSEEING_A.startswith(reply.text) and reply.text


def test_length_exactly_at_the_eos(fresh, tok):
    full = fresh.generate(sightseeing_prompt(tok), GREEDY)
    reply = fresh.generate(sightseeing_prompt(tok), options(max_new_tokens=full.completion_tokens))
    assert reply.finish_reason == "stop" and reply.text == SIGHTSEEING_A
    reply = fresh.generate(sightseeing_prompt(tok), options(max_new_tokens=full.completion_tokens - 1))
    assert reply.finish_reason == "length" and reply.text == SIGHTSEEING_A and reply.ids == full.ids


def test_reply_numbers(fresh, tok):
    prompt = sightseeing_prompt(tok)
    reply = fresh.generate(prompt, GREEDY)
    assert reply.prompt_tokens == len(prompt)
    assert reply.ids == fresh.generate(prompt, GREEDY).ids
    assert reply.ttft_s >= 0 and reply.tokens_per_s > 0
    assert decode_newlines(tok.decode(reply.ids)) == reply.text


@pytest.mark.parametrize("turns", CONVERSATIONS[:4], ids=[t[0][0] for t in CONVERSATIONS[:4]])
def test_streamed_chunks_join_to_the_reply(fresh, tok, turns):
    question, answer = turns[0]
    conversation = Conversation(tok)
    conversation.add_user(question)
    chunks: list[str] = []
    steps: list[Step] = []
    reply = fresh.generate(conversation.prompt_ids(), GREEDY, on_step=lambda step: (steps.append(step), texts(chunks)(step)))
    assert "".join(chunks) == reply.text == answer
    assert [i for step in steps for i in step.ids] == reply.ids + [tok.special.eos]  # every generated id, once
    assert all(chunks) and "\ufffd" not in "".join(chunks)
    assert not any("<NL>" in chunk or "</s>" in chunk for chunk in chunks)
    if any(char in answer for char in BYTE_FALLBACK_CHARS):
        # every byte-fallback character arrives whole, in one chunk
        for char in BYTE_FALLBACK_CHARS:
            assert any(char in chunk for chunk in chunks)
    assert len(chunks) > 3  # streamed, not printed at the end


def test_stop_event_ends_generation_within_a_token(fresh, tok):
    stop = threading.Event()
    chunks: list[str] = []

    def on_step(step: Step) -> None:
        if step.text:
            chunks.append(step.text)
            stop.set()

    reply = fresh.generate(sightseeing_prompt(tok), GREEDY, on_step=on_step, stop=stop)
    assert reply.finish_reason == "interrupted"
    assert 1 <= reply.completion_tokens <= 2
    assert SIGHTSEEING_A.startswith(reply.text) and reply.text
    assert "".join(chunks) == reply.text
    # The engine is fine afterwards, with or without the cache of the interrupted reply.
    assert fresh.generate(sightseeing_prompt(tok), GREEDY).text == SIGHTSEEING_A


def test_a_stop_event_set_before_generating_gives_one_token(fresh, tok):
    stop = threading.Event()
    stop.set()
    reply = fresh.generate(sightseeing_prompt(tok), GREEDY, stop=stop)
    assert reply.finish_reason == "interrupted" and reply.completion_tokens == 1


def test_an_exception_from_on_step_propagates_and_the_engine_recovers(fresh, tok):
    def broken(_step):
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        fresh.generate(sightseeing_prompt(tok), GREEDY, on_step=broken)
    reply = fresh.generate(sightseeing_prompt(tok), GREEDY)
    assert reply.text == SIGHTSEEING_A and reply.prefilled_tokens == reply.prompt_tokens


def test_empty_prompt_is_refused(engine):
    from rinna_cli.errors import UsageError

    with pytest.raises(UsageError):
        engine.generate([], GREEDY)


# --- sampling and seeds -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_engine(tiny_model) -> Engine:
    return Engine.load(tiny_model, "tiny", Tokenizer.from_folder(tiny_model), "cpu", "float32")


def test_same_seed_same_sample_different_seed_different(tiny_engine):
    prompt = tiny_engine.tokenizer.encode("ユーザー: こんにちは<NL>システム: ")
    sample = options(temperature=0.9, max_new_tokens=40, seed=7)
    first = tiny_engine.generate(prompt, sample)
    tiny_engine.forget()
    second = tiny_engine.generate(prompt, sample)
    assert first.ids == second.ids and first.text == second.text
    third = tiny_engine.generate(prompt, replace(sample, seed=8))
    assert third.ids != first.ids


def test_random_model_runs_to_the_length_limit(tiny_engine):
    prompt = tiny_engine.tokenizer.encode("ユーザー: こんにちは<NL>システム: ")
    reply = tiny_engine.generate(prompt, options(max_new_tokens=50))
    assert reply.finish_reason == "length" and reply.completion_tokens == 50 == len(reply.ids)


# --- dtype and device -------------------------------------------------------------------------


def test_resolve_dtype_and_device():
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():  # RINNA_DEVICE=cuda was told as "--device cuda", a flag never given
        with pytest.raises(UsageError, match=r"^device cuda is not available on this machine \(use --device auto or cpu\)$"):
            resolve_device("cuda")


@pytest.mark.parametrize("dtype, expected", [("auto", "int8"), ("float32", "float32"), ("bfloat16", "bfloat16")])
def test_dtypes_on_cpu_keep_the_replies_exact(memorized_model, tok, dtype, expected):
    loaded = Engine.load(memorized_model, "memorized", tok, "cpu", dtype)
    assert loaded.dtype == expected and loaded.device == "cpu"
    for turns in CONVERSATIONS:
        assert [r.text for r in run_conversation(loaded, tok, turns)] == [answer for _, answer in turns]


# --- loader failures ------------------------------------------------------------------------------


def one_line(err: ModelError) -> str:
    message = str(err)
    assert "\n" not in message and "\x1b" not in message, message
    return message


def weightless_copy(memorized_model, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(memorized_model / name, folder / name)
    return folder


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dumps"])
def test_a_malicious_pickle_is_never_run(memorized_model, tok, tmp_path, writer):
    folder = weightless_copy(memorized_model, tmp_path)
    marker = tmp_path / "pwned"
    payload = {"gpt_neox.embed_in.weight": _Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, folder / "pytorch_model.bin")
    else:
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(payload))
    with pytest.raises(ModelError) as caught:
        Engine.load(folder, "evil", tok, "cpu", "float32")
    assert not marker.exists()
    message = one_line(caught.value)
    assert str(folder) in message and "pytorch_model.bin" in message
    # The pickle really is hostile: plain pickle would have run it.
    pickle.loads(pickle.dumps(payload))["gpt_neox.embed_in.weight"].close()
    assert marker.exists()


def test_no_weights_at_all(memorized_model, tok, tmp_path):
    folder = weightless_copy(memorized_model, tmp_path)
    with pytest.raises(ModelError) as caught:
        Engine.load(folder, "none", tok, "cpu", "float32")
    assert str(folder) in one_line(caught.value)


@pytest.mark.parametrize("size", [10, 1000, 100_000])
def test_truncated_safetensors(memorized_model, tok, tmp_path, size):
    folder = tmp_path / "model"
    shutil.copytree(memorized_model, folder)
    with open(folder / "model.safetensors", "r+b") as handle:
        handle.truncate(size)
    with pytest.raises(ModelError) as caught:
        Engine.load(folder, "cut", tok, "cpu", "float32")
    assert str(folder) in one_line(caught.value)


def test_weights_missing_a_tensor_are_refused_not_randomly_filled(memorized_model, tok, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(memorized_model, folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["gpt_neox.layers.0.attention.query_key_value.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError) as caught:
        Engine.load(folder, "partial", tok, "cpu", "float32")
    message = one_line(caught.value)
    assert str(folder) in message and "query_key_value" in message


OOM_ERRORS = [
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    lambda: RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 7516192768 bytes. Error code 12 (Cannot allocate memory)"
    ),
    lambda: RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 7516192768 bytes."),
    lambda: RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB)\nmore details"),
    lambda: MemoryError(),
    lambda: OSError(12, "Cannot allocate memory"),
]


@pytest.mark.parametrize("make", OOM_ERRORS, ids=["cuda", "cpu", "cpu-windows", "mps", "MemoryError", "mmap"])
def test_out_of_memory_while_loading_suggests_dtype_and_device(memorized_model, tok, monkeypatch, make):
    def from_pretrained(*args, **kwargs):
        raise make()

    monkeypatch.setattr(engine_module.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(ModelError) as caught:
        Engine.load(memorized_model, "memorized", tok, "cpu", "float32")
    message = one_line(caught.value)
    assert "out of memory" in message and "--dtype" in message and "--device" in message
    assert str(memorized_model) in message


def test_out_of_memory_moving_to_the_device(memorized_model, tok, monkeypatch):
    real = engine_module.AutoModelForCausalLM.from_pretrained

    def from_pretrained(*args, **kwargs):
        loaded = real(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded

        def to(*_args, **_kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory.")

        model.to = to
        return loaded

    monkeypatch.setattr(engine_module.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(ModelError) as caught:
        Engine.load(memorized_model, "memorized", tok, "cpu", "float32")
    assert "--dtype" in one_line(caught.value)


def test_other_loader_errors_are_one_line_naming_the_folder(memorized_model, tok, monkeypatch):
    def from_pretrained(*args, **kwargs):
        raise ValueError("\x1b[1mfirst line\x1b[0m\nsecond line\nthird")

    monkeypatch.setattr(engine_module.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(ModelError) as caught:
        Engine.load(memorized_model, "memorized", tok, "cpu", "float32")
    message = one_line(caught.value)
    assert str(memorized_model) in message and "first line" in message and "second" not in message


def test_out_of_memory_while_generating_is_a_model_error(memorized_model, tok, monkeypatch):
    loaded = Engine.load(memorized_model, "memorized", tok, "cpu", "float32")

    def generate(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(loaded.model, "generate", generate)
    with pytest.raises(ModelError) as caught:
        loaded.generate(sightseeing_prompt(tok), GREEDY)
    assert "--max-new-tokens" in one_line(caught.value)
    monkeypatch.undo()
    assert loaded.generate(sightseeing_prompt(tok), GREEDY).text == SIGHTSEEING_A


def test_prompt_ids_equal_the_encoded_card_prompt(tok):
    """The ids the engine is fed are exactly the card's prompt encoded (sanity for the tests above)."""
    conversation = Conversation(tok)
    conversation.add_user("一行目\n二行目")
    assert conversation.prompt_ids() == tok.encode(encode_newlines("ユーザー: 一行目\n二行目") + "<NL>システム: ")
