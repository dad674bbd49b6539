"""Token files in nanoGPT's layout: `<path>/train.bin`, `<path>/val.bin`, raw little-endian ints.

The files are memory-mapped and never read whole: a batch reads only its windows' pages. A
"sample" is a window: window i is tokens [i * T, i * T + T + 1) (inputs the first T, targets the
last T, so consecutive windows share one token). The index is implicit (window i starts at
i * T), so the per-epoch bookkeeping is the sampler's permutation of window numbers: 8 bytes per
window, e.g. ~8 MB for a billion-token file at block_size 1024, and nothing per token.
Which windows form global batch k of an epoch is then the same function of (seed, epoch, k) as
for any dataset (distrain/sharding.py), so any worker count trains on the same batches and a run
resumes mid-epoch on any worker count.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from distrain.config import ConfigError
from distrain.data.base import Splits

DTYPES = ("uint8", "uint16", "uint32")


class TokenWindows(Dataset):
    """Windows of `block_size` tokens of one memory-mapped token file.

    `get_batch(indices)` builds a whole batch from the memmap in one gather (distrain/data/
    batches.py uses it instead of a DataLoader); `__getitem__` serves one window for code that
    wants a plain map-style dataset.
    """

    def __init__(
        self,
        path: Path,
        dtype: str,
        block_size: int,
        vocab_size: int,
        *,
        max_windows: int | None = None,
        bytes_per_token: float | None = None,
    ) -> None:
        self.path, self.dtype, self.block_size, self.vocab_size = (
            path,
            dtype,
            block_size,
            vocab_size,
        )
        self.bytes_per_token = bytes_per_token  # known for byte-level data: bits per byte
        self.num_tokens = path.stat().st_size // np.dtype(dtype).itemsize
        available = (self.num_tokens - 1) // block_size
        # A capped set (validation) is spread evenly over the file, not just its beginning.
        self.count = available if max_windows is None else min(available, max_windows)
        self.stride = block_size * (available // self.count) if self.count else block_size
        self._tokens: np.memmap | None = None  # opened lazily: a Dataset must pickle small

    @property
    def tokens(self) -> np.memmap:
        if self._tokens is None:
            self._tokens = np.memmap(
                self.path, dtype=np.dtype(self.dtype).newbyteorder("<"), mode="r"
            )
        return self._tokens

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch(torch.tensor([index]))
        return x[0], y[0]

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) inputs and (B, T) targets (the inputs shifted by one), int64, on the CPU."""
        starts = indices.numpy().astype(np.int64) * self.stride
        offsets = starts[:, None] + np.arange(self.block_size + 1)
        window = torch.from_numpy(self.tokens[offsets].astype(np.int64))
        if int(window.max()) >= self.vocab_size:
            self._bad_token(window, offsets)
        return window[:, :-1], window[:, 1:]

    def _bad_token(self, window: torch.Tensor, offsets: np.ndarray) -> None:
        row, col = (window >= self.vocab_size).nonzero()[0].tolist()
        token, offset = int(window[row, col]), int(offsets[row, col])
        raise ConfigError(
            f"{self.path} holds token id {token} at token offset {offset} (byte "
            f"{offset * np.dtype(self.dtype).itemsize}), but the vocabulary has "
            f"{self.vocab_size} ids (0 to {self.vocab_size - 1}): set data.vocab_size (or "
            f"meta.json's vocab_size) to the tokenizer's size, or check data.dtype={self.dtype} "
            "is the type the file was written with."
        )

    def prompt(self, num_tokens: int) -> torch.Tensor:
        """The first tokens of the file: a fixed prompt for samples."""
        return torch.from_numpy(self.tokens[:num_tokens].astype(np.int64))

    @property
    def byte_level(self) -> bool:
        """Whether each token is one byte of UTF-8 text (data=text), so ids read as text."""
        return self.vocab_size == 256 and self.bytes_per_token == 1

    def decode(self, ids: list[int]) -> str:
        """Bytes as text for byte-level data, token ids otherwise."""
        if self.byte_level:
            return bytes(ids).decode("utf-8", errors="replace")
        return " ".join(map(str, ids))


def tokens(
    path: str,
    block_size: int,
    dtype: str = "uint16",
    vocab_size: int | None = None,
    val_windows: int = 256,
    bytes_per_token: float | None = None,
) -> Splits:
    """`train.bin` and `val.bin` under `path`; `vocab_size` from here or `path/meta.json`."""
    root = Path(path)
    if dtype not in DTYPES:
        raise ConfigError(f"data.dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    if not isinstance(block_size, int) or block_size < 1:
        raise ConfigError(f"model.block_size={block_size} must be a whole number >= 1.")
    if val_windows < 1:
        raise ConfigError(f"data.val_windows={val_windows} must be at least 1.")
    files = {split: _check_file(root, split, dtype) for split in ("train", "val")}
    meta = _read_meta(root)
    vocab_size = vocab_size or meta.get("vocab_size")
    if not vocab_size:
        pickle = (
            " (meta.pkl is never read: a pickle can run code)"
            if (root / "meta.pkl").exists()
            else ""
        )
        raise ConfigError(
            f"data.vocab_size is not set and {root / 'meta.json'} does not give it{pickle}: set "
            "data.vocab_size=N (e.g. 50257 for GPT-2's tokenizer, 256 for bytes) or write "
            '{"vocab_size": N} to meta.json beside the .bin files.'
        )
    bytes_per_token = bytes_per_token or meta.get("bytes_per_token")
    for split, file in files.items():
        num_tokens = file.stat().st_size // np.dtype(dtype).itemsize
        if num_tokens <= block_size:
            raise ConfigError(
                f"{file} has {num_tokens} tokens, not more than model.block_size={block_size}: "
                f"a window needs block_size + 1 tokens. Lower model.block_size or add {split} data."
            )
    windows = {
        "block_size": block_size,
        "vocab_size": int(vocab_size),
        "bytes_per_token": bytes_per_token,
    }
    train = TokenWindows(files["train"], dtype, **windows)
    val = TokenWindows(files["val"], dtype, max_windows=val_windows, **windows)
    return Splits(
        train=train,
        val=val,
        input_shape=(block_size,),
        num_outputs=int(vocab_size),
        task="language_model",
    )


def _check_file(root: Path, split: str, dtype: str) -> Path:
    file = root / f"{split}.bin"
    if not file.is_file():
        raise ConfigError(
            f"{file} does not exist: data.path={root} must hold train.bin and val.bin (token ids "
            "as raw little-endian integers, as nanoGPT's prepare.py writes them)."
        )
    size, itemsize = file.stat().st_size, np.dtype(dtype).itemsize
    if size == 0:
        raise ConfigError(f"{file} is empty: it holds no tokens.")
    if size % itemsize:
        raise ConfigError(
            f"{file} is {size} bytes, not a multiple of {itemsize} (data.dtype={dtype}): the file "
            "was written with another dtype (uint8, uint16 or uint32) or is truncated."
        )
    return file


def _read_meta(root: Path) -> dict:
    meta = root / "meta.json"
    if not meta.is_file():
        return {}
    try:
        content = json.loads(meta.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{meta} is not valid JSON: {error}") from None
    if not isinstance(content, dict):
        raise ConfigError(f'{meta} must hold a JSON object such as {{"vocab_size": 50257}}.')
    return content
