"""Any UTF-8 text as byte-level tokens (vocabulary 256), converted once into the token layout.

`path` is a file, a directory (every file under it that is UTF-8 text) or a glob; without one,
the Python standard library's own `.py` sources, found at run time (about 30 MB of real text that
needs no download). The bytes are written once to `<cache_dir>/<key>/{train,val}.bin` (uint8) and
`meta.json`, the key a hash of the inputs' names, sizes and modification times, so the next run
(and every worker on the same node) reuses them. Train/val split: whole files, each assigned by a
hash of its name (about `val_fraction` of the bytes go to validation); a single file is split at
`1 - val_fraction` of its bytes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
import zlib
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from distrain.config import ConfigError
from distrain.data.base import Splits
from distrain.data.tokens import tokens

FORMAT = 1  # bump when the conversion changes: old caches are then not reused
DEFAULT_CACHE = "~/.cache/distrain/text"


def text(
    block_size: int,
    path: str | None = None,
    val_fraction: float = 0.1,
    cache_dir: str = DEFAULT_CACHE,
    val_windows: int = 256,
) -> Splits:
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction} must be between 0 and 1.")
    files = text_files(path)
    stats = [(str(f), *_size_mtime(f)) for f in files]
    key = hashlib.sha256(json.dumps([FORMAT, val_fraction, stats]).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() / key
    if not (root / "meta.json").is_file():
        convert(files, root, val_fraction)
    return tokens(
        str(root),
        block_size,
        dtype="uint8",
        vocab_size=256,
        val_windows=val_windows,
        bytes_per_token=1.0,
    )


def stdlib_sources() -> list[Path]:
    """The standard library's .py files (not site-packages), in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)


def text_files(path: str | None) -> list[Path]:
    """The UTF-8 text files `path` names, sorted; a ConfigError when there are none."""
    if path is None:
        files = stdlib_sources()
        where = f"the standard library at {sysconfig.get_paths()['stdlib']}"
    else:
        expanded = os.path.expanduser(path)
        if os.path.isdir(expanded):
            candidates = sorted(p for p in Path(expanded).rglob("*") if p.is_file())
        else:
            candidates = sorted(Path(p) for p in glob.glob(expanded, recursive=True))
            candidates = [p for p in candidates if p.is_file()]
        files = [p for p in candidates if _is_text(p)]
        where = f"data.path={path!r}"
        if not files:
            found = f"{len(candidates)} files, none of them UTF-8 text" if candidates else "nothing"
            raise ConfigError(
                f"{where} names no text files ({found}): give a UTF-8 text file, a directory "
                "holding some, or a glob such as 'corpus/**/*.txt'."
            )
    if not files:
        raise ConfigError(f"no .py files found in {where}: set data.path to your own text.")
    return files


def _is_text(path: Path, probe_bytes: int = 4096) -> bool:
    """Non-empty and UTF-8 without NUL bytes in its first 4 KB (a multi-byte character cut at
    the probe's end is allowed)."""
    try:
        with path.open("rb") as file:
            head = file.read(probe_bytes)
    except OSError:
        return False
    if not head or b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start >= len(head) - 3
    return True


def _size_mtime(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _goes_to_val(path: Path, val_fraction: float) -> bool:
    return (
        zlib.crc32(str(path.name).encode() + str(path.parent.name).encode()) % 10_000
        < val_fraction * 10_000
    )


def convert(files: list[Path], root: Path, val_fraction: float) -> None:
    """Write the bytes of `files` into root/train.bin and root/val.bin, with a progress bar;
    written under temporary names and renamed, so a half-written cache is never used."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = {split: root / f"{split}.bin.{os.getpid()}.tmp" for split in ("train", "val")}
    total = sum(f.stat().st_size for f in files)
    columns = (
        TextColumn("converting text to bytes"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
    )
    with (
        Progress(*columns, transient=True) as progress,
        tmp["train"].open("wb") as train,
        tmp["val"].open("wb") as val,
    ):
        task = progress.add_task("convert", total=total)
        for file in files:
            content = file.read_bytes()
            if len(files) == 1:
                cut = int(len(content) * (1 - val_fraction))
                train.write(content[:cut])
                val.write(content[cut:])
            else:
                (val if _goes_to_val(file, val_fraction) else train).write(content)
            progress.advance(task, len(content))
    for split, path in tmp.items():
        path.replace(root / f"{split}.bin")
    meta = {"vocab_size": 256, "bytes_per_token": 1, "dtype": "uint8", "files": len(files)}
    meta_tmp = root / f"meta.json.{os.getpid()}.tmp"
    meta_tmp.write_text(json.dumps(meta))
    meta_tmp.replace(root / "meta.json")  # last: its presence marks a complete cache
