import numpy as np
import pytest
import torch
from torch import nn

from fedkd.distillation import OptimizerSettings, class_mean_logits, soften, train_with_class_targets
from strategies.aggregation import weighted_mean
from strategies.dsfl import entropy_reduced
from strategies.fd import average_class_logits


def test_average_class_logits_weights_rows_by_class_counts():
    # two clients, two classes; client 0 saw class 0 three times, client 1 saw it once
    logits = np.array(
        [
            [[4.0, 0.0], [9.0, 9.0]],  # client 0 never saw class 1: its row 1 must not count
            [[0.0, 4.0], [1.0, 3.0]],
        ]
    )
    counts = np.array([[3, 0], [1, 2]])
    global_logits, totals = average_class_logits(logits, counts)
    # class 0: (3·[4,0] + 1·[0,4]) / 4 = [3, 1]; class 1: only client 1 → [1, 3]
    np.testing.assert_allclose(global_logits, [[3.0, 1.0], [1.0, 3.0]])
    np.testing.assert_array_equal(totals, [4, 2])


def test_average_class_logits_marks_classes_nobody_holds():
    global_logits, totals = average_class_logits(np.ones((2, 3, 3)), np.array([[1, 0, 0], [2, 0, 1]]))
    assert np.isnan(global_logits[1]).all() and totals[1] == 0
    assert np.isfinite(global_logits[[0, 2]]).all()


@pytest.mark.parametrize(
    "logits, counts, match",
    [
        (np.ones((2, 3)), np.ones((2, 3), dtype=int), "clients, C, C"),
        (np.ones((2, 3, 3)), np.ones((2, 2), dtype=int), "counts must be"),
        (np.ones((2, 3, 3)), -np.ones((2, 3), dtype=int), "non-negative"),
    ],
)
def test_average_class_logits_rejects_bad_shapes(logits, counts, match):
    with pytest.raises(ValueError, match=match):
        average_class_logits(logits, counts)


def test_class_mean_logits_by_hand():
    model = nn.Sequential(nn.Flatten(), nn.Identity())  # logits are the inputs themselves
    images = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0]]).reshape(3, 1, 1, 2)
    labels = torch.tensor([0, 0, 1])
    means, counts = class_mean_logits(model, images, labels, num_classes=3)
    torch.testing.assert_close(means, torch.tensor([[2.0, 1.0], [0.0, 5.0], [0.0, 0.0]]))
    assert counts.tolist() == [2, 1, 0]


@pytest.mark.slow  # trains for 60 epochs
def test_class_targets_pull_outputs_toward_the_class_soft_label():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    images = torch.randn(64, 1, 2, 2)
    labels = torch.zeros(64, dtype=torch.long)
    # the global soft label for class 0 is not one-hot: CE alone would drive p(0) → 1
    class_probs = torch.tensor([[0.7, 0.3], [float("nan"), float("nan")]])
    train_with_class_targets(
        model,
        images,
        labels,
        class_probs=class_probs,
        weight=20.0,
        temperature=1.0,
        epochs=60,
        settings=OptimizerSettings(lr=0.05, batch_size=16),
        generator=torch.Generator().manual_seed(0),
    )
    mean_p0 = soften(model(images), 1.0)[:, 0].mean().item()
    assert 0.65 < mean_p0 < 0.85


def test_entropy_reduced_sharpens_the_aggregate_and_keeps_its_argmax():
    stack = np.array([[[0.6, 0.4]], [[0.5, 0.5]]], dtype=np.float32)
    plain = weighted_mean(stack, np.ones(2))
    sharp = entropy_reduced(weighted_mean, temperature=0.1)(stack, np.ones(2))
    assert sharp.argmax() == plain.argmax() and sharp.max() > plain.max()
    # DS-FL's ERA, softmax(p̄ / T), by hand: e^5.5 / (e^5.5 + e^4.5) = e / (e + 1)
    assert sharp[0, 0] == pytest.approx(np.e / (np.e + 1), rel=1e-5)
