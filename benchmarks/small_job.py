"""The small job the equivalence tests compare with plain PyTorch and `make gpu-check` runs on
GPUs: the default digits MLP with 32-unit layers, a fixed seed and step count, as overrides.

One definition, so the GPU check runs the very job whose CPU results the tests pin down.
"""


def small_job(*, steps: int, batch: int, lr: float, seed: int) -> list[str]:
    """Command-line overrides of the small job (2 epochs, capped at `steps`)."""
    return [
        "trainer.epochs=2",
        f"trainer.max_steps={steps}",
        f"data.batch_size={batch}",
        f"optimizer.lr={lr}",
        f"trainer.seed={seed}",
        "model.hidden_sizes=[32,32]",
        "logger.progress=none",
    ]
