"""ReplyDecoder: characters appear as soon as they are complete, and the chunks always add up to the reply."""

from __future__ import annotations

import codecs
import io
import random

import pytest
import sentencepiece as spm
from hypothesis import given, settings, strategies as st

from rinna_cli.errors import ModelError
from rinna_cli.prompt import NL, decode_newlines
from rinna_cli.streamer import ReplyDecoder
from rinna_cli.tokenizer import Tokenizer

TRAINING_TEXT = [
    "吾輩は猫である。名前はまだ無い。",
    "どこで生れたかとんと見当がつかぬ。",
    "日本のおすすめの観光地を教えてください。",
    "ユーザー: こんにちは<NL>システム: はい、分かりました。",
    "1. ハチ公像です。2. スクランブル交差点です。",
    "Hello world, this is a test.",
    "The quick brown fox jumps over the lazy dog.",
    "a < b and c > d, NL NL NL",
    "<< >> < > N L NL NL",
    "  吾輩は  猫である   ",
    "NL NL NL NL",
    "<NL> NL <",
    "x>y NL<z",
]

SUSHI = "🍣"  # 4 UTF-8 bytes, not in the vocabulary
IWASHI = "鰯"  # 3 UTF-8 bytes, not in the vocabulary
YOSHI = "𠮷"  # 4 UTF-8 bytes, a rare kanji outside the BMP

# What random replies are made of: frequent and rare characters, emoji, and every piece of "<NL>".
ALPHABET = [
    *"あいうえおかきくけこはまだ無吾輩猫名前観光地。、ー",
    *"abcdeHTlowNL <>:.,",
    "  ",
    "<NL>",
    "<N",
    "L>",
    SUSHI,
    IWASHI,
    YOSHI,
    "é",
    "😀",
    "\u00a0",
    "\ufffd",
]


def stream_chunks(tokenizer: Tokenizer, ids) -> list[str]:
    """What a ``ReplyDecoder`` returns for each id pushed one at a time, then for ``finish()``."""
    decoder = ReplyDecoder(tokenizer)
    return [decoder.push([pid]) for pid in ids] + [decoder.finish()]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT * 20),
        model_writer=model,
        vocab_size=400,
        model_type="unigram",
        byte_fallback=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        user_defined_symbols=[NL],
        pad_id=0,
        pad_piece="[PAD]",
        unk_id=1,
        bos_id=2,
        eos_id=3,
        normalization_rule_name="identity",
        character_coverage=1.0,
        minloglevel=2,
        hard_vocab_limit=False,
        num_threads=1,
    )
    folder = tmp_path_factory.mktemp("spm")
    (folder / "spiece.model").write_bytes(model.getvalue())
    return Tokenizer.from_folder(folder)


def piece_ids(tok: Tokenizer, *pieces: str) -> list[int]:
    """Ids of vocabulary pieces, each of which must exist."""
    ids = [tok.sp.piece_to_id(p) for p in pieces]
    assert tok.pieces(ids) == list(pieces)
    return ids


def byte_ids(tok: Tokenizer, text: str) -> list[int]:
    """The byte-fallback pieces of ``text``'s UTF-8 bytes."""
    return piece_ids(tok, *(f"<0x{b:02X}>" for b in text.encode()))


def push_all(decoder: ReplyDecoder, ids: list[int], sizes: list[int]) -> list[str]:
    """Push ``ids`` in consecutive chunks of ``sizes`` (then the rest), then finish."""
    chunks, start = [], 0
    for size in [*sizes, len(ids)]:
        chunks.append(decoder.push(ids[start : start + size]))
        start += size
    return [*chunks, decoder.finish()]


def printable_prefix(tok: Tokenizer, ids: list[int]) -> str:
    """What should be on screen after ``ids`` of valid text: every complete character, minus a partial ``<NL>``."""
    data = b""
    for piece, pid in zip(tok.pieces(ids), ids):
        data += bytes([int(piece[3:5], 16)]) if tok.sp.is_byte(pid) else tok.decode([pid]).encode()
    text = codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    for size in (3, 2, 1):
        if text.endswith(NL[:size]):
            text = text[:-size]
            break
    return decode_newlines(text)


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 25)))


# --- sentencepiece facts the decoder is built on -------------------------------------------


def test_sentencepiece_decodes_byte_runs_per_character(tok):
    """A byte run is read one character at a time; each byte not in a valid character is one U+FFFD."""
    d = tok.decode
    ka = byte_ids(tok, "か")
    assert d(byte_ids(tok, SUSHI)[:2]) == "\ufffd\ufffd"
    assert d(ka + byte_ids(tok, SUSHI)[:2]) == "か\ufffd\ufffd"  # the complete か does not vanish
    assert d(byte_ids(tok, SUSHI)[:2] + piece_ids(tok, "a") + ka) == "\ufffd\ufffdaか"
    assert d(piece_ids(tok, "<0xE3>", "<0x81>", "<0xE3>", "<0x81>", "<0x82>")) == "\ufffd\ufffdあ"
    assert d(piece_ids(tok, "<0xED>", "<0xA0>", "<0x80>")) == "\ufffd" * 3  # a surrogate
    assert d(piece_ids(tok, "<0xC0>", "<0x80>")) == "\ufffd" * 2  # overlong
    assert d(piece_ids(tok, "<0x80>", "<0xFF>") + ka) == "\ufffd\ufffdか"
    assert d(byte_ids(tok, "\ufffd")) == "\ufffd"
    # a non-byte piece, even an invisible control one, ends the run
    sushi = byte_ids(tok, SUSHI)
    assert d(sushi[:2] + [tok.special.bos] + sushi[2:]) == "\ufffd" * 4
    assert d(sushi[:2] + [tok.special.nl] + sushi[2:]) == "\ufffd\ufffd<NL>\ufffd\ufffd"


# --- characters appear as soon as they are complete ----------------------------------------


def test_kana_kanji_punctuation_and_latin_appear_immediately(tok):
    ids = piece_ids(tok, "吾", "輩", "は", "猫", "。", "名", "前", "、", "H", "e", "l", "l", "o", "▁", "w", ".")
    assert stream_chunks(tok, ids) == [*"吾輩は猫。名前、Hello w.", ""]


def test_multi_character_pieces_appear_whole(tok):
    ids = tok.encode("吾輩は猫である。Hello world")
    expected = [tok.decode([i]) for i in ids]
    assert stream_chunks(tok, ids) == [*expected, ""]
    assert "".join(expected) == "吾輩は猫である。Hello world"


def test_spaces_are_kept(tok):
    ids = piece_ids(tok, "▁", "▁", "吾", "▁")
    assert stream_chunks(tok, ids) == [" ", " ", "吾", " ", ""]


def test_emoji_from_byte_pieces_arrives_whole(tok):
    ids = piece_ids(tok, "か") + byte_ids(tok, SUSHI) + piece_ids(tok, "、")
    assert stream_chunks(tok, ids) == ["か", "", "", "", SUSHI, "、", ""]


def test_rare_kanji_from_byte_pieces_arrive_whole(tok):
    ids = byte_ids(tok, IWASHI) + byte_ids(tok, YOSHI) + byte_ids(tok, "A")
    assert stream_chunks(tok, ids) == ["", "", IWASHI, "", "", "", YOSHI, "A", ""]


def test_unfinished_character_at_the_end_is_shown_as_sentencepiece_decodes_it(tok):
    ids = piece_ids(tok, "か") + byte_ids(tok, SUSHI)[:3]
    assert stream_chunks(tok, ids) == ["か", "", "", "", "\ufffd" * 3]


def test_bytes_that_cannot_become_a_character_are_shown_at_once(tok):
    ids = piece_ids(tok, "<0x80>", "<0xE3>", "<0x41>", "<0xC0>", "<0xE3>", "<0x81>", "<0x8B>")
    assert stream_chunks(tok, ids) == ["\ufffd", "", "\ufffdA", "\ufffd", "", "", "か", ""]


def test_an_invalid_byte_does_not_swallow_the_character_after_it(tok):
    """E3 E3 81 8B is U+FFFD then か: the run is cut after the lone E3, not after three bytes."""
    decoder = ReplyDecoder(tok)
    ids = piece_ids(tok, "<0xE3>", "<0xE3>", "<0x81>", "<0x8B>")
    assert push_all(decoder, ids, [3]) == ["\ufffd", "か", ""]


def test_unfinished_character_broken_by_a_normal_piece(tok):
    ids = byte_ids(tok, SUSHI)[:2] + piece_ids(tok, "a")
    assert stream_chunks(tok, ids) == ["", "", "\ufffd\ufffda", ""]


# --- <NL> ---------------------------------------------------------------------------------


def test_nl_piece_is_a_newline(tok):
    ids = piece_ids(tok, "か", NL, "は")
    assert stream_chunks(tok, ids) == ["か", "\n", "は", ""]


def test_nl_split_over_pieces_is_a_newline(tok):
    assert stream_chunks(tok, piece_ids(tok, "<", "NL", ">")) == ["", "", "\n", ""]
    assert stream_chunks(tok, piece_ids(tok, "か", "<", "N", "L", ">", "は")) == ["か", "", "", "", "\n", "は", ""]


def test_nl_split_over_byte_pieces_is_a_newline(tok):
    assert stream_chunks(tok, byte_ids(tok, "<NL>")) == ["", "", "", "\n", ""]
    assert stream_chunks(tok, byte_ids(tok, "<N") + byte_ids(tok, "L>")) == ["", "", "", "\n", ""]


def test_partial_nl_is_released_when_it_cannot_become_one(tok):
    assert stream_chunks(tok, piece_ids(tok, "<", "a")) == ["", "<a", ""]
    assert stream_chunks(tok, piece_ids(tok, "<", "<", "N", "L", ">")) == ["", "<", "", "", "\n", ""]
    assert stream_chunks(tok, piece_ids(tok, "<", "N", ">")) == ["", "", "<N>", ""]


def test_trailing_partial_nl_is_shown_literally_at_the_end(tok):
    assert stream_chunks(tok, piece_ids(tok, "か", "<")) == ["か", "", "<"]
    assert stream_chunks(tok, piece_ids(tok, "<", "NL")) == ["", "", "<NL"]


# --- end of text ---------------------------------------------------------------------------


def test_eos_is_never_shown_and_ends_the_reply(tok):
    eos = tok.special.eos
    decoder = ReplyDecoder(tok)
    assert decoder.push(piece_ids(tok, "か", "<") + [eos] + piece_ids(tok, "は")) == "か<"
    assert decoder.push(piece_ids(tok, "は")) == ""
    assert decoder.finish() == ""
    assert decoder.ids == piece_ids(tok, "か", "<")
    assert decoder.text == "か<"


def test_eos_flushes_an_unfinished_character(tok):
    decoder = ReplyDecoder(tok)
    assert decoder.push(byte_ids(tok, SUSHI)[:2]) == ""
    assert decoder.push([tok.special.eos] + byte_ids(tok, SUSHI)[2:]) == "\ufffd\ufffd"
    assert decoder.text == "\ufffd\ufffd"


def test_finish_twice_and_empty_reply(tok):
    decoder = ReplyDecoder(tok)
    assert decoder.push([]) == ""
    assert decoder.finish() == ""
    assert decoder.finish() == ""
    assert decoder.text == ""
    assert stream_chunks(tok, [tok.special.eos]) == ["", ""]


def test_id_outside_the_vocabulary_is_refused_without_losing_state(tok):
    decoder = ReplyDecoder(tok)
    assert decoder.push(piece_ids(tok, "か")) == "か"
    with pytest.raises(ModelError, match="outside the tokenizer"):
        decoder.push([tok.vocab_size])
    assert decoder.push(piece_ids(tok, "は")) == "は"
    assert decoder.ids == piece_ids(tok, "か", "は")


# --- properties ----------------------------------------------------------------------------


def test_random_texts_stream_exactly_and_without_replacement_characters(tok):
    rng = random.Random(1234)
    for _ in range(1500):
        text = random_text(rng)
        ids = tok.encode(text)
        chunks = stream_chunks(tok, ids)
        expected = decode_newlines(text)
        assert "".join(chunks) == expected
        shown = ""
        for count, chunk in enumerate(chunks[:-1], start=1):
            shown += chunk
            assert shown == printable_prefix(tok, ids[:count])
        if "\ufffd" not in text:
            assert not any("\ufffd" in chunk for chunk in chunks)
        decoder = ReplyDecoder(tok)
        sizes = [rng.randint(0, 5) for _ in range(rng.randint(0, 6))]
        chunks = push_all(decoder, ids, sizes)
        assert "".join(chunks) == expected == decoder.text
        assert decoder.ids == ids
        if "\ufffd" not in text:
            assert not any("\ufffd" in chunk for chunk in chunks)


def interesting_ids(tok: Tokenizer) -> st.SearchStrategy[int]:
    """Any id, weighted towards bytes, special pieces and the pieces of ``<NL>``."""
    byte_ids_ = [i for i in range(tok.vocab_size) if tok.sp.is_byte(i)]
    lead_and_trail = [i for i in byte_ids_ if int(tok.pieces([i])[0][3:5], 16) >= 0x80]
    specials = [i for i in (tok.special.eos, tok.special.unk, tok.special.bos, tok.special.nl, 0) if i is not None]
    nl_parts = [tok.sp.piece_to_id(p) for p in ("<", "N", "L", ">", "NL")]
    return st.one_of(
        st.integers(0, tok.vocab_size - 1),
        st.sampled_from(byte_ids_),
        st.sampled_from(lead_and_trail),
        st.sampled_from(specials + nl_parts),
    )


def test_any_ids_stream_to_the_final_text(tok):
    @settings(max_examples=400, deadline=None)
    @given(ids=st.lists(interesting_ids(tok), max_size=40), sizes=st.lists(st.integers(0, 6), max_size=8))
    def check(ids, sizes):
        one_by_one = stream_chunks(tok, ids)
        decoder = ReplyDecoder(tok)
        chunked = push_all(decoder, ids, sizes)
        eos = tok.special.eos
        reply = ids[: ids.index(eos)] if eos in ids else ids
        final = decode_newlines(tok.decode(reply))
        assert decoder.ids == reply
        assert decoder.text == final
        assert "".join(one_by_one) == final
        assert "".join(chunked) == final

    check()


def test_cost_is_linear_in_reply_length(tok, monkeypatch):
    """2,000 ids pushed one at a time are decoded about once each, not once per push."""
    decoded = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids: decoded.append(len(ids)) or decode(ids))
    rng = random.Random(7)
    ids = []
    while len(ids) < 2000:
        ids += tok.encode(random_text(rng))
    ids = ids[:2000]
    bytes_only = byte_ids(tok, (SUSHI + IWASHI + "か") * 200)[:2000]
    for reply in (ids, bytes_only):
        decoded.clear()
        decoder = ReplyDecoder(tok)
        for pid in reply:
            decoder.push([pid])
        decoder.finish()
        assert sum(decoded) == len(reply)  # every id is decoded exactly once
        assert max(decoded) <= 4  # a window is at most an unfinished character and the id that ends it
