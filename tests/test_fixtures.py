"""The test model fixtures are what the other tests assume they are.

``tiny_model`` has rinna's exact files and loads; the committed memorized model
answers every prompt of ``CONVERSATIONS`` with its memorized reply under greedy
decoding -- when, and only when, the prompt follows the model card's format.
Generation goes through transformers directly, fed the ids that
``rinna_cli.session.Conversation`` builds.
"""

from __future__ import annotations

import json

import pytest

from rinna_cli.prompt import decode_newlines, encode_newlines, format_prompt
from rinna_cli.session import Conversation
from rinna_cli.tokenizer import Tokenizer
from tests.fixtures.memorized_data import (
    BYTE_FALLBACK_CHARS,
    CONVERSATIONS,
    NAME_Q,
    SPM_CORPUS,
    wrong_format_prompts,
)
from tests.fixtures.models import RINNA_FILES, TINY_CORPUS, build_tiny_random, train_spm

EOS, PAD = 3, 0


def greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
    return out[0, len(ids) :].tolist()


def load(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    return model


# --- tiny_model -------------------------------------------------------------


def test_tiny_model_has_exactly_rinnas_files(tiny_model):
    assert sorted(p.name for p in tiny_model.iterdir()) == sorted(RINNA_FILES)
    config = json.loads((tiny_model / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["GPTNeoXForCausalLM"]
    assert config["model_type"] == "gpt_neox"
    assert (config["bos_token_id"], config["eos_token_id"]) == (2, 3)
    assert config["rotary_pct"] == 1.0 and config["use_parallel_residual"] is False
    assert config["tie_word_embeddings"] is False and config["max_position_embeddings"] == 2048
    tok_config = json.loads((tiny_model / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tok_config["tokenizer_class"] == "T5Tokenizer" and tok_config["pad_token"] == "[PAD]"


def test_tiny_model_loads(tiny_model):
    import torch

    tok = Tokenizer.from_folder(tiny_model)
    assert (tok.special.pad, tok.special.unk, tok.special.bos, tok.special.eos) == (0, 1, 2, 3)
    assert tok.pieces([tok.special.nl]) == ["<NL>"]
    model = load(tiny_model)
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert model.config.vocab_size == tok.vocab_size
    assert model.config.rope_parameters["partial_rotary_factor"] == 1.0
    assert model.config.use_parallel_residual is False
    ids = tok.encode(format_prompt([("ユーザー", "世界で一番高い山は?")]))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), tok.vocab_size)
    assert len(greedy(model, ids, 5)) <= 5


def test_tiny_model_tokenizer_follows_the_card(tiny_model):
    tok = Tokenizer.from_folder(tiny_model)
    # No dummy prefix, whitespace kept, unknown characters as bytes, round trip exact.
    assert not tok.pieces(tok.encode("吾輩は猫である"))[0].startswith("▁")
    text = "გამარჯობა  吾輩は  猫である   "
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.special.unk not in ids
    assert tok.pieces(ids)[:3] == ["<0xE1>", "<0x83>", "<0x92>"]
    assert tok.encode("ユーザー: 山<NL>システム: ")[-1] == tok.encode(" ")[0]


def test_tiny_model_is_deterministic(tiny_model, tmp_path):
    again = build_tiny_random(tmp_path / "again")
    for name in RINNA_FILES:
        assert (again / name).read_bytes() == (tiny_model / name).read_bytes(), name
    assert train_spm(TINY_CORPUS, 600) == (tiny_model / "spiece.model").read_bytes()


# --- memorized_model ----------------------------------------------------------


@pytest.fixture(scope="module")
def memorized(memorized_model):
    return Tokenizer.from_folder(memorized_model), load(memorized_model)


def test_memorized_model_has_exactly_rinnas_files(memorized_model):
    assert sorted(p.name for p in memorized_model.iterdir()) == sorted(RINNA_FILES)
    assert sum(p.stat().st_size for p in memorized_model.iterdir()) < 1_500_000


@pytest.mark.parametrize("n", range(len(CONVERSATIONS)))
def test_memorized_model_reproduces_every_reply(memorized, n):
    tok, model = memorized
    conv = Conversation(tok)
    for question, reply in CONVERSATIONS[n]:
        conv.add_user(question)
        target = tok.encode(encode_newlines(reply))
        got = greedy(model, conv.prompt_ids(), len(target) + 16)
        assert got[-1] == EOS, "the reply must end with </s>"
        text = decode_newlines(tok.decode(got))
        assert text == reply
        assert got == target + [EOS]
        conv.add_reply(text, got[:-1])


def test_second_reply_depends_on_the_first_turn(memorized):
    tok, model = memorized
    pairs = [c for c in CONVERSATIONS if len(c) == 2 and c[1][0] == NAME_Q]
    assert len(pairs) >= 2
    answers = []
    for (q1, r1), (q2, r2) in pairs:
        conv = Conversation(tok)
        conv.add_user(q1)
        conv.add_reply(r1)
        conv.add_user(q2)
        got = greedy(model, conv.prompt_ids(), 40)
        answers.append(decode_newlines(tok.decode(got)))
        assert answers[-1] == r2
    assert len(set(answers)) == len(answers), "same question, different histories, different answers"


def test_memorized_model_needs_multiline_and_byte_fallback_replies(memorized):
    tok, _ = memorized
    replies = [reply for conversation in CONVERSATIONS for _, reply in conversation]
    assert any("\n" in reply for reply in replies)
    for ch in BYTE_FALLBACK_CHARS:
        assert any(ch in reply for reply in replies)
        assert not any(ch in line for line in SPM_CORPUS)
        assert all(piece.startswith("<0x") for piece in tok.pieces(tok.encode(ch)))


@pytest.mark.parametrize("kind", ["no_trailing_space", "newline"])
@pytest.mark.parametrize("n", range(len(CONVERSATIONS)))
def test_wrong_format_does_not_get_the_memorized_reply(memorized, kind, n):
    tok, model = memorized
    question, reply = CONVERSATIONS[n][0]
    prompt = wrong_format_prompts(question)[kind]
    assert prompt != format_prompt([("ユーザー", question)])
    got = decode_newlines(tok.decode(greedy(model, tok.encode(prompt), 40)))
    assert reply not in got
