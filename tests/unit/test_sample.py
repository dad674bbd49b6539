"""`distrain sample` and `distrain export` on language-model runs: run directories as distrain
leaves them (Hydra's config record, metrics.json, model.pt), a real GPT, the real CLI entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from distrain import lm
from distrain.models.gpt import GPT
from distrain.sample import sample
from tests.conftest import compose_job, distrain_cli

BLOCK = 16
LM_METRICS = {"task": "language_model", "input_shape": [BLOCK], "num_outputs": 256}


def lm_run(run_dir: Path, metrics: dict | None) -> GPT:
    """A byte-level GPT run directory; the model it holds."""
    job = compose_job(
        "model=gpt", "data=text", f"model.block_size={BLOCK}", "model.n_layer=1",
        "model.n_head=2", "model.n_embd=16",
    )  # fmt: skip
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(job), run_dir / ".hydra" / "config.yaml")
    (run_dir / "metrics.json").write_text(json.dumps(metrics or {}))
    torch.manual_seed(0)
    model = GPT(vocab_size=256, block_size=BLOCK, n_layer=1, n_head=2, n_embd=16)
    torch.save(model.state_dict(), run_dir / "model.pt")
    return model


def test_samples_are_the_runs_model_continuing_the_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    model = lm_run(tmp_path / "run", {**LM_METRICS, "byte_level": True})
    prompt = "def f(x):"
    expected = lm.generate(
        model,
        torch.tensor(list(prompt.encode())),
        num_samples=3,
        max_new_tokens=40,  # past the block: the context is cropped
        block_size=BLOCK,
        temperature=0.8,
        top_k=40,
        generator=torch.Generator().manual_seed(7),
    )
    texts = sample(tmp_path / "run", prompt=prompt, num_samples=3, max_new_tokens=40, seed=7)
    assert texts == [prompt + bytes(ids).decode("utf-8", errors="replace") for ids in expected]
    assert len(set(texts)) == 3  # sampled, not argmax

    argv = ["sample", str(tmp_path / "run"), "--prompt", prompt, "--num-samples", "3"]
    assert distrain_cli(monkeypatch, *argv, "--tokens", "40", "--seed", "7") == 0
    assert capsys.readouterr().out == f"\n{'-' * 15}\n".join(texts) + "\n"


def test_a_runs_record_from_before_task_was_kept_still_samples_as_bytes(tmp_path: Path) -> None:
    lm_run(tmp_path / "run", {"input_shape": [BLOCK], "num_outputs": 256, "val_perplexity": 9.0,
                              "val_bits_per_byte": 3.2})  # fmt: skip
    [text] = sample(tmp_path / "run", num_samples=1, max_new_tokens=5)
    assert text.startswith("\n")  # the default prompt, decoded as text


def test_a_token_id_run_takes_and_prints_ids(tmp_path: Path) -> None:
    lm_run(tmp_path / "run", {**LM_METRICS, "byte_level": False})
    [ids] = sample(tmp_path / "run", prompt_ids=[5, 9], num_samples=1, max_new_tokens=4)
    numbers = [int(i) for i in ids.split()]
    assert numbers[:2] == [5, 9] and len(numbers) == 6 and all(0 <= i < 256 for i in numbers)


@pytest.mark.parametrize(
    ("metrics", "argv", "message"),
    [
        ({"task": "classification", "input_shape": [8, 8], "num_outputs": 10}, [],
         "did not train a language model (its metrics.json says task=classification)"),
        ({**LM_METRICS, "byte_level": False}, ["--prompt", "hi"],
         "vocabulary is 256 token ids, not bytes"),
        ({**LM_METRICS, "byte_level": True}, ["--prompt-ids", "3,300"],
         "--prompt-ids holds 300, outside this run's vocabulary of 256 ids (0 to 255)"),
        ({**LM_METRICS, "byte_level": True}, ["--prompt-ids", "3,x"],
         "'3,x' is not a list of token ids"),
        ({**LM_METRICS, "byte_level": True}, ["--temperature", "0"],
         "'0' is not a temperature > 0"),
        ({**LM_METRICS, "byte_level": True}, ["--tokens", "0"], "'0' is not a whole number >= 1"),
        ({**LM_METRICS, "byte_level": True}, ["--best"], "has no best checkpoint"),
        (None, [], "has no metrics.json (the record of a finished distrain run)"),
    ],
    ids=["classifier", "text-for-ids", "id-outside", "not-ids", "temperature", "tokens",
         "no-best", "not-a-run"],
)  # fmt: skip
def test_bad_input_is_named_with_exit_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    metrics: dict | None,
    argv: list[str],
    message: str,
) -> None:
    lm_run(tmp_path / "run", metrics)
    if metrics is None:
        (tmp_path / "run" / "metrics.json").unlink()
    assert distrain_cli(monkeypatch, "sample", str(tmp_path / "run"), *argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_export_of_a_language_model_records_its_vocabulary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exported config builds the model: vocab_size came from the data, not the config."""
    model = lm_run(tmp_path / "run", {**LM_METRICS, "byte_level": True})
    out = tmp_path / "m.safetensors"
    assert distrain_cli(monkeypatch, "export", str(tmp_path / "run"), "--out", str(out)) == 0
    config = json.loads(out.with_suffix(".json").read_text())["model"]
    assert config["vocab_size"] == 256 and "num_outputs" not in config
    fresh = instantiate(config)
    fresh.load_state_dict(load_file(out))
    tokens = torch.randint(0, 256, (2, BLOCK))
    torch.testing.assert_close(fresh(tokens), model(tokens), rtol=0, atol=0)
