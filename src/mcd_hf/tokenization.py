"""Tokenizers for masked diffusion language models.

A masked diffusion LM needs one extra id, ``[MASK]``, that the tokenizer of an autoregressive
model usually lacks. MDLM (Sahoo et al. 2024, https://github.com/kuleshov-group/mdlm) appends it
as the *last* id so that ``mask_token_id == vocab_size - 1``; the builders here follow that rule.

- :func:`build_character_tokenizer`: one token per character of a fixed alphabet (id ``i`` is
  ``alphabet[i]``), the natural tokenizer of the synthetic known-likelihood sources.
- :func:`build_bpe_tokenizer`: a byte-level BPE trained with ``tokenizers`` on a list of texts.
- :func:`ensure_mask_token`: adds ``[MASK]`` to an existing tokenizer (e.g. GPT-2's) if missing.

All return ``transformers`` fast tokenizers that round-trip through ``save_pretrained`` and
``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

DEFAULT_MASK_TOKEN = "[MASK]"
DEFAULT_BPE_SPECIAL_TOKEN = "<|endoftext|>"


def build_character_tokenizer(
    alphabet: str,
    mask_token: str = DEFAULT_MASK_TOKEN,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    unk_token: str | None = None,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Builds a character-level tokenizer: every character of ``alphabet`` is its own token.

    Ids: ``alphabet[i]`` has id ``i``; then the optional special tokens in the order
    ``bos_token``, ``eos_token``, ``unk_token`` (each only if given and distinct); ``mask_token``
    is always the last id. Without optional special tokens the mask id is ``len(alphabet)``.
    Decoding joins the characters with no separator, so ``decode(encode(text)) == text``.

    Args:
        alphabet: The characters, each once (whitespace and newlines are allowed characters).
        mask_token: The ``[MASK]`` token string; must not be a single character of ``alphabet``.
        bos_token: Optional beginning-of-sequence token (used by block packing).
        eos_token: Optional end-of-sequence token (joins documents in block packing).
        unk_token: Optional token for characters outside ``alphabet``; without it, encoding such
            a character raises an error.
        model_max_length: Optional maximum length stored in the tokenizer config.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``mask_token_id == len(tokenizer) - 1``.
    """
    if not isinstance(alphabet, str) or len(alphabet) == 0:
        raise ValueError(f"alphabet must be a non-empty string of characters, got {alphabet!r}")
    if len(set(alphabet)) != len(alphabet):
        duplicates = sorted({c for c in alphabet if alphabet.count(c) > 1})
        raise ValueError(f"alphabet must list each character once; repeated: {duplicates!r}")
    specials = [tok for tok in (bos_token, eos_token, unk_token) if tok is not None]
    specials = list(dict.fromkeys(specials))  # bos == eos is allowed (GPT-2 style): one id
    for tok in specials + [mask_token]:
        if not isinstance(tok, str) or not tok:
            raise ValueError(f"special tokens must be non-empty strings, got {tok!r}")
        if tok in alphabet and len(tok) == 1:
            raise ValueError(f"special token {tok!r} collides with a character of the alphabet")
    if mask_token in specials:
        raise ValueError(f"mask_token {mask_token!r} must differ from bos/eos/unk tokens")

    vocab = {char: index for index, char in enumerate(alphabet)}
    for tok in specials + [mask_token]:
        vocab[tok] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=unk_token))
    # Isolate every character ([\s\S] also matches newlines) so each one maps to its own id.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(specials + [mask_token])

    kwargs = {"mask_token": mask_token, "clean_up_tokenization_spaces": False}
    if bos_token is not None:
        kwargs["bos_token"] = bos_token
    if eos_token is not None:
        kwargs["eos_token"] = eos_token
    if unk_token is not None:
        kwargs["unk_token"] = unk_token
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **kwargs)


def build_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    mask_token: str = DEFAULT_MASK_TOKEN,
    special_token: str = DEFAULT_BPE_SPECIAL_TOKEN,
    min_frequency: int = 2,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer (GPT-2 style) and appends a ``[MASK]`` token.

    As in GPT-2, one special token (``special_token``, id 0) serves as BOS and EOS. The mask token
    is added after training, so it is the last id.

    Args:
        texts: Training texts (any iterable of strings; consumed once).
        vocab_size: Total size of the vocabulary *including* the special token and ``[MASK]``;
            at least 258 (256 bytes plus the two special tokens).
        mask_token: The ``[MASK]`` token string.
        special_token: The BOS/EOS token string.
        min_frequency: Minimum pair frequency for a merge.
        model_max_length: Optional maximum length stored in the tokenizer config.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``mask_token_id == len(tokenizer) - 1``.
    """
    if not isinstance(vocab_size, int) or vocab_size < 258:
        raise ValueError(f"vocab_size must be an int >= 258 (256 bytes + 2 specials), got {vocab_size!r}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # the mask token takes the last id
        min_frequency=min_frequency,
        special_tokens=[special_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens([mask_token])
    kwargs = {
        "bos_token": special_token,
        "eos_token": special_token,
        "mask_token": mask_token,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **kwargs)


def ensure_mask_token(
    tokenizer: PreTrainedTokenizerBase, mask_token: str = DEFAULT_MASK_TOKEN
) -> PreTrainedTokenizerBase:
    """Adds a mask token to ``tokenizer`` (in place) when it has none.

    The added token gets the next free id, i.e. ``len(tokenizer) - 1`` afterwards, so a model
    built with ``vocab_size=len(tokenizer)`` has the MDLM layout. A tokenizer that already has a
    mask token is returned unchanged.

    Args:
        tokenizer: Any ``transformers`` tokenizer.
        mask_token: The token string to add when missing.

    Returns:
        The same tokenizer object.
    """
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise ValueError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    if tokenizer.mask_token is None or tokenizer.mask_token_id is None:
        tokenizer.add_special_tokens({"mask_token": mask_token})
    return tokenizer


def check_mask_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Returns the tokenizer's mask id, or raises a ``ValueError`` saying how to add one."""
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise ValueError(
            "tokenizer has no mask token; a masked diffusion LM needs one. Call "
            "mcd_hf.tokenization.ensure_mask_token(tokenizer) (or build it with "
            "build_character_tokenizer / build_bpe_tokenizer)."
        )
    return int(mask_id)


__all__ = [
    "build_character_tokenizer",
    "build_bpe_tokenizer",
    "ensure_mask_token",
    "check_mask_token",
]
