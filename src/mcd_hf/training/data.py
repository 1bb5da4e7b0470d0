"""Training data: load text with ``datasets``, tokenize, pack into fixed-length blocks, and batch per process.

Packing follows MDLM's "wrap" mode (Sahoo et al. 2024, ``mdlm/dataloader.py``): documents are tokenized without
special tokens, joined with EOS into one stream, and cut into blocks; each block is ``BOS + body + EOS`` when the
tokenizer has those tokens, so every block is exactly ``seq_len`` long and no padding is needed. The remainder of
each ``map`` batch that does not fill a block is dropped (as in transformers' ``run_clm.py``).

Batching is done here rather than by ``accelerator.prepare(dataloader)`` so that the order is a pure function of
``(seed, epoch, process)``: a resumed run jumps to the first unconsumed batch in O(1) (map-style data) or by
skipping batches (streaming data), and every process gets the same number of batches (no DDP hang at epoch end).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Any, Iterator

import datasets
import torch
from datasets import Dataset, DatasetDict, IterableDataset

from ..tokenization import check_mask_token
from .seeding import derive_seed

TEXT_EXTENSIONS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}


@dataclass
class DataArguments:
    """Where the training text comes from and how it is cut.

    Args:
        train_file: Local training file (.txt, .json, .jsonl, .csv).
        validation_file: Local validation file; when absent, ``validation_split_percentage`` of train is held out.
        dataset_name: A Hub dataset id or a local dataset folder (``datasets.load_dataset``).
        dataset_config_name: Its configuration name.
        text_column: The text column (json/csv/Hub data); .txt files have ``text``.
        seq_len: Tokens per training block (BOS and EOS included).
        streaming: Stream the data instead of downloading and caching it whole.
        validation_split_percentage: Percent of train held out when there is no validation split.
        max_validation_blocks: Cap on packed validation blocks (streaming: taken from the head of the stream).
        text_sample_by: How .txt files are split into documents: ``line``, ``paragraph`` or ``document``.
        preprocessing_num_workers: Processes for ``map`` (map-style data only).
        cache_dir: The ``datasets`` cache folder.
        overwrite_cache: Recompute tokenization instead of loading it from the cache.
        shuffle_buffer_size: Buffer of the approximate shuffle of streaming data.
    """

    train_file: str | None = None
    validation_file: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    text_column: str = "text"
    seq_len: int = 128
    streaming: bool = False
    validation_split_percentage: float = 5.0
    max_validation_blocks: int | None = 1000
    text_sample_by: str = "line"
    preprocessing_num_workers: int | None = None
    cache_dir: str | None = None
    overwrite_cache: bool = False
    shuffle_buffer_size: int = 10_000


def pack_blocks(
    token_lists: list[list[int]], seq_len: int, bos_token_id: int | None = None, eos_token_id: int | None = None
) -> list[list[int]]:
    """Joins documents with EOS and cuts the stream into ``seq_len`` blocks ``[BOS] + body + [EOS]``.

    Args:
        token_lists: The documents, tokenized without special tokens.
        seq_len: Length of every returned block.
        bos_token_id: Put at the start of every block when not None.
        eos_token_id: Appended after every document and at the end of every block when not None.

    Returns:
        The full blocks; the tail that does not fill a block is dropped.
    """
    body = seq_len - (bos_token_id is not None) - (eos_token_id is not None)
    if body < 1:
        raise ValueError(f"seq_len must leave room for at least one token besides BOS/EOS, got seq_len={seq_len}")
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        if eos_token_id is not None:
            stream.append(eos_token_id)
    head = [bos_token_id] if bos_token_id is not None else []
    tail = [eos_token_id] if eos_token_id is not None else []
    return [head + stream[start : start + body] + tail for start in range(0, len(stream) - body + 1, body)]


def _tokenize_and_pack_batch(examples, *, tokenizer, text_column, seq_len, bos_token_id, eos_token_id):
    texts = [text for text in examples[text_column] if text is not None]
    token_lists = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return {"input_ids": pack_blocks(token_lists, seq_len, bos_token_id, eos_token_id)}


def _pack_pretokenized_batch(examples, *, seq_len, bos_token_id, eos_token_id):
    return {"input_ids": pack_blocks(examples["input_ids"], seq_len, bos_token_id, eos_token_id)}


def _check_file(argument: str, path: str | None) -> str | None:
    if path is None:
        return None
    if not os.path.isfile(path):
        raise ValueError(f"{argument}: file {path!r} does not exist")
    extension = os.path.splitext(path)[1].lower()
    if extension not in TEXT_EXTENSIONS:
        raise ValueError(f"{argument}: expected a file ending in one of {sorted(TEXT_EXTENSIONS)}, got {path!r}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{argument}: file {path!r} is empty")
    return extension


def load_raw_datasets(args: DataArguments) -> DatasetDict | dict[str, Any]:
    """Loads the raw text as a ``DatasetDict`` (or a dict of ``IterableDataset`` when streaming) with a
    ``train`` and, when available, a ``validation`` split."""
    if (args.dataset_name is None) == (args.train_file is None):
        raise ValueError("give exactly one data source: dataset_name (Hub/local dataset) or train_file (local file)")
    if args.text_sample_by not in ("line", "paragraph", "document"):
        raise ValueError(f"text_sample_by must be 'line', 'paragraph' or 'document', got {args.text_sample_by!r}")
    if args.dataset_name is not None:
        raw = datasets.load_dataset(
            args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, streaming=args.streaming
        )
    else:
        train_extension = _check_file("train_file", args.train_file)
        validation_extension = _check_file("validation_file", args.validation_file)
        if validation_extension is not None and TEXT_EXTENSIONS[validation_extension] != TEXT_EXTENSIONS[train_extension]:
            raise ValueError("train_file and validation_file must have the same format (both text, json or csv)")
        data_files = {"train": args.train_file}
        if args.validation_file is not None:
            data_files["validation"] = args.validation_file
        builder = TEXT_EXTENSIONS[train_extension]
        kwargs = {"keep_linebreaks": True, "sample_by": args.text_sample_by} if builder == "text" else {}
        raw = datasets.load_dataset(
            builder, data_files=data_files, cache_dir=args.cache_dir, streaming=args.streaming, **kwargs
        )
    if "train" not in raw:
        raise ValueError(f"the dataset has no 'train' split (splits: {list(raw)})")
    return raw


def _columns(dataset: Dataset | IterableDataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)  # a stream with unknown features: read the names off its first row
    return list(first) if first is not None else []


def tokenize_and_pack(
    dataset: Dataset | IterableDataset,
    tokenizer,
    seq_len: int,
    *,
    text_column: str = "text",
    num_proc: int | None = None,
    load_from_cache_file: bool = True,
    desc: str | None = None,
) -> Dataset | IterableDataset:
    """Tokenizes ``dataset[text_column]`` in batches and packs it into ``seq_len`` blocks (see :func:`pack_blocks`).

    A dataset that already has ``input_ids`` and no ``text_column`` is packed as is (documents = rows).
    Map-style results are cached by ``datasets`` (keyed on the data, the tokenizer and ``seq_len``).
    """
    columns = _columns(dataset)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if text_column not in columns and "input_ids" in columns:
        function = functools.partial(_pack_pretokenized_batch, seq_len=seq_len, bos_token_id=bos, eos_token_id=eos)
    else:
        if text_column not in columns:
            raise ValueError(f"text_column {text_column!r} is not a column of the dataset (columns: {columns})")
        function = functools.partial(
            _tokenize_and_pack_batch, tokenizer=tokenizer, text_column=text_column, seq_len=seq_len,
            bos_token_id=bos, eos_token_id=eos,
        )
    kwargs: dict[str, Any] = {"batched": True, "remove_columns": columns}
    if isinstance(dataset, Dataset):
        kwargs.update(num_proc=num_proc, load_from_cache_file=load_from_cache_file, desc=desc)
    return dataset.map(function, **kwargs)


def check_pretokenized(dataset: Dataset, seq_len: int, vocab_size: int | None, mask_token_id: int | None) -> Dataset:
    """Validates a pre-tokenized dataset of ``seq_len`` blocks (e.g. ``source.to_dataset(...)``); returns only its
    ``input_ids`` column."""
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"a pre-tokenized dataset needs an 'input_ids' column, got {dataset.column_names}")
    dataset = dataset.select_columns(["input_ids"])
    if len(dataset) == 0:
        raise ValueError("the pre-tokenized dataset is empty")
    ids = dataset.with_format("torch")[:]["input_ids"]  # (N, L), or a list of tensors when rows are ragged
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[1] != seq_len:
        lengths = sorted({len(row) for row in ids}) if not isinstance(ids, torch.Tensor) else [ids.shape[-1]]
        raise ValueError(f"pre-tokenized rows must all have length seq_len={seq_len}, got lengths {lengths[:5]}")
    if ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size):
        raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
    if mask_token_id is not None and bool((ids == mask_token_id).any()):
        raise ValueError(f"the training data contains the mask token id {mask_token_id}; clean data must not")
    return dataset


@dataclass
class TrainingData:
    """Packed datasets of ``{"input_ids": [seq_len ints]}`` rows ready for :func:`iterate_train_batches`."""

    train: Dataset | IterableDataset
    validation: Dataset | None
    seq_len: int
    description: str


def _empty_error(split: str, seq_len: int) -> ValueError:
    return ValueError(
        f"the {split} set is empty after tokenization and packing into blocks of seq_len={seq_len} tokens: give "
        "more text or a smaller seq_len"
    )


def prepare_training_data(
    args: DataArguments,
    tokenizer,
    *,
    max_position_embeddings: int | None = None,
    vocab_size: int | None = None,
    main_process_first=None,
    train_dataset: Dataset | None = None,
    validation_dataset: Dataset | None = None,
) -> TrainingData:
    """Loads, tokenizes and packs the data; every check runs here, before any training.

    Args:
        args: The data arguments.
        tokenizer: A tokenizer with a mask token (see :func:`mcd_hf.tokenization.ensure_mask_token`).
        max_position_embeddings: The model's longest sequence; ``seq_len`` must not exceed it.
        vocab_size: The model's vocabulary; the tokenizer's ids must fit in it.
        main_process_first: ``accelerator.main_process_first`` so only rank 0 writes the ``datasets`` cache.
        train_dataset: A pre-tokenized ``datasets.Dataset`` (``input_ids`` rows of length ``seq_len``) used instead of
            ``args``' files (e.g. ``get_source("markov").to_dataset(n, seq_len, seed)``).
        validation_dataset: Its validation counterpart; when None, ``validation_split_percentage`` is held out.
    """
    seq_len = args.seq_len
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if max_position_embeddings is not None and seq_len > max_position_embeddings:
        raise ValueError(
            f"seq_len={seq_len} is larger than the model's max_position_embeddings={max_position_embeddings}"
        )
    mask_token_id = check_mask_token(tokenizer) if tokenizer is not None else None
    if tokenizer is not None and vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} ids but the model's vocab_size is {vocab_size}")
    if not 0 <= args.validation_split_percentage < 100:
        raise ValueError(f"validation_split_percentage must be in [0, 100), got {args.validation_split_percentage}")
    context = main_process_first() if main_process_first is not None else contextlib.nullcontext()

    if train_dataset is not None:
        train = check_pretokenized(train_dataset, seq_len, vocab_size, mask_token_id)
        validation = (
            check_pretokenized(validation_dataset, seq_len, vocab_size, mask_token_id)
            if validation_dataset is not None else None
        )
        if validation is None and args.validation_split_percentage > 0:
            split = train.train_test_split(test_size=args.validation_split_percentage / 100, shuffle=False)
            train, validation = split["train"], split["test"]
        description = f"pre-tokenized dataset ({len(train)} blocks)"
        return TrainingData(train, validation, seq_len, description)

    if tokenizer is None:
        raise ValueError("tokenizer is required to tokenize text data")
    with context:
        raw = load_raw_datasets(args)
        if args.streaming:
            train = tokenize_and_pack(raw["train"], tokenizer, seq_len, text_column=args.text_column)
            if "validation" in raw:
                validation_stream = tokenize_and_pack(raw["validation"], tokenizer, seq_len, text_column=args.text_column)
            else:  # hold out the head of the stream
                count = args.max_validation_blocks or 100
                validation_stream, train = train.take(count), train.skip(count)
            blocks = list(validation_stream.take(args.max_validation_blocks or 1000))
            validation = Dataset.from_list(blocks) if blocks else None
            if next(iter(train.take(1)), None) is None:
                held_out = "" if "validation" in raw else f" after holding out {len(blocks)} validation blocks"
                raise ValueError(
                    f"the streamed train set is empty{held_out} (blocks of seq_len={seq_len}); give more text, a "
                    "validation split or a smaller max_validation_blocks"
                )
        else:
            raw_train, raw_validation = raw["train"], raw.get("validation")
            if len(raw_train) == 0:
                raise ValueError("the training data is empty (no rows)")
            if raw_validation is None and args.validation_split_percentage > 0 and len(raw_train) > 1:
                split = raw_train.train_test_split(test_size=args.validation_split_percentage / 100, shuffle=False)
                raw_train, raw_validation = split["train"], split["test"]
            common = {"text_column": args.text_column, "num_proc": args.preprocessing_num_workers,
                      "load_from_cache_file": not args.overwrite_cache}
            train = tokenize_and_pack(raw_train, tokenizer, seq_len, desc="Packing train", **common)
            if len(train) == 0:
                raise _empty_error("train", seq_len)
            validation = None
            if raw_validation is not None:
                validation = tokenize_and_pack(raw_validation, tokenizer, seq_len, desc="Packing validation", **common)
                if args.max_validation_blocks is not None and len(validation) > args.max_validation_blocks:
                    validation = validation.select(range(args.max_validation_blocks))
    if validation is not None and len(validation) == 0:
        raise _empty_error("validation", seq_len)
    source = args.dataset_name or args.train_file
    return TrainingData(train, validation, seq_len, str(source))


# ---------------------------------------------------------------------------------------------------------------
# Batching


def _collate(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([row["input_ids"] for row in rows], dtype=torch.long)


def num_batches_per_epoch(num_examples: int, batch_size: int, num_processes: int) -> int:
    """Per-process batches in one epoch of map-style data (the last incomplete global batch is dropped)."""
    return num_examples // (batch_size * num_processes)


def iterate_train_batches(
    dataset: Dataset | IterableDataset,
    batch_size: int,
    *,
    seed: int,
    start_batch: int = 0,
    num_processes: int = 1,
    process_index: int = 0,
    shuffle_buffer_size: int = 10_000,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yields ``(epoch, input_ids (batch_size, seq_len))`` forever, starting at this process's batch ``start_batch``.

    Map-style data: epoch ``e`` is the permutation seeded by ``(seed, e)``; global batch ``b`` is
    ``perm[b*P*B : (b+1)*P*B]`` and process ``p`` takes its ``p``-th slice of ``B`` rows, so the whole run's order is a
    pure function of ``seed`` and resuming at ``start_batch`` costs nothing. Streaming data: each process reads its
    own shard (``split_dataset_by_node``), shuffled with a buffer re-seeded per epoch; resuming skips batches.
    """
    if isinstance(dataset, IterableDataset):
        yield from _iterate_stream(dataset, batch_size, seed, start_batch, num_processes, process_index, shuffle_buffer_size)
        return
    per_epoch = num_batches_per_epoch(len(dataset), batch_size, num_processes)
    if per_epoch == 0:
        raise ValueError(
            f"the train set has {len(dataset)} blocks, fewer than one global batch of train_batch_size={batch_size} x "
            f"{num_processes} processes"
        )
    epoch, batch_index = divmod(start_batch, per_epoch)
    global_batch = batch_size * num_processes
    while True:
        generator = torch.Generator().manual_seed(derive_seed(seed, "data-order", epoch))
        order = torch.randperm(len(dataset), generator=generator)
        for index in range(batch_index, per_epoch):
            start = index * global_batch + process_index * batch_size
            rows = dataset[order[start : start + batch_size].tolist()]["input_ids"]
            yield epoch, torch.tensor(rows, dtype=torch.long)
        epoch, batch_index = epoch + 1, 0


def _iterate_stream(dataset, batch_size, seed, start_batch, num_processes, process_index, buffer_size):
    from datasets.distributed import split_dataset_by_node

    if num_processes > 1:
        dataset = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
    dataset = dataset.shuffle(seed=derive_seed(seed, "stream-order") % 2**32, buffer_size=buffer_size)
    produced = 0
    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        rows: list[dict] = []
        batches_this_epoch = 0
        for row in dataset:
            rows.append(row)
            if len(rows) == batch_size:
                batches_this_epoch += 1
                if produced >= start_batch:
                    yield epoch, _collate(rows)
                produced += 1
                rows = []
        if batches_this_epoch == 0:
            raise ValueError(f"process {process_index}'s shard of the streamed train set holds less than one batch")
        epoch += 1


def iterate_eval_batches(
    dataset: Dataset, batch_size: int, *, num_processes: int = 1, process_index: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields ``(input_ids, weight)`` over this process's share of ``dataset`` in order.

    Every process yields the same number of batches (collectives stay in step); rows padded to even the count out
    repeat row 0 and have ``weight`` 0, so weighted sums reduced over processes count each row exactly once.
    """
    total = len(dataset)
    per_process = -(-total // num_processes)
    num_batches = -(-per_process // batch_size)
    indices = list(range(process_index, total, num_processes))
    for batch in range(num_batches):
        chunk = indices[batch * batch_size : (batch + 1) * batch_size]
        weight = [1.0] * len(chunk) + [0.0] * (batch_size - len(chunk))
        chunk = chunk + [0] * (batch_size - len(chunk))
        rows = dataset[chunk]["input_ids"]
        yield torch.tensor(rows, dtype=torch.long), torch.tensor(weight)


__all__ = [
    "DataArguments",
    "TrainingData",
    "pack_blocks",
    "tokenize_and_pack",
    "load_raw_datasets",
    "check_pretokenized",
    "prepare_training_data",
    "iterate_train_batches",
    "iterate_eval_batches",
    "num_batches_per_epoch",
]
