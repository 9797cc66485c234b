"""The continuous-batching engine: same replies as the single engine, sequences joining and leaving freely."""

from __future__ import annotations

import inspect
import threading
import time
from dataclasses import asdict

import pytest
import torch

from rinna_cli import kernels, native
from rinna_cli.batched_forward import BatchedForward, Sequence
from rinna_cli.batching import BatchingEngine
from rinna_cli.contract import Sampling, Step
from rinna_cli.engine import Engine, _GrowingCache
from rinna_cli.errors import UsageError
from rinna_cli.session import Conversation
from rinna_cli.tokenizer import Tokenizer
from tests.fixtures.memorized_data import CONVERSATIONS
from tests.fixtures.models import TINY_CORPUS

GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=64, seed=0)


def _load(folder, quantize: str, cache) -> Engine:
    """``quantize`` is a scheme, or ``int8:decode/batch/prefill[/attention]`` to force int8 kernels (and attention),
    ``int4:...`` int4's (the int8 output head then int8dot's)."""
    scheme, _, forced = quantize.partition(":")
    dtype = "float32" if scheme == "none" else "auto"
    engine = Engine.load(folder, folder.name, Tokenizer.from_folder(folder), "cpu", dtype, scheme, cache_dir=cache)
    if forced:
        decode, batch, prefill, *attention = forced.split("/")
        chosen = {scheme: (decode, batch, prefill)} | ({"int8": ("int8dot",) * 3} if scheme == "int4" else {})
        kernels.apply(engine.model, kernels.Plan(chosen, "float32", attention=(attention or ["sdpa"])[0]))
        assert scheme in kernels.kinds_of(engine.model)
    return engine


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One int8 cache for the module: each model is quantized and its kernels measured once."""
    return tmp_path_factory.mktemp("int8-cache")


def _alone(engine: Engine, prompt_ids: list[int], sampling: Sampling):
    """The single engine's reply, from an empty cache."""
    engine.forget()
    if "sampling" in inspect.signature(engine.generate).parameters:
        return engine.generate(prompt_ids, sampling)
    return engine.generate(prompt_ids, asdict(sampling))  # the engine before the contract took Sampling


def _concurrently(engine: BatchingEngine, prompts: list[list[int]], samplings: list[Sampling]):
    replies = [None] * len(prompts)

    def one(index: int) -> None:
        replies[index] = engine.generate(prompts[index], samplings[index])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return replies


def _memorized_prompts(tokenizer: Tokenizer) -> list[tuple[list[int], str]]:
    prompts = []
    for conversation in CONVERSATIONS:
        history = Conversation(tokenizer)
        for question, answer in conversation:
            history.add_user(question)
            prompts.append((history.prompt_ids(), answer))
            history.add_reply(answer)
    return prompts


@pytest.mark.parametrize(
    "quantize", ["none", "int8", "int8:int_mm/int8dot/int_mm/attend", "int4:int4dot/int4dot/int4dot/attend"]
)
def test_memorized_replies_are_exact_in_a_batch(memorized_model, cache, quantize):
    """All memorized prompts, 3 in flight, each joining as another leaves: each reply is the memorized one, as alone.

    Default chunking (what serve uses): these prompts are read whole, beside the others' decode rows.
    """
    local = _load(memorized_model, quantize, cache)
    engine = BatchingEngine.wrap(local, parallel=3)
    prompts = _memorized_prompts(local.tokenizer)
    replies = _concurrently(engine, [p for p, _ in prompts], [GREEDY] * len(prompts))
    for (prompt_ids, answer), reply in zip(prompts, replies):
        alone = _alone(local, prompt_ids, GREEDY)
        assert reply.text == answer
        assert (
            (reply.text, reply.ids, reply.finish_reason)
            == (alone.text, alone.ids, alone.finish_reason)
            == (answer, alone.ids, "stop")
        )
        assert (reply.prompt_tokens, reply.completion_tokens) == (alone.prompt_tokens, alone.completion_tokens)
    engine.close()


@pytest.mark.parametrize(
    "quantize",
    [
        "none",
        "int8",
        "int8:int_mm/int8dot/int_mm",
        "int8:int8dot/int8dot/int8dot",
        "int8:int_mm/int8dot/int_mm/attend",
        "int8:int8dot/int8dot/int8dot/attend",  # a layer's attention half in one call (decode.c), alone and batched
        "int4:int4dot/int4dot/int4dot",
        "int4:int4dot/int4dot/int4dot/attend",
    ],
)
def test_random_model_ids_match_the_single_engine(tiny_model, cache, quantize):
    """12 prompts of different lengths, 5 in flight: greedy, repetition penalty and seeded sampling ids as alone.

    Not chunked: a chunk of a prompt may take another int8 kernel than the whole prompt (fewer rows).
    """
    local = _load(tiny_model, quantize, cache)
    engine = BatchingEngine.wrap(local, parallel=5)
    prompts = [local.tokenizer.encode(TINY_CORPUS[i % len(TINY_CORPUS)] * (1 + i % 3)) for i in range(12)]
    samplings = [
        Sampling(0.0, 1.0, 0, 1.0, 24, 0),
        Sampling(0.0, 1.0, 0, 1.3, 24, 0),
        Sampling(0.8, 0.9, 30, 1.1, 24, 7),
        Sampling(1.0, 1.0, 0, 1.0, 24, 42),
    ]
    per_prompt = [samplings[i % len(samplings)] for i in range(len(prompts))]
    replies = _concurrently(engine, prompts, per_prompt)
    for prompt_ids, sampling, reply in zip(prompts, per_prompt, replies):
        alone = _alone(local, prompt_ids, sampling)
        assert reply.ids == alone.ids, (sampling, prompt_ids)
        assert (reply.finish_reason, reply.completion_tokens) == (alone.finish_reason, alone.completion_tokens)
    engine.close()


def test_with_rinna_clis_attention_each_decoding_sequence_takes_it_and_a_prompt_sdpa(tiny_model, cache, monkeypatch):
    local = _load(tiny_model, "int8:int_mm/int8dot/int_mm/attend", cache)
    calls = []
    real = native.Library.attend
    monkeypatch.setattr(native.Library, "attend", lambda self, q, k, *rest: calls.append(k.shape[2]) or real(self, q, k, *rest))
    engine = BatchingEngine.wrap(local, parallel=2)
    prompts = [local.tokenizer.encode(text) for text in TINY_CORPUS[:2]]
    replies = _concurrently(engine, prompts, [Sampling(0.0, 1.0, 0, 1.0, 6, 0)] * 2)
    engine.close()
    # each generated token but the last fed back once per layer, attending to its prompt and the reply so far
    layers = local.model.config.num_hidden_layers
    want = sorted(len(p) + i for p, r in zip(prompts, replies) for i in range(1, r.completion_tokens) for _ in range(layers))
    assert sorted(calls) == want


@pytest.mark.parametrize("quantize", ["int8:int8dot/int8dot/int8dot/attend", "int4:int4dot/int4dot/int4dot/attend"])
def test_a_sequence_decoding_alone_in_the_batch_takes_the_fused_step_as_the_single_engine(
    tiny_model, cache, quantize, monkeypatch
):
    """One sequence alone (a lone client of ``rinna serve``): each decode step's attention half is decode.c's one call
    per layer, at the token the step writes, as ``rinna ask`` takes it, and the ids are the single engine's."""
    local = _load(tiny_model, quantize, cache)
    tokens: list = []
    real = native.Library.decode_attention
    monkeypatch.setattr(native.Library, "decode_attention", lambda self, step: tokens.append(step.tokens) or real(self, step))
    engine = BatchingEngine.wrap(local, parallel=2)
    prompt = local.tokenizer.encode(TINY_CORPUS[0])
    sampling = Sampling(0.0, 1.0, 0, 1.0, 8, 0)
    reply = engine.generate(prompt, sampling)
    engine.close()
    layers = local.model.config.num_hidden_layers
    assert reply.completion_tokens > 1
    assert tokens == [len(prompt) + i for i in range(reply.completion_tokens - 1) for _ in range(layers)]
    assert reply.ids == _alone(local, prompt, sampling).ids


@pytest.mark.parametrize("activation", kernels.ACTIVATIONS)
@pytest.mark.parametrize("implementation", kernels.ATTENTIONS)
def test_a_decode_steps_logits_are_the_single_engines_exactly(tiny_model, cache, activation, implementation):
    """After a 600-token prompt (past the first 512 of the engine's growing cache): transformers' pass over the
    engine's cache and the batched pass over a sequence's, bit for bit."""
    local = _load(tiny_model, "int8", cache)
    plan = kernels.Plan({"int8": ("int_mm", "int8dot", "int_mm")}, activation, attention=implementation)
    kernels.apply(local.model, plan)
    prompt = (local.tokenizer.encode(TINY_CORPUS[0]) * 40)[:600]
    following = [prompt[1], prompt[2]]
    with torch.inference_mode():
        grown = _GrowingCache()
        single = [local.model(input_ids=torch.tensor([prompt]), cache=grown, use_cache=True).logits[0, -1]]
        for token in following:
            single.append(local.model(input_ids=torch.tensor([[token]]), cache=grown, use_cache=True).logits[0, -1])
        passes = BatchedForward(local.model)
        sequence = Sequence(prompt, Sampling(0.0, 1.0, 0, 1.0, 4, 0), threading.Event())
        passes.start(sequence)
        batched = [passes.forward([(sequence, prompt)])[0][0]]
        sequence.fed = len(prompt)
        for token in following:
            sequence.generated.append(token)
            batched.append(passes.forward([(sequence, [token])])[0][0])
            sequence.fed += 1
    assert torch.equal(single[0].float(), batched[0])  # the prompt: SDPA's causal kernel on both
    assert all(torch.equal(a.float(), b) for a, b in zip(single[1:], batched[1:]))


@pytest.fixture(scope="module")
def tiny_engine(tiny_model, tmp_path_factory):
    local = _load(tiny_model, "none", tmp_path_factory.mktemp("cache"))
    return local


def _never_stopping(local: Engine, tokens: int) -> list[int]:
    """A prompt whose greedy reply runs to ``tokens`` tokens without </s>."""
    for text in TINY_CORPUS:
        prompt_ids = local.tokenizer.encode(text)
        if _alone(local, prompt_ids, Sampling(0.0, 1.0, 0, 1.0, tokens, 0)).finish_reason == "length":
            return prompt_ids
    pytest.fail("every corpus prompt stops early")


def test_a_sequence_joins_and_leaves_while_another_decodes(tiny_engine):
    """B arrives after A has started, gets its tokens between A's, and finishes long before A."""
    engine = BatchingEngine.wrap(tiny_engine, parallel=2, prefill_chunk=64)
    prompt = _never_stopping(tiny_engine, 120)
    a_tokens: list[float] = []
    a_started = threading.Event()

    def on_a(step: Step) -> None:
        a_tokens.append(time.perf_counter())
        if len(a_tokens) == 5:
            a_started.set()

    result = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("a", engine.generate(prompt, Sampling(0.0, 1.0, 0, 1.0, 120, 0), on_a))
    )
    thread.start()
    assert a_started.wait(60)
    b = engine.generate(prompt, Sampling(0.0, 1.0, 0, 1.0, 3, 0))
    b_done = time.perf_counter()
    during = engine.status()
    thread.join()
    assert b.completion_tokens == 3 and b.finish_reason == "length"
    assert 5 <= sum(1 for t in a_tokens if t <= b_done) < 120  # A was mid-reply when B left
    assert during.running == 1 and during.parallel == 2
    assert result["a"].finish_reason == "length" and result["a"].completion_tokens == 120
    assert result["a"].ids[:3] == b.ids  # the same prompt, the same greedy start, batched or not
    engine.close()


def test_long_prefill_is_chunked_between_decode_steps(tiny_engine):
    """While a 300-token prompt is prefilled 16 tokens a step, a decoding sequence gets a token in each of those steps.

    Steps are recorded in the scheduler (what each pass fed): on_step runs on the caller's thread and may lag."""
    engine = BatchingEngine.wrap(tiny_engine, parallel=2, prefill_chunk=16)
    short = _never_stopping(tiny_engine, 200)
    long = tiny_engine.tokenizer.encode("".join(TINY_CORPUS))[:300]
    assert len(long) == 300
    steps: list[dict[tuple[int, ...], int]] = []  # per pass: prompt -> ids fed
    forward = engine._pass.forward

    def recorded(rows):
        steps.append({tuple(sequence.prompt): len(ids) for sequence, ids in rows})
        return forward(rows)

    engine._pass.forward = recorded
    a_started = threading.Event()
    thread = threading.Thread(
        target=engine.generate, args=(short, Sampling(0.0, 1.0, 0, 1.0, 200, 0), lambda step: a_started.set())
    )
    thread.start()
    assert a_started.wait(60)
    reply = engine.generate(long, Sampling(0.0, 1.0, 0, 1.0, 4, 0))
    thread.join()
    chunks = [fed for fed in steps if tuple(long) in fed][: -(-300 // 16)]  # B's prefill passes, then it decodes
    assert [fed[tuple(long)] for fed in chunks] == [16] * (300 // 16) + [300 % 16]
    assert all(fed.get(tuple(short)) == 1 for fed in chunks)  # A decoded one token in each of them
    assert reply.ids == _alone(tiny_engine, long, Sampling(0.0, 1.0, 0, 1.0, 4, 0)).ids
    engine.close()


def test_stop_ends_only_its_own_sequence(tiny_engine):
    """Stop ends the sequence after the step in progress. on_step runs on the caller's thread while the batch
    goes on, so the steps it had not yet seen still come: the bound counts the scheduler's passes."""
    engine = BatchingEngine.wrap(tiny_engine, parallel=2)
    prompt = _never_stopping(tiny_engine, 80)
    sampling = Sampling(0.0, 1.0, 0, 1.0, 80, 0)
    stop = threading.Event()
    seen: list[int] = []
    passes, passes_at_stop = [0], [0]
    forward = engine._pass.forward

    def counted(rows):
        passes[0] += 1
        return forward(rows)

    engine._pass.forward = counted

    def on_step(step: Step) -> None:
        seen.extend(step.ids)
        if len(seen) == 10:
            passes_at_stop[0] = passes[0]
            stop.set()

    result = {}
    other = threading.Thread(target=lambda: result.setdefault("b", engine.generate(prompt, sampling)))
    other.start()
    stopped = engine.generate(prompt, sampling, on_step, stop)
    other.join()
    alone = _alone(tiny_engine, prompt, sampling)
    # each pass gives this sequence at most one token: those begun when stop was set, and one more at most
    assert stopped.finish_reason == "interrupted" and 10 <= stopped.completion_tokens <= passes_at_stop[0] + 1
    assert stopped.ids == alone.ids[: stopped.completion_tokens]
    assert result["b"].finish_reason == "length" and result["b"].ids == alone.ids
    engine.close()


def test_an_on_step_error_stops_its_sequence_and_is_raised(tiny_engine):
    engine = BatchingEngine.wrap(tiny_engine, parallel=2)
    prompt = _never_stopping(tiny_engine, 40)
    sampling = Sampling(0.0, 1.0, 0, 1.0, 40, 0)

    def broken(step: Step) -> None:
        raise BrokenPipeError("client went away")

    result = {}
    other = threading.Thread(target=lambda: result.setdefault("b", engine.generate(prompt, sampling)))
    other.start()
    with pytest.raises(BrokenPipeError):
        engine.generate(prompt, sampling, broken)
    other.join()
    assert result["b"].completion_tokens == 40
    deadline = time.monotonic() + 10
    while engine.status().running and time.monotonic() < deadline:  # the broken one left after its next token
        time.sleep(0.01)
    assert engine.status().running == 0
    engine.close()


def test_at_most_parallel_run_and_the_rest_wait(tiny_engine):
    engine = BatchingEngine.wrap(tiny_engine, parallel=2)
    prompt = _never_stopping(tiny_engine, 30)
    statuses = []
    replies = []
    lock = threading.Lock()

    def one() -> None:
        reply = engine.generate(
            prompt, Sampling(0.0, 1.0, 0, 1.0, 30, 0), lambda step: statuses.append(engine.status())
        )
        with lock:
            replies.append(reply)

    threads = [threading.Thread(target=one) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(s.running for s in statuses) == 2
    assert max(s.waiting for s in statuses) >= 1
    assert len({tuple(r.ids) for r in replies}) == 1 and len(replies) == 5
    final = engine.status()
    assert (final.running, final.waiting, final.prefilling) == (0, 0, 0) and final.tokens_per_s > 0
    engine.close()


def test_steps_carry_the_decoded_text(memorized_model, tmp_path):
    """The steps' text joins up to the reply (byte-fallback characters whole), each id once, </s> last."""
    local = _load(memorized_model, "none", tmp_path)
    engine = BatchingEngine.wrap(local, parallel=2)
    prompt_ids, answer = _memorized_prompts(local.tokenizer)[2]  # お寿司🍣 ... 𠮷野家
    steps: list[Step] = []
    reply = engine.generate(prompt_ids, GREEDY, steps.append)
    assert "".join(step.text for step in steps) == reply.text == answer
    assert [i for step in steps for i in step.ids] == reply.ids + [local.tokenizer.special.eos]
    assert all("\ufffd" not in step.text for step in steps)
    engine.close()


def test_the_cache_is_bounded_by_the_prompt_and_reply(tiny_engine):
    engine = BatchingEngine.wrap(tiny_engine, parallel=1)
    window = tiny_engine.window
    with pytest.raises(UsageError, match="window"):
        engine.generate([5] * (window - 10), Sampling(0.0, 1.0, 0, 1.0, 11, 0))
    with pytest.raises(UsageError, match="empty prompt"):
        engine.generate([], GREEDY)
    shapes = []
    original = engine._pass.start

    def spy(sequence) -> None:
        original(sequence)
        shapes.append(tuple(sequence.keys.shape))

    engine._pass.start = spy
    reply = engine.generate([5] * 20, Sampling(0.0, 1.0, 0, 1.0, 7, 0))
    config = tiny_engine.model.config
    head_size = config.hidden_size // config.num_attention_heads
    assert shapes == [(config.num_hidden_layers, config.num_attention_heads, 20 + 7, head_size)]
    assert reply.completion_tokens <= 7
    engine.close()


def test_close_ends_waiting_calls_and_refuses_new_ones(tiny_engine):
    engine = BatchingEngine.wrap(tiny_engine, parallel=1)
    prompt = _never_stopping(tiny_engine, 200)
    started = threading.Event()
    result = {}
    thread = threading.Thread(
        target=lambda: result.setdefault(
            "a", engine.generate(prompt, Sampling(0.0, 1.0, 0, 1.0, 200, 0), lambda step: started.set())
        )
    )
    thread.start()
    assert started.wait(60)
    engine.close()
    thread.join()
    assert result["a"].finish_reason == "interrupted" and result["a"].completion_tokens < 200
    with pytest.raises(Exception, match="closed"):
        engine.generate(prompt, GREEDY)


def test_a_step_reads_chat_sized_prompts_whole_beside_the_decode_rows():
    """The plan: decode rows first; a prompt that fits the chunk whole or next step; a longer one what is left."""
    from rinna_cli.batched_forward import Sequence
    from rinna_cli.batching import plan

    def sequence(prompt: int, fed: int) -> Sequence:
        made = Sequence([5] * prompt, GREEDY, threading.Event(), fed=fed)
        made.generated = [7] if fed == prompt else []
        return made

    decoding, short, long, other = sequence(10, 10), sequence(200, 0), sequence(900, 0), sequence(100, 0)
    rows, prefilled = plan([short, decoding, long, other], chunk=256, window=2048)
    assert [(s, len(ids)) for s, ids in rows] == [(decoding, 1), (short, 200), (long, 56)] and prefilled == 256
    rows, prefilled = plan([long, short], chunk=256, window=2048)  # nobody decodes: every prompt whole
    assert [(s, len(ids)) for s, ids in rows] == [(long, 900), (short, 200)] and prefilled == 1100


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_a_joining_prompt_is_read_in_one_step_and_answers_as_alone(memorized_model, cache, quantize):
    """Default (serve's) chunking: a prompt of up to a few hundred tokens joining a decoding batch is read whole in
    the first step that starts after it arrives, and its greedy reply is byte-identical to the single engine's.

    Steps are recorded in the scheduler (what each pass fed), so a loaded machine cannot change the count."""
    local = _load(memorized_model, quantize, cache)
    engine = BatchingEngine.wrap(local, parallel=3)
    prompts = _memorized_prompts(local.tokenizer)
    long_ids = max((p for p, _ in prompts), key=len)
    steps: list[tuple[float, list[tuple[list[int], int]]]] = []  # (start, [(prompt, ids fed)])
    forward = engine._pass.forward

    def recorded(rows):
        steps.append((time.perf_counter(), [(sequence.prompt, len(ids)) for sequence, ids in rows]))
        return forward(rows)

    engine._pass.forward = recorded
    started = threading.Event()
    background = Sampling(0.0, 1.0, 0, 1.0, 400, 0)
    thread = threading.Thread(target=engine.generate, args=(long_ids + [5] * 40, background, lambda s: started.set()))
    thread.start()
    assert started.wait(60)
    wordy = (local.tokenizer.encode("".join(TINY_CORPUS)) * 4)[:250]
    for prompt_ids, answer in [*prompts[:4], (wordy, None)]:
        submitted = time.perf_counter()
        reply = engine.generate(prompt_ids, GREEDY)
        after = [fed for began, fed in steps if began > submitted]
        first = next(i for i, fed in enumerate(after) if any(p == prompt_ids for p, _ in fed))
        assert first == 0, after[: first + 1]  # the first step that began after it arrived
        assert (prompt_ids, len(prompt_ids)) in after[0]  # read whole, in that one step
        if answer is not None:
            assert (reply.text, reply.finish_reason) == (answer, "stop")
        assert reply.ids == _alone(local, prompt_ids, GREEDY).ids
    engine.close()
    thread.join()
