"""conf/ as a user meets it: every data, model and loss config builds and trains a step; every
experiment trains end to end with 2 workers; bad input fails through the CLI before any actor.

MNIST, Fashion-MNIST and CIFAR-10 are tiny files in the real formats (tests/fakedata.py), read by
torchvision's real loaders. CIFAR-10's loader checks the MD5s of the official release, which those
files cannot match: the tests set `data.check_integrity=false`, the documented option for
re-packed copies, which skips only that comparison (files must still exist and unpickle).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distrain import build, driver, schedules
from distrain.config import DataConfig
from distrain.data.batches import ShardBatches
from distrain.rundir import RunDirectory
from distrain.sharding import ShardSampler
from distrain.validation import validate
from tests.conftest import REPO, compose_job, run_cli
from tests.fakedata import write_cifar, write_mnist, write_pngs
from tests.test_cli import scalars
from tests.test_equivalence import assert_same_parameters, distrain_run, plain_pytorch_loop
from tests.test_lm import write_token_files

CONF = REPO / "conf"
CPU = torch.device("cpu")
FAKE_TRAIN, FAKE_VAL = 64, 16  # images per fake MNIST-like set; CIFAR: 5 x 8 train, 8 val


def _options(group: str) -> set[str]:
    return {path.stem for path in (CONF / group).glob("*.yaml")}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory holding every fake dataset, as a user's data.root would."""
    root = tmp_path_factory.mktemp("data")
    write_mnist(root, "MNIST", num_train=FAKE_TRAIN, num_test=FAKE_VAL)
    write_mnist(root, "FashionMNIST", num_train=FAKE_TRAIN, num_test=FAKE_VAL)
    write_cifar(root, per_batch=8, num_test=8)
    write_pngs(root / "images", {"blue": (0, 0, 255), "red": (255, 0, 0)}, per_class=5)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype(np.float32)
    np.savez(root / "classes.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    np.savez(root / "named.npz", inputs=x, targets=x[:, :2])
    # A linear regression target: learnable, and not a classification.
    np.savez(root / "regression.npz", x=x, y=x @ rng.normal(size=(4, 2)).astype(np.float32))
    write_token_files(root / "tokens")
    (root / "text").mkdir()
    (root / "text" / "a.txt").write_text("some text to learn from\n" * 400)
    return root


def _compose(*overrides: str, root: Path) -> dict:
    return compose_job(*(o.format(root=root) for o in overrides))


# ---------------------------------------------------------------- every config builds

DATA = {
    "digits": [],
    "iris": [],
    "blobs": [],
    "mnist": ["data.root={root}"],
    "fashion_mnist": ["data.root={root}"],
    "cifar10": ["data.root={root}", "data.check_integrity=false"],
    "image_folder": ["data.root={root}/images", "data.num_workers=0"],
    "tensors": ["data.path={root}/classes.npz"],
    "dataset": ["data.train._target_=tests.userdata.Clusters", "+data.train.num_samples=64"],
    "synthetic": ["data.num_samples=256"],
    "tokens": ["model=gpt", "data.path={root}/tokens"],
    "text": ["model=gpt", "data.path={root}/text", "data.cache_dir={root}/cache"],
}
READ_LAZILY = ("image_folder", "dataset", "tokens", "text")


def test_every_data_and_model_config_is_covered() -> None:
    assert set(DATA) == _options("data")
    assert set(MODELS) == _options("model")
    assert set(LOSSES) == _options("loss")
    assert set(EXPERIMENTS) | set(LANGUAGE_MODELS) == _options("experiment")


@pytest.mark.parametrize("name", sorted(DATA))
def test_data_config_loads_and_batches(name: str, root: Path) -> None:
    job = _compose(f"data={name}", *DATA[name], root=root)
    validate(job)
    data = DataConfig.of(job["data"])
    splits = build.build_splits(data)
    batches = ShardBatches(
        splits,
        global_batch=4,
        rank=1,
        world_size=2,
        seed=0,
        device=CPU,
        loader=data.batching.loader,
        num_workers=data.batching.num_workers,
    )
    # Image folders, a user's Dataset and token files are read lazily; the rest is in memory.
    assert batches.in_memory == (name not in READ_LAZILY)
    x, y = next(iter(batches.train_batches(epoch=0)))
    assert tuple(x.shape) == (2, *splits.input_shape) and len(y) == 2
    # Rank 1's part of global batch 0 is the same rule for every dataset.
    expected = next(ShardSampler(len(splits.train), 4, 1, 2, seed=0).local_indices(0))
    torch.testing.assert_close(
        y, torch.stack([torch.as_tensor(splits.train[i][1]) for i in expected])
    )


MODELS = {
    "mlp": ["data=digits"],
    "cnn": ["data=mnist", "data.root={root}"],
    "resnet18": ["data=cifar10", "data.root={root}", "data.check_integrity=false"],
    "rnn": ["data=synthetic", "data.input_shape=[12,8]", "data.num_samples=256"],
    "gpt": ["data=text", "data.path={root}/text", "data.cache_dir={root}/cache"],
}
CLASSIFIERS = sorted(m for m in MODELS if m != "gpt")


def _one_step(job: dict, global_batch: int = 8) -> tuple[torch.nn.Module, torch.Tensor]:
    """What a worker builds from the config, then one optimizer step on its first batch."""
    splits = build.build_splits(DataConfig.of(job["data"]))
    torch.manual_seed(0)
    model = build.build_model(job["model"], splits)
    loss_fn = build.build_loss(job["loss"], splits.task)
    build.check_model_fits_data(model, splits, loss_fn)
    optimizer = build.build_optimizer(job["optimizer"], model, global_batch=global_batch)
    batches = ShardBatches(
        splits, global_batch=global_batch, rank=0, world_size=1, seed=0, device=CPU
    )
    x, y = next(iter(batches.train_batches(epoch=0)))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert any(changed)
    return model, x


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_config_builds_and_takes_a_step_on_its_data(name: str, root: Path) -> None:
    _one_step(_compose(f"model={name}", *MODELS[name], root=root))


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_model_with_log_softmax_trains_with_nll(name: str, root: Path) -> None:
    job = _compose(f"model={name}", *MODELS[name], "model.log_softmax=true", "loss=nll", root=root)
    model, x = _one_step(job)
    model.eval()
    with torch.no_grad():
        total = model(x).exp().sum(dim=1)  # probabilities: every row sums to one
    torch.testing.assert_close(total, torch.ones_like(total))


LOSSES = {
    "cross_entropy": ["data=digits"],
    "nll": ["data=digits", "model.log_softmax=true"],
    "mse": ["data=synthetic", "data.task=regression", "data.num_classes=3", "data.num_samples=64"],
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_config_fits_its_task(name: str, root: Path) -> None:
    _one_step(_compose(f"loss={name}", *LOSSES[name], root=root))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=nll"], "needs log-probabilities"),
        (["loss=mse"], "MSELoss does not fit a classification dataset"),
        (["data=synthetic", "data.task=regression", "data.num_samples=64"], "CrossEntropyLoss"),
    ],
)
def test_a_loss_that_does_not_fit_is_refused(overrides: list[str], message: str) -> None:
    job = compose_job(*overrides)
    splits = build.build_splits(DataConfig.of(job["data"]))
    model = build.build_model(job["model"], splits)
    with pytest.raises(ValueError, match=message):
        build.check_model_fits_data(model, splits, build.build_loss(job["loss"]))


# ---------------------------------------------------------------- experiments through the CLI

EXPERIMENTS = {
    # Full default runs: the accuracies the README states.
    "iris_mlp": [],
    "blobs_classifier": [],
    # Fake files: these prove the experiment runs, not what it reaches on the real data.
    "fashion_mnist_mlp": ["data.root={root}", "data.batch_size=16", "trainer.epochs=1"],
    "mnist_cnn": ["data.root={root}", "data.batch_size=16", "trainer.epochs=2"],
    "cifar10_resnet18": [
        "data.root={root}",
        "data.check_integrity=false",
        "data.batch_size=8",
        "trainer.epochs=1",
        "scheduler.warmup_epochs=0.4",
        "logger.log_every_n_steps=1",
    ],
}
STATED_ACCURACY = {"iris_mlp": 0.9, "blobs_classifier": 0.9}
# Language models: composed here, run in tests/test_lm.py.
LANGUAGE_MODELS = {"gpt_stdlib": [], "gpt2_small": ["data.path={root}/tokens"]}


def test_every_experiment_composes_as_documented(root: Path) -> None:
    iris = compose_job("experiment=iris_mlp")
    assert iris["data"]["_target_"].endswith(".iris") and iris["model"]["hidden_sizes"] == [5]
    blobs = compose_job("experiment=blobs_classifier")
    assert blobs["data"]["centers"] == 2 and blobs["data"]["num_features"] == 2
    fashion = _compose("experiment=fashion_mnist_mlp", "data.root={root}", root=root)
    assert (
        fashion["model"]["hidden_sizes"] == [512, 512] and fashion["model"]["activation"] == "relu"
    )
    mnist = _compose("experiment=mnist_cnn", "data.root={root}", root=root)
    assert mnist["loss"]["_target_"] == "torch.nn.NLLLoss" and mnist["model"]["log_softmax"]
    cifar = _compose("experiment=cifar10_resnet18", "data.root={root}", root=root)
    assert cifar["model"]["small_input"]
    assert cifar["data"]["train_transforms"] == [
        {"_target_": "distrain.data.vision.RandomCropFlip", "padding": 4, "flip": True}
    ]
    assert cifar["optimizer"]["lr_scaling"] == "linear"
    for experiment, overrides in {**EXPERIMENTS, **LANGUAGE_MODELS}.items():
        paths = [o for o in overrides if o.startswith(("data.root", "data.path"))]
        job = _compose(f"experiment={experiment}", *paths, root=root)
        validate(job)
        assert job["trainer"]["workers"] == (8 if experiment == "gpt2_small" else 2)
        assert (
            (CONF / "experiment" / f"{experiment}.yaml")
            .read_text()
            .startswith("# @package _global_")
        )


def train(tmp_path: Path, *overrides: str) -> tuple[dict, Path]:
    """One job in this process, on the workers the last job of this file kept where it has the
    same shape (2 workers, as most here): its metrics and run directory. The CLI composes the
    same overrides with the same Hydra; tests/test_cli.py runs jobs through it."""
    run_dir = RunDirectory(tmp_path / "run")
    return driver.train(compose_job(*overrides), run_dir, keep_workers=True), run_dir.path


@pytest.mark.slow
@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_every_experiment_trains_end_to_end_with_two_workers(
    experiment: str, ray_address: str, root: Path, tmp_path: Path
) -> None:
    overrides = [f"experiment={experiment}", *EXPERIMENTS[experiment], "trainer.workers=2"]
    job = _compose(*overrides, root=root)
    metrics, run_dir = train(tmp_path, *(o.format(root=root) for o in overrides))
    # Every step of every epoch ran, and accuracy is a count over the whole validation split.
    splits = build.build_splits(DataConfig.of(job["data"]))
    steps_per_epoch = len(splits.train) // job["data"]["batch_size"]
    assert (
        metrics["workers"] == 2 and metrics["steps"] == job["trainer"]["epochs"] * steps_per_epoch
    )
    correct = metrics["val_accuracy"] * len(splits.val)
    assert correct == pytest.approx(round(correct), abs=1e-6), (metrics, len(splits.val))
    if experiment in STATED_ACCURACY:
        assert metrics["val_accuracy"] >= STATED_ACCURACY[experiment], metrics
    lr = scalars(run_dir)["optim/lr"]
    if experiment == "mnist_cnn":
        # 64 images / 16 = 4 steps per epoch; the lr x 0.7 each epoch, counted per iteration:
        # logged after the last step (8), it is the lr step 9 would use.
        assert lr[-1] == (8, pytest.approx(0.001 * 0.7**2))
    if experiment == "cifar10_resnet18":
        # Goyal et al.: lr 0.1 per 256 samples x global batch 8, warm-up 2 of 5 steps, cosine.
        # The logged lr after step s is the one step s + 1 trains with.
        factor = schedules.WarmupCosineFactor(2, 5, min_lr_ratio=0.0, warmup_start_ratio=0.0)
        expected = [(s, pytest.approx(0.1 * 8 / 256 * factor(s), abs=1e-9)) for s in range(1, 6)]
        assert lr == expected


@pytest.mark.slow
def test_regression_reports_loss_and_no_accuracy(
    ray_address: str, root: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    metrics, run_dir = train(
        tmp_path,
        "data=tensors",
        f"data.path={root}/regression.npz",
        "data.task=regression",
        "data.batch_size=32",
        "loss=mse",
        "model.hidden_sizes=[16]",
        "optimizer.lr=0.02",
        "trainer.epochs=4",
        "logger.progress=plain",
    )
    assert "val_accuracy" not in metrics and "best_val_accuracy" not in metrics
    assert "val_accuracy" not in capfd.readouterr().err  # the progress lines name no accuracy
    series = scalars(run_dir)
    assert "epoch/val_accuracy" not in series
    val_loss = [value for _, value in series["epoch/val_loss"]]
    assert len(val_loss) == 4 and val_loss[-1] == pytest.approx(metrics["val_loss"])
    assert val_loss[-1] < 0.5 * val_loss[0]  # it learned the linear map


@pytest.mark.slow
def test_a_user_model_by_target(ray_address: str, tmp_path: Path) -> None:
    """The README's recipe: `~model +model._target_=my_package.MyNet +model.<arg>=...`."""
    # The workers import the user's package too: here the repository is on their PYTHONPATH
    # (tests/conftest.py), like an install.
    metrics, run_dir = train(
        tmp_path,
        "~model",
        "+model._target_=tests.usermodel.TinyNet",
        "+model.width=24",
        "trainer.epochs=3",
    )
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert state["body.1.weight"].shape == (24, 64) and state["head.weight"].shape == (10, 24)
    assert metrics["val_accuracy"] > 0.8


@pytest.mark.slow
def test_schedule_and_lr_scaling_keep_one_and_two_workers_equal(ray_address: str, tmp_path: Path):
    """The schedule is a function of the step count, the scaling of the global batch: neither
    depends on trainer.workers, so 1 and 2 workers still end with the same parameters."""
    recipe = (
        "scheduler=warmup_cosine",
        "scheduler.warmup_epochs=0.5",
        "optimizer.lr_scaling=linear",
        "optimizer.reference_batch=32",  # lr 0.05 x 64 / 32
    )
    one = distrain_run(tmp_path, "trainer.workers=1", *recipe)
    two = distrain_run(tmp_path, "trainer.workers=2", *recipe)
    assert_same_parameters(one, two)
    constant_lr = plain_pytorch_loop()  # the same run without schedule and scaling
    assert any(not torch.allclose(one[key], constant_lr[key], atol=1e-3) for key in one)


# ---------------------------------------------------------------- bad input

# Each run also names an unreachable Ray address: failing with the expected message (and not
# "is unreachable") proves the mistake was caught before any connection, let alone an actor.
BAD_INPUT = {
    "missing dataset files": (
        ["data=mnist", "data.root={tmp}/nowhere"],
        2,
        "MNIST not found under data.root=",
    ),
    "missing data.root": (["experiment=mnist_cnn"], 2, "data.root has no value"),
    "npz without the named arrays": (
        ["data=tensors", "data.path={root}/named.npz"],
        2,
        "has no array named 'x', 'y'; it has ['inputs', 'targets']",
    ),
    "output size does not match the classes": (
        ["+model.num_outputs=5"],
        2,
        "the data has 10 classes: expected (2, 10)",
    ),
    "unknown loss": (["loss=foo"], 2, "loss=foo: there is no loss config named 'foo'"),
    "unknown loss class": (["loss._target_=torch.nn.NoSuchLoss"], 2, "torch.nn.NoSuchLoss"),
    "nll on raw logits": (["loss=nll"], 2, "set model.log_softmax=true"),
    "warm-up longer than the run": (
        ["scheduler=warmup_cosine", "trainer.epochs=2"],
        2,
        "scheduler.warmup_epochs=5 (110 steps) is not shorter than the whole run (44 steps)",
    ),
    "unknown lr scaling": (["optimizer.lr_scaling=sqrt"], 2, "optimizer.lr_scaling='sqrt'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_fails_before_any_actor(case: str, root: Path, tmp_path: Path) -> None:
    overrides, exit_code, message = BAD_INPUT[case]
    result = run_cli(
        *(o.format(root=root, tmp=tmp_path) for o in overrides),
        "cluster.address=127.0.0.1:9",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        timeout_s=90,
    )
    assert result.returncode == exit_code, result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "unreachable" not in result.stderr
