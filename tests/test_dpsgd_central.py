"""The central DP-SGD baseline: the ε it reports, the noise it adds, the line it prints."""

from __future__ import annotations

import gzip
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset

from experiments import dpsgd_central as central
from fedkd.privacy.accountant import RDP_ORDERS
from fedkd.privacy.dpsgd import batches_per_epoch

RESULT_LINE = re.compile(r"accuracy=(\d\.\d{4}) epsilon=(\d+\.\d{2})")
TINY = central.Recipe(epsilon=3.0, delta=1e-5, epochs=1, batch_size=64, physical_batch_size=32, seed=0)


def synthetic(count: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 1, 28, 28, generator=generator)
    return TensorDataset(images, torch.randint(0, 10, (count,), generator=generator))


@pytest.fixture(autouse=True)
def keep_thread_count():
    # main() sets torch's thread count for its run; the rest of the suite keeps its own.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run() -> central.RunResult:
    """One epoch on 512 examples (8 noisy steps), shared by the checks on what it reports."""
    return central.train_and_evaluate(synthetic(512, seed=1), synthetic(100, seed=2), TINY)


def test_reported_epsilon_is_the_accountants_for_the_steps_taken(tiny_run: central.RunResult) -> None:
    result = tiny_run

    planned = TINY.epochs * batches_per_epoch(512, TINY.batch_size)
    assert result.steps == planned == 8
    accountant = RDPAccountant()
    accountant.history = [(result.noise_multiplier, 1 / batches_per_epoch(512, 64), result.steps)]
    assert result.epsilon == pytest.approx(accountant.get_epsilon(delta=TINY.delta, alphas=RDP_ORDERS), rel=1e-9)
    assert result.ledger.history == accountant.history
    # Calibrated to spend the budget, not far below it.
    assert TINY.epsilon - 0.05 <= result.epsilon <= TINY.epsilon


def test_the_noise_used_is_the_calibrated_noise(tiny_run: central.RunResult) -> None:
    calibration = central.calibrate(TINY, 512)
    assert calibration.noise_multiplier > 0
    assert tiny_run.noise_multiplier == calibration.noise_multiplier
    assert tiny_run.ledger.history == [(calibration.noise_multiplier, calibration.sample_rate, calibration.steps)]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_a_step_adds_gaussian_noise_of_the_calibrated_scale() -> None:
    recipe = central.Recipe(epochs=1, batch_size=64, lr=1.0, momentum=0.0, max_grad_norm=1.0)
    train = synthetic(512, seed=1)
    calibration = central.calibrate(recipe, len(train))
    _, model, optimizer, loader = central.make_private(central.build_model(), train, recipe, calibration)
    inputs, _ = next(iter(loader))
    optimizer.zero_grad()
    # Every per-sample gradient is zero, so the update is the noise alone:
    # lr · N(0, (σ·C)²) / expected batch size per coordinate.
    (model(inputs) * 0.0).sum().backward()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer.step()
    update = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    expected = calibration.noise_multiplier * recipe.max_grad_norm / optimizer.expected_batch_size
    assert update.std().item() == pytest.approx(expected, rel=0.05)


@pytest.mark.slow  # seconds of training; the quick tier keeps the cheaper checks
def test_the_same_seed_gives_the_same_run() -> None:
    train, test = synthetic(128, seed=1), synthetic(50, seed=2)
    runs = [central.train_and_evaluate(train, test, TINY) for _ in range(2)]
    assert runs[0].accuracy == runs[1].accuracy and runs[0].epsilon == runs[1].epsilon


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", size) for size in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def fake_mnist(root: Path, train: int = 256, test: int = 64) -> Path:
    folder = root / "mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", train), ("t10k", test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)), 0x803)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, count), 0x801)
    return root


def test_the_last_line_and_the_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = fake_mnist(tmp_path / "data")
    out = tmp_path / "run"
    central.main(["--data-root", str(root), "--epochs", "2", "--batch-size", "64", "--threads", "1", "--out", str(out)])
    captured = capsys.readouterr()
    last = captured.out.strip().splitlines()[-1]
    match = RESULT_LINE.fullmatch(last)
    assert match, last
    assert float(match.group(2)) <= 3.0
    assert "epoch   2/2" in captured.err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert set(rows[0]) == {"epoch", "test_accuracy", "epsilon", "seconds"}
    assert f"{rows[-1]['test_accuracy']:.4f}" == match.group(1)
    config = json.loads((out / "config.json").read_text())
    assert config["noise_multiplier"] > 0 and config["epochs"] == 2


def test_a_missing_data_root_says_where_the_files_go(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        central.main(["--data-root", str(tmp_path / "nowhere")])
    message = str(exit_info.value.code)
    assert "train-images-idx3-ubyte.gz" in message and "--data-root" in message
    assert str((tmp_path / "nowhere" / "mnist").resolve()) in message


@pytest.mark.parametrize("flag", ["--epochs=0", "--lr=0", "--max-grad-norm=-1", "--epsilon=0", "--delta=1"])
def test_bad_settings_are_refused_before_training(tmp_path: Path, flag: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        central.main(["--data-root", str(fake_mnist(tmp_path)), flag])
    assert flag.split("=")[0].lstrip("-").split("-")[0] in str(exit_info.value.code)
