"""Data: MDLM-style packing, local files, pre-tokenized sets, the per-process batch order, and clear input errors."""

import json

import pytest
import torch
from datasets import Dataset

from mcd_hf.tokenization import build_character_tokenizer
from mcd_hf.training.data import (
    DataArguments,
    iterate_eval_batches,
    iterate_train_batches,
    pack_blocks,
    prepare_training_data,
)

BOS, EOS = 100, 101


def test_pack_blocks_joins_documents_with_eos_and_wraps_blocks():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    # Stream: 1 2 3 E 4 5 E 6 7 8 9 E (12 tokens); body = 6 - 2 = 4 -> 3 blocks.
    blocks = pack_blocks(docs, seq_len=6, bos_token_id=BOS, eos_token_id=EOS)
    assert blocks == [[BOS, 1, 2, 3, EOS, EOS], [BOS, 4, 5, EOS, 6, EOS], [BOS, 7, 8, 9, EOS, EOS]]
    assert all(len(block) == 6 for block in blocks)


def test_pack_blocks_drops_the_tail_and_works_without_special_tokens():
    assert pack_blocks([[1, 2, 3, 4, 5]], seq_len=2) == [[1, 2], [3, 4]]
    assert pack_blocks([[1, 2, 3]], seq_len=3, eos_token_id=EOS) == [[1, 2, EOS], [3, EOS, EOS]]
    with pytest.raises(ValueError, match="seq_len"):
        pack_blocks([[1]], seq_len=2, bos_token_id=BOS, eos_token_id=EOS)


@pytest.fixture()
def char_tokenizer():
    return build_character_tokenizer("abcdefghijklmnopqrstuvwxyz \n", bos_token="[BOS]", eos_token="[EOS]")


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_local_text_file_packs_into_blocks(tmp_path, char_tokenizer):
    lines = ["the quick brown fox\n", "jumps over\n", "the lazy dog\n"] * 40
    train = _write(tmp_path / "train.txt", "".join(lines))
    args = DataArguments(train_file=train, seq_len=16, cache_dir=str(tmp_path / "cache"), validation_split_percentage=10)
    data = prepare_training_data(args, char_tokenizer, max_position_embeddings=16, vocab_size=len(char_tokenizer))
    assert len(data.train) > 0 and len(data.validation) > 0
    ids = torch.tensor(data.train["input_ids"])
    assert ids.shape[1] == 16
    assert bool((ids[:, 0] == char_tokenizer.bos_token_id).all()) and bool((ids[:, -1] == char_tokenizer.eos_token_id).all())
    # Bodies concatenated give back the text with an EOS after each line (document).
    body = "".join(char_tokenizer.decode(row[1:-1]) for row in ids.tolist())
    expected = "[EOS]".join(lines[: len(body) // 10])
    assert body.startswith(expected[:200])


def test_jsonl_with_text_column_and_validation_file(tmp_path, char_tokenizer):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"body": "abc def ghi jkl"}) + "\n" for _ in range(30)))
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join(json.dumps({"body": "mno pqr stu"}) + "\n" for _ in range(10)))
    args = DataArguments(train_file=str(train), validation_file=str(valid), text_column="body", seq_len=8,
                         cache_dir=str(tmp_path / "cache"))
    data = prepare_training_data(args, char_tokenizer)
    assert char_tokenizer.decode(data.validation[0]["input_ids"][1:-1]) == "mno pq"
    bad = DataArguments(train_file=str(train), text_column="text", seq_len=8, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="text_column 'text'"):
        prepare_training_data(bad, char_tokenizer)


def test_pretokenized_dataset_is_used_unchanged():
    rows = torch.randint(0, 5, (20, 8))
    tokenizer = build_character_tokenizer("abcde")
    data = prepare_training_data(
        DataArguments(seq_len=8, validation_split_percentage=25), tokenizer,
        train_dataset=Dataset.from_dict({"input_ids": rows.tolist()}), vocab_size=6,
    )
    assert data.train["input_ids"] == rows[:15].tolist() and data.validation["input_ids"] == rows[15:].tolist()
    with pytest.raises(ValueError, match="length seq_len=6, got lengths \\[8\\]"):
        prepare_training_data(DataArguments(seq_len=6), tokenizer, train_dataset=Dataset.from_dict({"input_ids": rows.tolist()}))
    with pytest.raises(ValueError, match="mask token id 5"):
        prepare_training_data(DataArguments(seq_len=8), tokenizer,
                              train_dataset=Dataset.from_dict({"input_ids": torch.full((4, 8), 5).tolist()}))


def test_bad_inputs_fail_before_training(tmp_path, char_tokenizer):
    text = _write(tmp_path / "t.txt", "hello world\n" * 50)
    with pytest.raises(ValueError, match="train_file: file .*does not exist"):
        prepare_training_data(DataArguments(train_file=str(tmp_path / "missing.txt")), char_tokenizer)
    with pytest.raises(ValueError, match="validation_file"):
        prepare_training_data(DataArguments(train_file=text, validation_file=str(tmp_path / "nope.txt")), char_tokenizer)
    with pytest.raises(ValueError, match="empty"):
        prepare_training_data(DataArguments(train_file=_write(tmp_path / "empty.txt", ""), cache_dir=str(tmp_path / "c")),
                              char_tokenizer)
    with pytest.raises(ValueError, match="empty after tokenization"):  # text shorter than one block
        prepare_training_data(DataArguments(train_file=_write(tmp_path / "short.txt", "hi\n"), seq_len=64,
                                            validation_split_percentage=0, cache_dir=str(tmp_path / "c")), char_tokenizer)
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        prepare_training_data(DataArguments(train_file=text, seq_len=64), char_tokenizer, max_position_embeddings=32)
    no_mask = build_character_tokenizer("abc")
    no_mask.mask_token = None
    with pytest.raises(ValueError, match="no mask token"):
        prepare_training_data(DataArguments(train_file=text, seq_len=16), no_mask)
    with pytest.raises(ValueError, match="exactly one data source"):
        prepare_training_data(DataArguments(seq_len=16), char_tokenizer)
    with pytest.raises(ValueError, match="expected a file ending"):
        prepare_training_data(DataArguments(train_file=_write(tmp_path / "x.parquet", "x")), char_tokenizer)


def _ids_dataset(n, seq_len=4):
    return Dataset.from_dict({"input_ids": [[i] * seq_len for i in range(n)]})


def test_train_batches_order_is_seeded_disjoint_across_processes_and_resumable():
    dataset = _ids_dataset(50)
    batch_size, processes = 4, 2
    streams = [iterate_train_batches(dataset, batch_size, seed=3, num_processes=processes, process_index=p)
               for p in range(processes)]
    per_epoch = 50 // (batch_size * processes)  # 6 batches per process per epoch, 2 rows dropped
    epoch0 = [[next(stream) for _ in range(per_epoch)] for stream in streams]
    rows = [int(b[1][i, 0]) for batches in epoch0 for b in batches for i in range(batch_size)]
    assert len(rows) == len(set(rows)) == per_epoch * batch_size * processes  # no row twice within an epoch
    assert all(epoch == 0 for batches in epoch0 for epoch, _ in batches)
    epoch, batch = next(streams[0])
    assert epoch == 1 and not torch.equal(batch, epoch0[0][0][1])  # a new permutation per epoch
    # Resuming at batch k gives exactly the continuation; the same seed gives the same order.
    for start in (0, 3, per_epoch + 2):
        full = iterate_train_batches(dataset, batch_size, seed=3, num_processes=processes, process_index=1)
        expected = [next(full) for _ in range(start + 2)][start:]
        resumed = iterate_train_batches(dataset, batch_size, seed=3, start_batch=start, num_processes=processes,
                                        process_index=1)
        for (e1, b1), (e2, b2) in zip(expected, [next(resumed), next(resumed)]):
            assert e1 == e2 and torch.equal(b1, b2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        next(iterate_train_batches(_ids_dataset(7), 4, seed=0, num_processes=2))


def test_eval_batches_count_each_row_once_with_equal_batch_counts():
    dataset = _ids_dataset(11)
    seen, counts = [], []
    for process in range(3):
        batches = list(iterate_eval_batches(dataset, 2, num_processes=3, process_index=process))
        counts.append(len(batches))
        for ids, weight in batches:
            seen += [int(row) for row, w in zip(ids[:, 0], weight) if w > 0]
    assert sorted(seen) == list(range(11))
    assert len(set(counts)) == 1


def test_streaming_resume_matches_continuation(tmp_path, char_tokenizer):
    train = _write(tmp_path / "s.txt", "".join(f"{'abcdefgh'[i % 8] * (i % 5 + 3)} line\n" for i in range(200)))
    args = DataArguments(train_file=train, seq_len=8, streaming=True, max_validation_blocks=4, shuffle_buffer_size=16)
    data = prepare_training_data(args, char_tokenizer)
    assert len(data.validation) == 4
    full = iterate_train_batches(data.train, 4, seed=1, num_processes=2, process_index=0, shuffle_buffer_size=16)
    expected = [next(full) for _ in range(30)][25:]
    resumed = iterate_train_batches(data.train, 4, seed=1, start_batch=25, num_processes=2, process_index=0,
                                    shuffle_buffer_size=16)
    for (e1, b1), (e2, b2) in zip(expected, [next(resumed) for _ in range(5)]):
        assert e1 == e2 and torch.equal(b1, b2)
