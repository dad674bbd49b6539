"""Token files (data=tokens) and text as bytes (data=text): windows, sharding, caching, errors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from distrain.config import ConfigError
from distrain.data.batches import ShardBatches
from distrain.data.text import stdlib_sources, text
from distrain.data.tokens import tokens

CPU = torch.device("cpu")


def write_tokens(root: Path, train: np.ndarray, val: np.ndarray, vocab_size: int | None = None):
    """As nanoGPT's data/*/prepare.py writes them: numpy's tofile of a uint16 array."""
    root.mkdir(parents=True, exist_ok=True)
    train.astype(np.uint16).tofile(root / "train.bin")
    val.astype(np.uint16).tofile(root / "val.bin")
    if vocab_size is not None:
        (root / "meta.json").write_text(json.dumps({"vocab_size": vocab_size}))
    return root


def test_windows_are_consecutive_tokens_and_targets_shift_by_one(tmp_path: Path) -> None:
    root = write_tokens(tmp_path, np.arange(1000) % 500, np.arange(100), vocab_size=500)
    splits = tokens(str(root), block_size=16)
    assert splits.task == "language_model" and splits.num_outputs == 500
    assert len(splits.train) == (1000 - 1) // 16
    x, y = splits.train.get_batch(torch.tensor([0, 3]))
    assert x.dtype == torch.int64 and x.shape == (2, 16)
    assert x[1].tolist() == list(range(48, 64)) and y[1].tolist() == list(range(49, 65))
    x0, y0 = splits.train[3]
    assert torch.equal(x0, x[1]) and torch.equal(y0, y[1])


def test_validation_windows_are_capped_and_spread_over_the_file(tmp_path: Path) -> None:
    root = write_tokens(tmp_path, np.arange(1000), np.arange(10_000) % 60_000, vocab_size=60_000)
    val = tokens(str(root), block_size=10, val_windows=4).val
    assert len(val) == 4
    x, _ = val.get_batch(torch.arange(4))
    assert x[:, 0].tolist() == [0, 2490, 4980, 7470]  # 999 windows of 10, every 249th


def test_every_worker_count_trains_on_the_same_global_batches(tmp_path: Path) -> None:
    root = write_tokens(tmp_path, np.arange(3000) % 1000, np.arange(300), vocab_size=1000)
    splits = tokens(str(root), block_size=8)

    def global_batches(world_size: int) -> list[torch.Tensor]:
        shards = [
            ShardBatches(splits, global_batch=12, rank=r, world_size=world_size, seed=1, device=CPU)
            for r in range(world_size)
        ]
        per_rank = [list(s.train_batches(epoch=1, start_step=2)) for s in shards]
        return [torch.cat([rank[k][0] for rank in per_rank]) for k in range(len(per_rank[0]))]

    one, two, three = global_batches(1), global_batches(2), global_batches(3)
    assert len(one) == 374 // 12 - 2
    for a, b, c in zip(one, two, three, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    # Validation: every window once, split over the ranks.
    val = [
        ShardBatches(
            splits, global_batch=12, rank=r, world_size=3, seed=1, device=CPU, eval_batch_size=5
        )
        for r in range(3)
    ]
    firsts = torch.cat([x[:, 0] for s in val for x, _ in s.val_batches()])
    assert firsts.tolist() == [8 * i for i in range(len(splits.val))]


def test_the_memmap_is_never_pickled_or_read_whole(tmp_path: Path) -> None:
    root = tmp_path / "big"
    root.mkdir()
    with (root / "train.bin").open("wb") as file:
        file.truncate(256 * 2**20)  # sparse: 256 MB of zeros that take no disk
    np.arange(100, dtype=np.uint16).tofile(root / "val.bin")
    splits = tokens(str(root), block_size=64, vocab_size=100)
    splits.train.get_batch(torch.tensor([0, 2_000_000]))
    assert len(pickle.dumps(splits)) < 10_000  # what goes to a DataLoader worker: no tokens


def test_meta_json_or_config_gives_the_vocabulary(tmp_path: Path) -> None:
    root = write_tokens(tmp_path, np.arange(100), np.arange(50), vocab_size=300)
    assert tokens(str(root), block_size=8).num_outputs == 300
    assert tokens(str(root), block_size=8, vocab_size=400).num_outputs == 400


def test_a_token_beyond_the_vocabulary_names_file_and_offset(tmp_path: Path) -> None:
    train = np.zeros(200, dtype=np.uint16)
    train[37] = 70
    root = write_tokens(tmp_path, train, np.zeros(50), vocab_size=64)
    splits = tokens(str(root), block_size=8)
    splits.train.get_batch(torch.tensor([0, 1, 2, 3]))  # tokens 0..32: fine
    with pytest.raises(ConfigError) as error:
        splits.train.get_batch(torch.tensor([1, 4]))  # window 4 is tokens 32..40
    message = str(error.value)
    assert f"{root / 'train.bin'} holds token id 70 at token offset 37 (byte 74)" in message
    assert "64 ids (0 to 63)" in message and "data.vocab_size" in message


def _bad(root: Path, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as error:
        tokens(str(root), **{"block_size": 8, **kwargs})
    return str(error.value)


def test_bad_token_files_are_named(tmp_path: Path) -> None:
    root = write_tokens(tmp_path / "ok", np.arange(101), np.arange(50), vocab_size=101)
    assert "nowhere/train.bin does not exist" in _bad(tmp_path / "nowhere")
    (root / "val.bin").rename(root / "valid.bin")
    assert f"{root / 'val.bin'} does not exist" in _bad(root)
    (root / "valid.bin").rename(root / "val.bin")
    wrong_size = "train.bin is 202 bytes, not a multiple of 4 (data.dtype=uint32)"
    assert wrong_size in _bad(root, dtype="uint32")
    assert "data.dtype='int16' is not one of uint8, uint16, uint32" in _bad(root, dtype="int16")
    assert "has 50 tokens, not more than model.block_size=50" in _bad(root, block_size=50)
    (root / "meta.json").unlink()
    (root / "meta.pkl").write_bytes(b"")
    assert "data.vocab_size is not set" in _bad(root)
    assert "meta.pkl is never read" in _bad(root)
    (root / "val.bin").write_bytes(b"")
    assert f"{root / 'val.bin'} is empty" in _bad(root, vocab_size=100)
    (root / "val.bin").write_bytes(b"abc")
    assert "is 3 bytes, not a multiple of 2 (data.dtype=uint16)" in _bad(root, vocab_size=100)


def test_text_is_converted_once_and_reconverted_when_it_changes(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"f{i}.txt").write_text(f"file {i}: héllo wörld\n" * 20)
    (corpus / "image.bin").write_bytes(bytes(range(256)))  # not text: left out
    cache = tmp_path / "cache"
    splits = text(block_size=16, path=str(corpus), cache_dir=str(cache))
    assert splits.num_outputs == 256 and splits.val.bytes_per_token == 1
    (key,) = list(cache.iterdir())
    train, val = (key / "train.bin").read_bytes(), (key / "val.bin").read_bytes()
    assert len(train) + len(val) == sum(f.stat().st_size for f in corpus.glob("*.txt"))
    assert 0 < len(val) < len(train)  # whole files, assigned by a hash of their name
    assert splits.val.decode(list("wörld".encode())) == "wörld"
    stamp = (key / "train.bin").stat().st_mtime_ns
    text(block_size=16, path=str(corpus), cache_dir=str(cache))  # reused as it is
    assert (key / "train.bin").stat().st_mtime_ns == stamp and len(list(cache.iterdir())) == 1
    (corpus / "f3.txt").write_text("changed")
    text(block_size=16, path=str(corpus), cache_dir=str(cache))
    assert len(list(cache.iterdir())) == 2  # a new key: sizes and times are part of it


def test_one_text_file_is_split_by_bytes_and_globs_work(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("x" * 1000)
    splits = text(block_size=8, path=str(tmp_path / "*.md"), cache_dir=str(tmp_path / "c"))
    assert splits.train.num_tokens == 900 and splits.val.num_tokens == 100


def test_a_path_without_text_files_is_named(tmp_path: Path) -> None:
    (tmp_path / "blob").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ConfigError, match=r"names no text files \(1 files, none of them UTF-8"):
        text(block_size=8, path=str(tmp_path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match=r"names no text files \(nothing\)"):
        text(block_size=8, path=str(tmp_path / "*.txt"), cache_dir=str(tmp_path / "c"))


def test_the_default_corpus_is_the_standard_library() -> None:
    files = stdlib_sources()
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert sum(os.path.getsize(f) for f in files) > 10 * 2**20  # tens of megabytes of text
    assert not any("site-packages" in f.parts for f in files)
