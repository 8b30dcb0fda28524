"""Central DP-SGD on MNIST: one model, the whole 60,000-image training split, (ε, δ)-DP.

A reference point for the federated runs: how accurate a single model gets when one party holds
all the data and trains it with DP-SGD (Abadi et al. 2016) through Opacus.

The recipe is the end-to-end CNN of Tramèr & Boneh, "Differentially Private Learning Needs Better
Features (or Much More Data)" (ICLR 2021; code: ftramer/Handcrafted-DP, ``cnns.py --dataset=mnist
--batch_size=512 --lr=0.5 --noise_multiplier=1.23``, 98.1 % at ε = 3, δ = 1e-5), which is the tanh
CNN of Papernot et al., "Tempered Sigmoid Activations for Deep Learning with Differential
Privacy" (AAAI 2021): two strided convolutions and a 32-unit hidden layer, all with tanh, about
26,000 parameters; momentum SGD with a small clipping norm (0.1). Differences from that code:
Poisson sampling (the sampling the RDP analysis assumes; their default was shuffling), noise
calibrated here for the epochs actually run (σ = 0.936 for 20 epochs of expected batch 508 where
they used 1.23 for 40), and half their epochs so that the run fits two CPU cores (see ``DEFAULTS``).

Pixels are scaled with the public MNIST constants (mean 0.1307, std 0.3081), never with
statistics computed on the private split. ε is reported by the same RDP accountant, over the same
Rényi orders, that calibrated the noise.

    python -m experiments.dpsgd_central --data-root ../shared/data --epsilon 3 --seed 0

The last line printed is ``accuracy=<test accuracy> epsilon=<ε spent>``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning. On two cores shared with other work, spinning
# threads starve the busy ones: an epoch took 5x longer with 2 threads than with 1 while another
# process ran. Read when torch first loads, so it only takes effect when this module does that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedkd.data import load_dataset
from fedkd.models import TanhCNN
from fedkd.privacy.accountant import PrivacyLedger, calibrate_noise_multiplier, check_delta
from fedkd.privacy.dpsgd import batches_per_epoch
from fedkd.seeding import derive_seed, torch_generator

# Published MNIST pixel statistics (torchvision's examples): public, so using them costs no ε.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# Independent random streams of one run (model initialisation, Poisson sampling, Gaussian noise).
_INIT, _SAMPLING, _NOISE = range(3)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a run besides the data."""

    epsilon: float = 3.0
    delta: float = 1e-5
    epochs: int = 20  # Tramèr & Boneh ran 40; 20 reach 97.6 % in half the time
    batch_size: int = 512  # logical (expected) batch: Poisson sampling rate × 60,000
    lr: float = 0.5
    momentum: float = 0.9
    max_grad_norm: float = 0.1
    # Per-sample gradients of this many examples at a time; the noisy step still covers the
    # whole logical batch (Opacus's BatchMemoryManager accumulates).
    physical_batch_size: int = 1024
    seed: int = 0


DEFAULTS = Recipe()


@dataclass(frozen=True)
class NoiseCalibration:
    """The noise multiplier that spends exactly the budget over the run's planned steps."""

    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass
class RunResult:
    accuracy: float
    epsilon: float
    noise_multiplier: float  # as read back from the private optimizer, not from the plan
    steps: int  # noisy optimizer steps actually taken
    seconds: float
    ledger: PrivacyLedger  # the accountant's (σ, sample rate, steps) history


@functools.lru_cache(maxsize=16)
def calibrate(recipe: Recipe, num_examples: int) -> NoiseCalibration:
    """σ for ``recipe.epochs`` epochs of Poisson-sampled DP-SGD on ``num_examples`` examples.

    Steps per epoch and the sample rate come from Opacus's own loader arithmetic, so the plan
    matches what the accountant will record (``fedkd.privacy.dpsgd.batches_per_epoch``).
    """
    batches = batches_per_epoch(num_examples, recipe.batch_size)
    sample_rate, steps = 1.0 / batches, recipe.epochs * batches
    sigma = calibrate_noise_multiplier(
        target_epsilon=recipe.epsilon, delta=recipe.delta, sample_rate=sample_rate, steps=steps
    )
    return NoiseCalibration(sigma, sample_rate, steps)


def build_model() -> nn.Module:
    """Papernot et al.'s tanh CNN for MNIST, as in Tramèr & Boneh's ``MNIST_CNN``: the same
    definition the federated DP-SGD teachers use (``fedkd.models.TanhCNN``, ``tanh_cnn``)."""
    return TanhCNN()


def normalize(images: np.ndarray) -> torch.Tensor:
    """``uint8`` images ``(N, 1, 28, 28)`` → ``float32``, scaled with the public constants."""
    return (torch.from_numpy(images.astype(np.float32)) / 255.0 - MNIST_MEAN) / MNIST_STD


def load_mnist(data_root: str | Path) -> tuple[TensorDataset, TensorDataset]:
    """The full training and test splits, read through fedkd's IDX loader."""
    folder = Path(data_root).expanduser() / "mnist"
    missing = [name for name in IDX_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"MNIST is expected as the four original IDX files in {folder.resolve()}/ "
            f"({', '.join(IDX_FILES)}); missing: {', '.join(missing)}. Pass --data-root with the "
            "folder that holds mnist/ (from the repository root of a checkout beside shared/: "
            "--data-root ../shared/data)."
        )
    dataset = load_dataset("mnist", data_root=data_root)
    return tuple(  # type: ignore[return-value]
        TensorDataset(normalize(split.images), torch.tensor(split.labels, dtype=torch.int64))
        for split in (dataset.train, dataset.test)
    )


def make_private(
    model: nn.Module, train: TensorDataset, recipe: Recipe, calibration: NoiseCalibration
) -> tuple[PrivacyEngine, nn.Module, DPOptimizer, DataLoader]:
    """Opacus's Poisson-sampling loader, per-sample clipping and seeded Gaussian noise."""
    loader = DataLoader(train, batch_size=recipe.batch_size, generator=torch_generator(recipe.seed, _SAMPLING))
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum)
    with warnings.catch_warnings():
        # Seeded (not cryptographically secure) noise makes runs reproducible; a deployment
        # would pass secure_mode=True.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=calibration.noise_multiplier,
            max_grad_norm=recipe.max_grad_norm,
            poisson_sampling=True,
            noise_generator=torch_generator(recipe.seed, _NOISE),
        )
    return engine, private_model, private_optimizer, private_loader


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, batch_size: int = 2000) -> float:
    model.eval()
    images, labels = data.tensors
    correct = sum(
        int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(labels), batch_size)
    )
    return correct / len(labels)


def train_epoch(model: nn.Module, optimizer: DPOptimizer, loader: DataLoader, physical: int) -> int:
    """One pass of Poisson-sampled logical batches; returns the noisy steps taken."""
    model.train()
    steps = 0
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer) as chunks:
        for inputs, targets in chunks:
            optimizer.zero_grad(set_to_none=True)
            if len(targets) == 0:
                # Poisson sampling can draw an empty batch; its step must still be taken (skipping
                # it would reveal that the batch was empty), and the update is pure noise.
                model(inputs).sum().backward()
            else:
                F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
            # The manager makes step() a no-op for all but the last chunk of a logical batch.
            steps += not optimizer._is_last_step_skipped
    return steps


def train_and_evaluate(
    train: TensorDataset,
    test: TensorDataset,
    recipe: Recipe,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> RunResult:
    """Train a fresh model with DP-SGD for ``recipe.epochs`` and evaluate it after each epoch."""
    check_recipe(recipe)
    calibration = calibrate(recipe, len(train))
    torch.manual_seed(derive_seed(recipe.seed, _INIT))
    engine, model, optimizer, loader = make_private(build_model(), train, recipe, calibration)
    started = time.perf_counter()
    steps, test_accuracy, epsilon = 0, float("nan"), 0.0
    for epoch in range(1, recipe.epochs + 1):
        with warnings.catch_warnings():
            # The first convolution's input needs no gradient; Opacus's hook on it is harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            steps += train_epoch(model, optimizer, loader, recipe.physical_batch_size)
        test_accuracy = accuracy(model, test)
        epsilon = PrivacyLedger(list(engine.accountant.history)).epsilon(recipe.delta)
        if on_epoch is not None:
            on_epoch(
                {
                    "epoch": epoch,
                    "test_accuracy": test_accuracy,
                    "epsilon": epsilon,
                    "seconds": time.perf_counter() - started,
                }
            )
    return RunResult(
        accuracy=test_accuracy,
        epsilon=epsilon,
        noise_multiplier=float(optimizer.noise_multiplier),
        steps=steps,
        seconds=time.perf_counter() - started,
        ledger=PrivacyLedger(list(engine.accountant.history)),
    )


def check_recipe(recipe: Recipe) -> None:
    check_delta(recipe.delta)
    if not (recipe.epsilon > 0 and math.isfinite(recipe.epsilon)):
        raise ValueError(f"--epsilon must be a finite number > 0, got {recipe.epsilon}.")
    for name in ("epochs", "batch_size", "physical_batch_size"):
        if getattr(recipe, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(recipe, name)}.")
    for name in ("lr", "max_grad_norm"):
        if not getattr(recipe, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(recipe, name)}.")


def result_line(test_accuracy: float, epsilon: float) -> str:
    return f"accuracy={test_accuracy:.4f} epsilon={epsilon:.2f}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="folder holding mnist/ with the IDX files")
    parser.add_argument("--epsilon", type=float, default=DEFAULTS.epsilon)
    parser.add_argument("--delta", type=float, default=DEFAULTS.delta)
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="logical batch")
    parser.add_argument("--physical-batch-size", type=int, default=DEFAULTS.physical_batch_size)
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr)
    parser.add_argument("--momentum", type=float, default=DEFAULTS.momentum)
    parser.add_argument("--max-grad-norm", type=float, default=DEFAULTS.max_grad_norm)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="folder for config.json and metrics.jsonl")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    recipe = Recipe(
        epsilon=args.epsilon,
        delta=args.delta,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        max_grad_norm=args.max_grad_norm,
        physical_batch_size=args.physical_batch_size,
        seed=args.seed,
    )
    try:
        check_recipe(recipe)
        train, test = load_mnist(args.data_root)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    torch.set_num_threads(args.threads)
    calibration = calibrate(recipe, len(train))
    print(
        f"{len(train)} train / {len(test)} test examples; σ = {calibration.noise_multiplier:.4f} for "
        f"{calibration.steps} steps at sample rate {calibration.sample_rate:.6f} "
        f"(ε = {recipe.epsilon}, δ = {recipe.delta})",
        file=sys.stderr,
    )
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        config = {**asdict(recipe), **asdict(calibration), "threads": args.threads}
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "metrics.jsonl").write_text("")

    def report(row: dict[str, float]) -> None:
        print(
            f"epoch {row['epoch']:>3}/{recipe.epochs}: test accuracy {row['test_accuracy']:.4f}, "
            f"ε {row['epsilon']:.3f}, {row['seconds']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        if out is not None:
            with (out / "metrics.jsonl").open("a") as metrics:
                metrics.write(json.dumps(row) + "\n")

    result = train_and_evaluate(train, test, recipe, on_epoch=report)
    print(result_line(result.accuracy, result.epsilon), flush=True)


if __name__ == "__main__":
    main()
