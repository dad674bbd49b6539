"""Language models end to end on real Ray: the same parameters on 1, 2 and 3 workers (also with
accumulation and the parameter server), resume mid-epoch on another worker count, a sparse
multi-GB token file, what the run reports, and bad input.

A tiny GPT (2 layers, 32 wide, block 16) on a token file written as nanoGPT's prepare.py writes
them (numpy's tofile of uint16): 120 training windows, 10 steps per epoch at a global batch of
12, 14 steps (crossing an epoch boundary).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from distrain import config, driver, preflight, validation
from distrain.models.gpt import GPT
from distrain.rundir import RunDirectory
from tests.conftest import REPO, compose_job, run_cli
from tests.test_cli import scalars
from tests.test_equivalence import assert_same_parameters

VOCAB, BLOCK, STEPS = 64, 16, 14


def write_token_files(root: Path, num_train: int = 120 * BLOCK + 1) -> Path:
    """train.bin / val.bin as nanoGPT's data/*/prepare.py: `np.array(ids, np.uint16).tofile`."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    # A learnable stream: each token mostly follows from the one before.
    ids = np.cumsum(rng.integers(1, 3, size=num_train + 20 * BLOCK)) % VOCAB
    np.array(ids[:num_train], dtype=np.uint16).tofile(root / "train.bin")
    np.array(ids[num_train:], dtype=np.uint16).tofile(root / "val.bin")
    (root / "meta.json").write_text(json.dumps({"vocab_size": VOCAB}))
    return root


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_files(tmp_path_factory.mktemp("tokens"))


def base(token_dir: Path) -> list[str]:
    return [
        "model=gpt",
        "data=tokens",
        f"data.path={token_dir}",
        f"model.block_size={BLOCK}",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "data.batch_size=12",
        "data.val_windows=12",
        "trainer.epochs=2",
        f"trainer.max_steps={STEPS}",
        "trainer.seed=3",
        "optimizer=sgd",
        "optimizer.lr=0.3",
        "logger.progress=none",
        "logger.log_every_n_steps=2",
        "logger.sample_tokens=8",
    ]


def train(run_dir: Path, *overrides: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    run = RunDirectory(run_dir)
    metrics = driver.train(compose_job(*overrides), run, keep_workers=True)
    return metrics, torch.load(run.model_path, weights_only=True)


@pytest.fixture(scope="module")
def reference(
    ray_address: str, token_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One worker, uninterrupted: what every other run must end with."""
    run_dir = tmp_path_factory.mktemp("reference")
    return train(run_dir, *base(token_dir), "trainer.workers=1")


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    # Grouped by worker count: each job runs on the workers the one before kept.
    [
        ["trainer.workers=2"],
        ["trainer.workers=2", "data.micro_batch_size=2"],  # 3 micro-batches per worker and step
        ["trainer.workers=2", "trainer.shard_optimizer=true"],  # ZeRO-1, the tied matrix too
        # FSDP per GPT block; sampling at each evaluation runs on both ranks in step
        ["trainer.workers=2", "aggregator=fsdp"],
        ["trainer.workers=3"],
        ["trainer.workers=3", "aggregator=parameter_server", "aggregator.servers=2"],
    ],
    ids=["2-workers", "accumulation", "zero", "fsdp", "3-workers", "parameter-server"],
)
def test_same_parameters_on_any_worker_count(
    reference: tuple, token_dir: Path, tmp_path: Path, overrides: list[str]
) -> None:
    metrics, params = train(tmp_path / "run", *base(token_dir), *overrides)
    assert metrics["steps"] == STEPS
    assert_same_parameters(params, reference[1])
    assert metrics["val_loss"] == pytest.approx(reference[0]["val_loss"], rel=1e-4)
    # Training moved the parameters (the comparison is not of two initialisations).
    torch.manual_seed(3)  # trainer.seed: the workers' initial parameters
    initial = GPT(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32)
    assert (params["wte.weight"] - initial.wte.weight).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 1)])
def test_stopped_mid_epoch_and_resumed_on_another_worker_count(
    reference: tuple, token_dir: Path, tmp_path: Path, before: int, after: int
) -> None:
    run_dir = tmp_path / "run"
    stopped, _ = train(
        run_dir, *base(token_dir), f"trainer.workers={before}", "trainer.max_steps=5"
    )
    assert stopped["steps"] == 5  # mid-epoch: an epoch is 10 steps
    resume = [*base(token_dir), f"trainer.workers={after}", f"resume={run_dir}"]
    # The optimizer state is stored by position in its parameter groups: a resume that would
    # regroup them (biases and norm gains apart) is refused before any actor starts.
    regrouped = config.typed(compose_job(*resume, "optimizer.decay_norms_and_biases=false"))
    with pytest.raises(config.ConfigError, match=r"parameter groups of \[\d+\] tensors, this"):
        preflight.check(regrouped)
    metrics, params = train(run_dir, *resume)
    assert metrics["steps"] == STEPS and metrics["workers"] == after
    assert_same_parameters(params, reference[1])


@pytest.mark.slow
def test_the_run_reports_token_figures_and_samples(reference: tuple, token_dir: Path) -> None:
    metrics = reference[0]
    assert metrics["val_loss"] < np.log(VOCAB)  # it learned something in 14 steps
    assert metrics["val_perplexity"] == pytest.approx(np.exp(metrics["val_loss"]))
    assert "val_bits_per_byte" not in metrics  # token ids of unknown byte length
    assert "val_accuracy" not in metrics
    assert metrics["tokens_per_s"] == pytest.approx(metrics["samples_per_s"] * BLOCK)
    assert len(metrics["worker_tokens_per_s"]) == 1 and metrics["worker_tokens_per_s"][0] > 0
    assert 0 < metrics["mfu"] < 1.5  # against the CPU matmul measured at start-up
    run_dir = Path(metrics["run_dir"])
    series = scalars(run_dir)
    for tag in ("throughput/tokens_per_s", "throughput/mfu", "workers/rank0/tokens_per_s"):
        assert [step for step, _ in series[tag]] == list(range(2, STEPS + 1, 2)), tag
    assert series["epoch/val_perplexity"][-1][1] == pytest.approx(metrics["val_perplexity"])
    samples = _texts(run_dir, "samples")
    assert len(samples) == 2  # one per evaluation: the end of epoch 1, and of the run
    assert all(line.count("⟶") == 2 for line in samples)  # logger.sample_count lines


def _texts(run_dir: Path, tag: str) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    return [e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"{tag}/text_summary")]


@pytest.mark.slow
def test_bf16_autocast_trains(token_dir: Path, tmp_path: Path, reference: tuple) -> None:
    metrics, _ = train(tmp_path / "run", *base(token_dir), "trainer.precision=bf16")
    assert metrics["steps"] == STEPS
    # Within bf16's precision of the fp32 run (~3 significant digits per step).
    assert metrics["val_loss"] == pytest.approx(reference[0]["val_loss"], rel=0.05)


@pytest.mark.slow
def test_byte_text_reports_bits_per_byte_and_a_user_model_trains(
    ray_address: str, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 200)
    metrics, params = train(
        tmp_path / "run",
        "data=text",
        f"data.path={corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "~model",
        "+model._target_=tests.userlm.BigramLM",
        "data.block_size=32",  # a model without block_size: the data is told the window
        "data.batch_size=8",
        "trainer.workers=2",
        "trainer.max_steps=30",
        "optimizer=adamw",
        "optimizer.lr=0.2",
        "logger.progress=none",
    )
    assert params["table.weight"].shape == (256, 256)
    assert metrics["val_bits_per_byte"] == pytest.approx(metrics["val_loss"] / np.log(2))
    assert metrics["val_bits_per_byte"] < 3.0  # from 8 bits per byte for a uniform guess
    assert "mfu" in metrics  # 6N FLOPs per token for a model without flops_per_token


@pytest.mark.slow
def test_a_sparse_multi_gigabyte_file_trains_in_little_memory(
    ray_address: str, tmp_path: Path
) -> None:
    root = tmp_path / "big"
    root.mkdir()
    size = 6 * 2**30
    with (root / "train.bin").open("wb") as file:
        file.truncate(size)  # 3 G tokens (id 0) that take no disk
    np.arange(4 * 1024 + 1, dtype=np.uint16).tofile(root / "val.bin")
    metrics, _ = train(
        tmp_path / "run",
        "model=gpt",
        "data=tokens",
        f"data.path={root}",
        "data.vocab_size=4097",
        "model.block_size=1024",  # 2.9 M windows: a 23 MB permutation per epoch
        "model.n_layer=1",
        "model.n_head=1",
        "model.n_embd=16",
        "data.batch_size=4",
        "data.val_windows=2",
        "trainer.workers=2",
        "trainer.max_steps=3",
        "logger.progress=none",
        "logger.sample_tokens=0",
    )
    assert metrics["steps"] == 3
    for worker in metrics["aggregator"]:
        assert worker["peak_rss_mb"] * 2**20 < size / 4, worker  # far below the 6 GB file


# ---------------------------------------------------------------- bad input

GPT_16 = ["model=gpt", f"model.block_size={BLOCK}"]
BAD_INPUT = {
    "missing val.bin": ([*GPT_16, "data.path={empty}"], "val.bin does not exist"),
    "model output not (B, T, V)": (
        ["~model", "+model._target_=tests.userlm.LastTokenLM", f"data.block_size={BLOCK}"],
        "must return logits (B, T, V) = (2, 16, 64)",
    ),
    "window longer than the validation file": (
        ["model=gpt", "model.block_size=400"],
        "val.bin has 320 tokens, not more than model.block_size=400",
    ),
    # 1,921 uint16 tokens: 3,842 bytes, which no uint32 file can be.
    "file length not a multiple of the dtype": ([*GPT_16, "data.dtype=uint32"], "multiple of 4"),
    "no text files": ([*GPT_16, "data=text", "data.path={empty}/*.txt"], "names no text files"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_fails_before_any_actor(case: str, token_dir: Path, tmp_path: Path) -> None:
    overrides, message = BAD_INPUT[case]
    empty = tmp_path / "empty"
    (empty).mkdir()
    (empty / "train.bin").write_bytes(b"\0\0" * 100)
    result = run_cli(
        "data=tokens",
        f"data.path={token_dir}",
        *(o.format(empty=empty) for o in overrides),
        "cluster.address=127.0.0.1:9",  # never reached: the mistake is caught before
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        timeout_s=90,
        env={"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "unreachable" not in result.stderr


@pytest.mark.slow
def test_a_token_beyond_the_vocabulary_stops_the_run_naming_file_and_offset(
    ray_address: str, tmp_path: Path
) -> None:
    root = write_token_files(tmp_path / "tokens")
    ids = np.fromfile(root / "train.bin", dtype=np.uint16)
    ids[40 * BLOCK + 3] = 999  # in window 40, not in the two windows the dry build reads
    ids.tofile(root / "train.bin")
    offset = 40 * BLOCK + 3
    # A configuration error (the CLI's exit 2), raised by the worker that read the window.
    with pytest.raises(config.ConfigError) as error:
        train(tmp_path / "run", *base(root))
    assert f"train.bin holds token id 999 at token offset {offset} (byte {2 * offset})" in (
        str(error.value)
    )


def test_model_output_check_is_a_config_error(token_dir: Path) -> None:
    user_model = ["~model", "+model._target_=tests.userlm.LastTokenLM", f"data.block_size={BLOCK}"]
    job = compose_job("data=tokens", f"data.path={token_dir}", *user_model)
    with pytest.raises(config.ConfigError, match=r"\(B, T, V\) = \(2, 16, 64\)"):
        preflight.dry_build(config.typed(job))


def test_a_language_model_on_classification_data_is_a_config_error() -> None:
    """model=gpt with the default (digits) data: one sentence saying what to change, not
    Python's "missing 1 required positional argument: 'vocab_size'"."""
    job = compose_job("model=gpt")
    with pytest.raises(config.ConfigError) as error:
        preflight.dry_build(config.typed(job))
    assert str(error.value) == (
        "model._target_=distrain.models.gpt.GPT is a language model: it takes vocab_size from "
        "token data, and this data is a classification set, which has none. Train it on token "
        "windows (data=text or data=tokens; experiment=gpt_stdlib is a whole job)."
    )


# ---------------------------------------------------------------- experiments


def test_gpt2_small_is_gpt2_small(tmp_path: Path) -> None:
    """Composed and built (on CPU, not trained): GPT-2 small's 124 M parameters, block 1024."""
    root = write_token_files(tmp_path / "owt")
    (root / "meta.json").write_text(json.dumps({"vocab_size": 50257}))
    job = compose_job("experiment=gpt2_small", f"data.path={root}")
    validation.validate(job)
    assert job["data"]["block_size"] == 1024 and job["trainer"]["precision"] == "bf16"
    assert job["trainer"]["max_grad_norm"] == 1.0  # nanoGPT's grad_clip
    assert (
        job["data"]["batch_size"] // job["trainer"]["workers"] % job["data"]["micro_batch_size"]
        == 0
    )
    model = GPT(vocab_size=50257, **{k: v for k, v in job["model"].items() if k != "_target_"})
    assert 124e6 < model.num_params(non_embedding=False) < 125e6


@pytest.mark.slow
def test_gpt_stdlib_runs_on_the_standard_library(ray_address: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        "experiment=gpt_stdlib",
        "trainer.max_steps=4",
        "data.val_windows=16",
        "trainer.eval_every_n_steps=2",  # one evaluation inside the (one) epoch
        f"data.cache_dir={tmp_path / 'cache'}",
        f"cluster.address={ray_address}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["workers"] == 2
    assert 0 < metrics["val_bits_per_byte"] < 8.5  # ~8 bits per byte before training
    assert "val_bpb" in result.stderr and "tokens/s" in result.stderr and "MFU" in result.stderr
    [inside] = [line for line in result.stderr.splitlines() if "eval at step" in line]
    assert inside.startswith("  eval at step 2 (epoch 1/1)  val_loss ")
    assert " val_ppl " in inside and " val_bpb " in inside
    # The run's model continues a prompt from the shell (bytes in, text out).
    assert metrics["task"] == "language_model" and metrics["byte_level"] is True
    sampled = run_cli("sample", str(run_dir), "--prompt", "import ", "--tokens", "24", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    texts = sampled.stdout.removesuffix("\n").split(f"\n{'-' * 15}\n")
    assert len(texts) == 2 and all(t.startswith("import ") and len(t) > 10 for t in texts), texts
