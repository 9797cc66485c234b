"""rinna's sentencepiece tokenizer ("Tokenization" in the model card), on a tiny model trained with rinna's options."""

from __future__ import annotations

import io
import json
import re

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from rinna_cli.errors import ModelError
from rinna_cli.prompt import SYSTEM, USER, format_prompt
from rinna_cli.session import Conversation
from rinna_cli.tokenizer import Tokenizer
from tests.fixtures.models import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, UNK_ID, train_spm

# A copy of the fixtures' TINY_CORPUS, kept here so that the exact pieces below
# do not move when that corpus is edited.
CORPUS = [
    "ユーザー: 日本のおすすめの観光地を教えてください。",
    "システム: どの地域の観光地が知りたいですか?",
    "ユーザー: 渋谷の観光地を教えてください。",
    "システム: 分かりました。いくつかのおすすめを紹介します。",
    "1. ハチ公像です。ハチ公像は、日本の観光スポットの1つとして人気があります。",
    "2. スクランブル交差点です。多くの人々が行き交う大きな交差点で、観光客に人気のスポットです。",
    "3. 109です。109は、ショッピングやエンターテイメント施設です。",
    "4. 道玄坂です。道玄坂は、日本の商業地区である坂道です。",
    "世界で一番高い山は?",
    "世界で一番高い山はエベレストです。",
    "吾輩は猫である。名前はまだ無い。",
    "  吾輩は  猫である   ",
    "どこで生れたかとんと見当がつかぬ。",
    "何でも薄暗いじめじめした所でニャーニャー泣いていた事だけは記憶している。",
    "今日はいい天気ですね。明日は雨が降るそうです。",
    "東京、京都、大阪、北海道、沖縄はどれも人気の旅行先です。",
    "ありがとうございます。どういたしまして。こんにちは。こんばんは。",
    "私の名前は太郎です。あなたの名前は何ですか?",
    "富士山は日本で一番高い山で、高さは3776メートルです。",
    "Hello, world! This is a test. 0123456789",
]
BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


@pytest.fixture(scope="module")
def spm_bytes() -> bytes:
    return train_spm(CORPUS, vocab_size=600)


@pytest.fixture(scope="module")
def tok(tmp_path_factory, spm_bytes) -> Tokenizer:
    folder = tmp_path_factory.mktemp("spm")
    (folder / "spiece.model").write_bytes(spm_bytes)  # nothing else: spiece.model alone is enough
    return Tokenizer.from_folder(folder)


def rinna_folder(tmp_path, spm_bytes, special_map=None, tokenizer_config=None):
    (tmp_path / "spiece.model").write_bytes(spm_bytes)
    if special_map is not None:
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map, ensure_ascii=False), encoding="utf-8")
    if tokenizer_config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, ensure_ascii=False), encoding="utf-8")
    return tmp_path


# ---- encoding as the card describes ------------------------------------------


def test_no_dummy_prefix(tok):
    text = "吾輩は猫である"
    pieces = tok.pieces(tok.encode(text))
    assert pieces == ["吾輩は", "猫である"]
    assert not pieces[0].startswith("▁")
    assert "".join(pieces) == text


def test_every_space_is_kept(tok):
    text = "  吾輩は  猫である   "
    pieces = tok.pieces(tok.encode(text))
    assert pieces[:2] == ["▁", "▁"]
    assert pieces[-3:] == ["▁", "▁", "▁"]
    assert "".join(pieces).count("▁") == 7 == text.count(" ")
    assert "".join(pieces).replace("▁", " ") == text
    assert tok.decode(tok.encode(text)) == text


def test_mixed_scripts_round_trip_exactly(tok):
    text = "გამარჯობა  吾輩は  猫である   "
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    pieces = tok.pieces(ids)
    # Georgian is not in the training text: 9 letters x 3 UTF-8 bytes
    assert all(BYTE_PIECE.fullmatch(p) for p in pieces[:27])
    assert pieces[:3] == ["<0xE1>", "<0x83>", "<0x92>"]  # "გ" = E1 83 92
    assert pieces[27:] == ["▁", "▁", "吾輩は", "▁", "▁", "猫である", "▁", "▁", "▁"]


@pytest.mark.parametrize("char", ["🍣", "𠮷", "龘"])
def test_unseen_characters_use_byte_fallback(tok, char):
    assert char not in "".join(CORPUS)
    ids = tok.encode(char)
    pieces = tok.pieces(ids)
    assert pieces == [f"<0x{b:02X}>" for b in char.encode("utf-8")]
    assert tok.special.unk not in ids
    assert tok.decode(ids) == char


def test_byte_fallback_pieces_for_emoji(tok):
    pieces = tok.pieces(tok.encode("🍣𠮷龘"))
    assert pieces == ["<0xF0>", "<0x9F>", "<0x8D>", "<0xA3>", "<0xF0>", "<0xA0>", "<0xAE>", "<0xB7>", "<0xE9>", "<0xBE>", "<0x98>"]
    assert tok.decode(tok.encode("寿司🍣と𠮷野家の龘")) == "寿司🍣と𠮷野家の龘"


def test_encode_adds_no_special_tokens(tok):
    assert tok.encode("") == []
    ids = tok.encode("吾輩は猫である")
    assert ids == [tok.sp.piece_to_id("吾輩は"), tok.sp.piece_to_id("猫である")]
    for special in (BOS_ID, EOS_ID, PAD_ID, UNK_ID):
        assert special not in ids


def test_decode_drops_end_of_text(tok):
    ids = tok.encode("猫である")
    assert tok.decode(ids + [tok.special.eos]) == "猫である"


def test_prompt_ends_with_space_piece_and_nl_is_one_token(tok):
    prompt = "ユーザー: 猫<NL>システム: "
    ids = tok.encode(prompt)
    pieces = tok.pieces(ids)
    assert pieces[-1] == "▁"
    assert pieces[-2] == ":"
    assert pieces.count("<NL>") == 1
    assert ids.count(tok.special.nl) == 1
    assert ids == tok.encode("ユーザー: 猫") + [tok.special.nl] + tok.encode("システム: ")
    assert tok.decode(ids) == prompt


def test_nl_never_merges(tok):
    assert tok.encode("<NL>") == [tok.special.nl]
    assert tok.encode("<NL><NL>") == [tok.special.nl] * 2
    assert tok.pieces(tok.encode("猫<NL>猫")) == ["猫", "<NL>", "猫"]
    assert tok.decode(tok.encode(" <NL> ")) == " <NL> "


def test_card_prompt_round_trips(tok):
    prompt = format_prompt(
        [
            (USER, "日本のおすすめの観光地を教えてください。"),
            (SYSTEM, "どの地域の観光地が知りたいですか?"),
            (USER, "渋谷の観光地を教えてください。"),
        ]
    )
    ids = tok.encode(prompt)
    assert tok.decode(ids) == prompt
    assert ids.count(tok.special.nl) == 3
    assert tok.pieces(ids)[-1] == "▁"


# ---- special tokens come from the folder --------------------------------------


def test_special_ids_without_json_files(tok):
    # defaults "<s>", "</s>", "<unk>", "<pad>"; this vocab calls its pad "[PAD]"
    assert tok.special.bos == BOS_ID
    assert tok.special.eos == EOS_ID
    assert tok.special.unk == UNK_ID
    assert tok.special.pad is None
    assert tok.special.nl == tok.sp.piece_to_id("<NL>")
    assert tok.vocab_size == tok.sp.get_piece_size()


def test_special_ids_from_rinna_files(tmp_path, spm_bytes):
    folder = rinna_folder(tmp_path, spm_bytes, SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG)
    special = Tokenizer.from_folder(folder).special
    assert (special.pad, special.unk, special.bos, special.eos) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)


@pytest.mark.parametrize("eos", ["。", {"content": "。", "lstrip": False, "rstrip": False}])
def test_eos_follows_special_tokens_map(tmp_path, spm_bytes, eos):
    folder = rinna_folder(tmp_path, spm_bytes, {**SPECIAL_TOKENS_MAP, "eos_token": eos}, TOKENIZER_CONFIG)
    tok = Tokenizer.from_folder(folder)
    assert tok.special.eos == tok.sp.piece_to_id("。") != EOS_ID
    assert tok.special.bos == BOS_ID


def test_special_tokens_map_wins_over_tokenizer_config(tmp_path, spm_bytes):
    folder = rinna_folder(
        tmp_path, spm_bytes, {"eos_token": "。"}, {**TOKENIZER_CONFIG, "eos_token": "、", "pad_token": "[PAD]"}
    )
    tok = Tokenizer.from_folder(folder)
    assert tok.special.eos == tok.sp.piece_to_id("。")
    assert tok.special.pad == PAD_ID  # only tokenizer_config.json names it


def test_eos_missing_from_vocab(tmp_path, spm_bytes):
    folder = rinna_folder(tmp_path, spm_bytes, {"eos_token": "<|endoftext|>"})
    with pytest.raises(ModelError, match=r"<\|endoftext\|>"):
        Tokenizer.from_folder(folder)


def test_invalid_json_file(tmp_path, spm_bytes):
    folder = rinna_folder(tmp_path, spm_bytes)
    (folder / "special_tokens_map.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelError) as err:
        Tokenizer.from_folder(folder)
    assert "special_tokens_map.json" in str(err.value)


# ---- broken folders ---------------------------------------------------------


def test_missing_spiece_model(tmp_path):
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ModelError) as err:
        Tokenizer.from_folder(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    assert "spiece.model" in message
    assert "\n" not in message


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="spiece.model"):
        Tokenizer.from_folder(tmp_path / "nope")


@pytest.mark.parametrize("content", [b"garbage, not a protobuf", b""])
def test_garbage_spiece_model(tmp_path, content):
    (tmp_path / "spiece.model").write_bytes(content)
    with pytest.raises(ModelError) as err:
        Tokenizer.from_folder(tmp_path)
    assert "spiece.model" in str(err.value)
    assert "sentencepiece" in str(err.value)


def test_spm_without_nl_is_refused(tmp_path):
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=writer,
        model_type="unigram",
        vocab_size=600,
        hard_vocab_limit=False,
        byte_fallback=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        pad_id=PAD_ID,
        pad_piece="[PAD]",
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        normalization_rule_name="identity",
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    (tmp_path / "spiece.model").write_bytes(writer.getvalue())
    with pytest.raises(ModelError) as err:
        Tokenizer.from_folder(tmp_path)
    assert "<NL>" in str(err.value)
    assert str(tmp_path) in str(err.value)


# ---- round trip property ------------------------------------------------------

# Excluded characters:
# - U+2581 "▁": sentencepiece's own whitespace marker; it decodes to a space.
# - category Cs (lone surrogates): not encodable as UTF-8 at all.
# Nothing else had to be excluded: controls, U+FFFD, BOM, private use,
# noncharacters, "\n"/"\r" (byte pieces) and literal "<s>"/"</s>" all round-trip.
ROUND_TRIP_TEXT = st.lists(
    st.one_of(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"),
        st.sampled_from([" ", "<NL>", "猫", "吾輩は", "<s>", "</s>", "[PAD]", "<unk>", "\t", "\u3000"]),
    ),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(ROUND_TRIP_TEXT)
def test_decode_encode_round_trips(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.special.unk not in ids


def test_space_marker_character_is_not_round_tripped(tok):
    """Documents the one exclusion above: a literal "▁" comes back as a space."""
    assert tok.decode(tok.encode("a\u2581b")) == "a b"


# ---- the engine's prompt is the card's prompt -----------------------------------


def conversation_and_turns(tok, turns):
    conversation = Conversation(tok)
    for speaker, text in turns:
        if speaker == USER:
            conversation.add_user(text)
        else:
            conversation.add_reply(text)
    return conversation


ONE_TURN = [(USER, "日本のおすすめの観光地を教えてください。")]
THREE_TURNS = [
    (USER, "日本のおすすめの観光地を教えてください。"),
    (SYSTEM, "どの地域の観光地が知りたいですか?"),
    (USER, "渋谷の観光地を教えてください。"),
]
FIVE_TURNS = [
    (USER, "  吾輩は\n猫である  "),
    (SYSTEM, "分かりました。\n1. ハチ公像です。"),
    (USER, "🍣 と 𠮷 は?\r\n"),
    (SYSTEM, " 世界で一番高い山はエベレストです。 "),
    (USER, "ありがとう"),
]


@pytest.mark.parametrize("turns", [ONE_TURN, THREE_TURNS, FIVE_TURNS], ids=["1-turn", "3-turn", "5-turn"])
def test_conversation_prompt_ids_equal_card_prompt(tok, turns):
    conversation = conversation_and_turns(tok, turns)
    assert conversation.prompt_text() == format_prompt(turns)
    assert conversation.prompt_ids() == tok.encode(format_prompt(turns))


def test_conversation_3_turn_is_the_cards_example(tok):
    conversation = conversation_and_turns(tok, THREE_TURNS)
    assert tok.decode(conversation.prompt_ids()) == (
        "ユーザー: 日本のおすすめの観光地を教えてください。<NL>システム: どの地域の観光地が知りたいですか?"
        "<NL>ユーザー: 渋谷の観光地を教えてください。<NL>システム: "
    )


CONVERSATION_TEXT = st.lists(
    st.one_of(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"),
        st.sampled_from([" ", "\n", "\r\n", "<NL>", "猫", "ユーザー: ", "システム: "]),
    ),
    max_size=12,
).map("".join)


@settings(max_examples=150, deadline=None)
@given(st.lists(CONVERSATION_TEXT, min_size=1, max_size=5))
def test_conversation_prompt_ids_property(tok, texts):
    turns = [(USER if i % 2 == 0 else SYSTEM, text) for i, text in enumerate(texts)]
    conversation = conversation_and_turns(tok, turns)
    assert conversation.prompt_ids() == tok.encode(format_prompt(turns))


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory):
    """A vocabulary that, unlike the tiny one, holds pieces that start with "▁" ("▁t", "▁house", ...)."""
    folder = tmp_path_factory.mktemp("spm_words")
    lines = CORPUS + ["the cat is on the mat and the dog is in the house"] * 20
    (folder / "spiece.model").write_bytes(train_spm(lines, vocab_size=700))
    tok = Tokenizer.from_folder(folder)
    assert "▁house" in tok.pieces(range(tok.vocab_size))
    return tok


def test_user_turns_match_card_with_space_words(word_tok):
    turns = [(USER, "the house"), (USER, " a cat\nin the house ")]
    conversation = conversation_and_turns(word_tok, turns)
    assert conversation.prompt_ids() == word_tok.encode(format_prompt(turns))


def test_reply_turns_match_card_with_space_words(word_tok):
    turns = [(USER, "the cat"), (SYSTEM, "the house"), (USER, "a dog")]
    conversation = conversation_and_turns(word_tok, turns)
    assert conversation.prompt_ids() == word_tok.encode(format_prompt(turns))
