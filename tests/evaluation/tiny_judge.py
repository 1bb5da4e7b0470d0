"""A tiny GPT-2 judge and a character-level tokenizer with BOS/EOS, built offline for the tests."""

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

CHARACTERS = "abcdefgh"
SPECIAL_TOKENS = ["<bos>", "<eos>", "<pad>"]


def build_judge_tokenizer(with_bos: bool = True) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: ids 0-2 are <bos>, <eos>, <pad>, then one id per character."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    bos = {"bos_token": "<bos>"} if with_bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", **bos)


def build_judge(n_positions: int = 64) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(SPECIAL_TOKENS) + len(CHARACTERS),
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        initializer_range=0.3,  # peaked, position-dependent predictions, so wrong scoring shows
    )
    return GPT2LMHeadModel(config).eval()
