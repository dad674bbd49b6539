"""`distrain sample RUN [--best] [--prompt TEXT]`: text from a trained language model, as
nanoGPT's sample.py, from any distrain run directory.

The model is built from the run's own config and loaded with its final weights (model.pt) or,
with `--best`, its best checkpoint's, whatever strategy and worker count trained it (the same
loading as `distrain export`). Continuations come from `lm.generate`, the sampler the run used
for TensorBoard's samples: the last `block_size` tokens as context, `--temperature`, `--top-k`,
and a seeded generator, so the same command prints the same text.

Byte-level runs (`data=text`, or token files of 256 ids, one byte each) take the prompt as text
and print text. Other vocabularies (e.g. GPT-2's BPE) take the prompt as token ids
(`--prompt-ids 464,2068`) and print ids: distrain has no tokenizer of its own to decode them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from hydra.utils import instantiate

from distrain import lm
from distrain.export import ExportError, data_facts, model_config, model_state, require

SEPARATOR = "-" * 15  # between samples, as nanoGPT prints them
DEFAULT_TEXT_PROMPT = "\n"  # nanoGPT's default start


class SampleError(ValueError):
    """A run or an argument that cannot be sampled: printed as one paragraph, exit code 2."""


def sample(
    run_dir: Path,
    *,
    prompt: str | None = None,
    prompt_ids: list[int] | None = None,
    num_samples: int = 2,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
    best: bool = False,
    device: str = "cpu",
) -> list[str]:
    """`num_samples` continuations of the prompt by RUN's model, each with its prompt: text for
    a byte-level run, space-separated token ids otherwise."""
    run_dir = run_dir.expanduser().resolve()
    require(run_dir / "metrics.json", run_dir, "record")
    facts = data_facts(run_dir)
    if facts.get("task") != "language_model":
        raise SampleError(
            f"{run_dir} did not train a language model (its metrics.json says task="
            f"{facts.get('task', 'unknown')}); distrain sample continues text, so name the run "
            "of a model trained on data=text or data=tokens (e.g. experiment=gpt_stdlib)."
        )
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SampleError(f"--device {device}: no CUDA device is visible here; use --device cpu.")
    vocab_size, block_size = facts["num_outputs"], facts["input_shape"][0]
    ids = _prompt_ids(prompt, prompt_ids, byte_level=facts["byte_level"], vocab_size=vocab_size)
    model = instantiate(model_config(run_dir), _convert_="all")
    model.load_state_dict(model_state(run_dir, best=best))
    model.to(device)
    generator = torch.Generator().manual_seed(seed)
    continuations = lm.generate(
        model,
        torch.tensor(ids, dtype=torch.long, device=device),
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        block_size=block_size,
        temperature=temperature,
        top_k=top_k,
        generator=generator,
    )
    if facts["byte_level"]:
        return [bytes(ids + new).decode("utf-8", errors="replace") for new in continuations]
    return [" ".join(map(str, ids + new)) for new in continuations]


def _prompt_ids(
    prompt: str | None, prompt_ids: list[int] | None, *, byte_level: bool, vocab_size: int
) -> list[int]:
    """The prompt as token ids: text as UTF-8 bytes for a byte-level run, or the ids given."""
    if prompt_ids is None:
        if not byte_level:
            raise SampleError(
                f"this run's vocabulary is {vocab_size} token ids, not bytes, and distrain has "
                "no tokenizer to turn text into them: give the prompt as ids from the tokenizer "
                "that wrote the data, e.g. --prompt-ids 464,2068 (output is ids too)."
            )
        # An empty prompt starts from a newline, as no prompt does: generation needs a token.
        return list((prompt or DEFAULT_TEXT_PROMPT).encode("utf-8"))
    outside = [i for i in prompt_ids if not 0 <= i < vocab_size]
    if outside:
        raise SampleError(
            f"--prompt-ids holds {outside[0]}, outside this run's vocabulary of {vocab_size} ids "
            f"(0 to {vocab_size - 1})."
        )
    return prompt_ids


def _at_least(minimum: int) -> Callable[[str], int]:
    def whole_number(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {minimum}")
        return int(text)

    return whole_number


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", ",").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of token ids (whole numbers, comma-separated)"
        ) from None
    if not ids:
        raise argparse.ArgumentTypeError("no token ids given (e.g. --prompt-ids 464,2068)")
    return ids


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a temperature > 0 (e.g. 0.8)")
    return value


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="distrain sample", description="Continue a prompt with a run's language model."
    )
    parser.add_argument("run", type=Path, help="the run directory (holds model.pt)")
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--prompt", help="text, for a byte-level run (default: a newline)")
    given.add_argument("--prompt-ids", type=_token_ids, help="token ids, e.g. 464,2068")
    parser.add_argument("--num-samples", type=_at_least(1), default=2)
    parser.add_argument("--tokens", type=_at_least(1), default=200, help="new tokens per sample")
    parser.add_argument("--temperature", type=_temperature, default=0.8)
    parser.add_argument(
        "--top-k", type=_at_least(0), default=40, help="keep the k likeliest ids (0: all)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--best", action="store_true", help="the best checkpoint's weights (lowest val loss)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        texts = sample(
            args.run,
            prompt=args.prompt,
            prompt_ids=args.prompt_ids,
            num_samples=args.num_samples,
            max_new_tokens=args.tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            seed=args.seed,
            best=args.best,
            device=args.device,
        )
    except (SampleError, ExportError) as error:
        print(f"distrain sample: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"\n{SEPARATOR}\n".join(texts))
