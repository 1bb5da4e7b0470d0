"""Tokenizer builders: id layout (mask last), exact round trips, save/load through AutoTokenizer."""

import pytest
from transformers import AutoTokenizer

from mcd_hf.tokenization import (
    build_bpe_tokenizer,
    build_character_tokenizer,
    check_mask_token,
    ensure_mask_token,
)

ALPHABET = "abc xyz\n.,"


def test_character_ids_follow_alphabet_and_mask_is_last():
    tokenizer = build_character_tokenizer(ALPHABET)
    for index, char in enumerate(ALPHABET):
        assert tokenizer.convert_tokens_to_ids(char) == index
    assert tokenizer.mask_token_id == len(ALPHABET) == len(tokenizer) - 1
    assert tokenizer("ab c\n", add_special_tokens=False)["input_ids"] == [0, 1, 3, 2, 7]


def test_character_decode_joins_without_spaces_and_round_trips():
    tokenizer = build_character_tokenizer(ALPHABET)
    text = "abc  x.y,z\n\ncab"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_character_special_tokens_precede_mask():
    tokenizer = build_character_tokenizer("ab", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.mask_token_id) == (2, 3, 4, 5)
    assert len(tokenizer) == 6
    assert tokenizer("aqb", add_special_tokens=False)["input_ids"] == [0, 4, 1]  # unknown char -> [UNK]
    assert tokenizer.decode([2, 0, 1, 3], skip_special_tokens=True) == "ab"
    # No automatic special tokens: packing adds BOS/EOS itself.
    assert tokenizer("ab")["input_ids"] == [0, 1]


def test_character_save_and_auto_load(tmp_path):
    tokenizer = build_character_tokenizer(ALPHABET, bos_token="[BOS]", eos_token="[EOS]")
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "zyx cab.\n"
    assert loaded(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
    assert (loaded.mask_token_id, loaded.bos_token_id, loaded.eos_token_id) == (
        tokenizer.mask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alphabet": ""}, "alphabet"),
        ({"alphabet": "abca"}, "once"),
        ({"alphabet": "ab", "mask_token": "a"}, "collides"),
        ({"alphabet": "ab", "bos_token": "[M]", "mask_token": "[M]"}, "mask_token"),
    ],
)
def test_character_bad_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_character_tokenizer(**kwargs)


def test_bpe_round_trip_mask_last_and_auto_load(tmp_path):
    texts = ["the cat sat on the mat", "a dog ate the hat", "the mat is flat"] * 50
    tokenizer = build_bpe_tokenizer(texts, vocab_size=300)
    assert tokenizer.mask_token_id == len(tokenizer) - 1
    assert len(tokenizer) <= 300
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == 0
    text = "the hat sat on a flat cat"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text)  # merges were learned
    assert tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.mask_token_id == tokenizer.mask_token_id


def test_bpe_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        build_bpe_tokenizer(["abc"], vocab_size=100)


def test_ensure_mask_token_adds_last_id_once(tmp_path):
    tokenizer = build_bpe_tokenizer(["hello world"] * 20, vocab_size=280)
    # A tokenizer without a mask token: rebuild one from the same backend minus the mask.
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    bare.mask_token = None
    with pytest.raises(ValueError, match="no mask token"):
        check_mask_token(bare)
    size = len(bare)
    ensure_mask_token(bare, "[NEWMASK]")
    assert bare.mask_token == "[NEWMASK]"
    assert bare.mask_token_id == size == len(bare) - 1
    ensure_mask_token(bare)  # already present: unchanged
    assert len(bare) == size + 1
    bare.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).mask_token_id == size
