"""Pure criteria for input synthesis: image priors, BatchNorm feature matching, competition.

Everything here maps tensors to a scalar tensor and knows nothing about hooks, optimizers or
Flower. The distillation loss itself is :func:`fedkd.distillation.kd_loss` and the class
criterion is :func:`torch.nn.functional.cross_entropy`; they are not redefined here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}.")


def _neighbour_differences(images: torch.Tensor) -> list[torch.Tensor]:
    # The four directions of DeepInversion's prior: right, down, and both diagonals.
    return [
        images[:, :, :, :-1] - images[:, :, :, 1:],
        images[:, :, :-1, :] - images[:, :, 1:, :],
        images[:, :, 1:, :-1] - images[:, :, :-1, 1:],
        images[:, :, :-1, :-1] - images[:, :, 1:, 1:],
    ]


def total_variation(images: torch.Tensor, *, norm: Literal["l2", "l1"] = "l2") -> torch.Tensor:
    """Total variation prior: how much neighbouring pixels differ.

    For each of the four neighbour directions of DeepInversion (horizontal, vertical and the
    two diagonals) take the mean over all pixel pairs of the squared (``"l2"``) or absolute
    (``"l1"``) difference; return the average of the four means.

    DeepInversion's code sums the Frobenius norms of the four difference tensors instead. Means
    make the weight independent of batch size and resolution, so one ``tv_weight`` serves
    28×28 and 32×32 inputs and any batch size.

    Parameters
    ----------
    images : Tensor
        ``(N, C, H, W)`` with ``H, W >= 2``.
    norm : {"l2", "l1"}
        Squared or absolute differences.

    Examples
    --------
    A checkerboard of 0 and 3 differs by 3 horizontally and vertically and by 0 diagonally,
    so its l2 variation is ``(9 + 9 + 0 + 0) / 4 = 4.5`` and its l1 variation ``1.5``.
    """
    _check_images(images)
    if images.shape[2] < 2 or images.shape[3] < 2:
        raise ValueError(f"total_variation needs images of at least 2×2 pixels, got {tuple(images.shape)}.")
    if norm == "l2":
        penalties = [diff.square().mean() for diff in _neighbour_differences(images)]
    elif norm == "l1":
        penalties = [diff.abs().mean() for diff in _neighbour_differences(images)]
    else:
        raise ValueError(f"norm must be 'l2' or 'l1', got {norm!r}.")
    return torch.stack(penalties).mean()


def l2_prior(images: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each image's Euclidean norm (DeepInversion's ``l2`` term).

    Keeps pixel values from drifting far from zero, i.e. from the dataset mean of normalized
    inputs.
    """
    _check_images(images)
    return torch.linalg.vector_norm(images.flatten(1), dim=1).mean()


def feature_matching_loss(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]],
    targets: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    weights: Sequence[float],
) -> torch.Tensor:
    """DeepInversion's BatchNorm loss ``Σ_l w_l (‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂)``.

    Parameters
    ----------
    batch : Sequence[tuple[Tensor, Tensor]]
        Per layer, the ``(mean, var)`` of the synthesized batch (differentiable).
    targets : Sequence[tuple[Tensor, Tensor]]
        Per layer, the ``(mean, var)`` to match; moved to the batch's device and dtype.
    weights : Sequence[float]
        One weight per layer.
    """
    if not len(batch) == len(targets) == len(weights):
        raise ValueError(
            f"got statistics of {len(batch)} layers, targets for {len(targets)} and "
            f"{len(weights)} weights; give one of each per BatchNorm layer."
        )
    if not batch:
        raise ValueError("feature_matching_loss needs at least one layer of statistics.")
    terms = []
    for (mean, var), (target_mean, target_var), weight in zip(batch, targets, weights, strict=True):
        target_mean = target_mean.to(device=mean.device, dtype=mean.dtype)
        target_var = target_var.to(device=var.device, dtype=var.dtype)
        distance_mean = torch.linalg.vector_norm(mean - target_mean)
        distance_var = torch.linalg.vector_norm(var - target_var)
        terms.append(weight * (distance_mean + distance_var))
    return torch.stack(terms).sum()


def jensen_shannon(p_logits: torch.Tensor, q_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Jensen–Shannon divergence between ``softmax(p/T)`` and ``softmax(q/T)``, batch mean.

    ``JS(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m)`` with ``m = (p + q) / 2``, in nats, so it lies in
    ``[0, ln 2]``. Computed from log-probabilities, which needs none of the clamping of
    probabilities that DeepInversion's code applies.
    """
    if p_logits.shape != q_logits.shape:
        raise ValueError(
            f"p_logits {tuple(p_logits.shape)} and q_logits {tuple(q_logits.shape)} must have the same shape."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    log_p = F.log_softmax(p_logits / temperature, dim=-1)
    log_q = F.log_softmax(q_logits / temperature, dim=-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(dim=-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(dim=-1)
    return (0.5 * (kl_pm + kl_qm)).mean()


def competition_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Adaptive DeepInversion's competition term ``1 − JS(p_T, p_S)``, JS scaled to ``[0, 1]``.

    Minimizing it *maximizes* the disagreement between teacher and student (Yin et al. 2020,
    Adaptive DeepInversion), steering synthesis toward inputs the student has not learned
    yet. The paper writes ``1 − JS``; here JS is divided by ``ln 2`` (JS in bits) so that the
    term lies in ``[0, 1]`` as the ``1 −`` form assumes, without the clamp of DeepInversion's
    code, which zeroes the gradient wherever it is active.
    """
    divergence = jensen_shannon(teacher_logits, student_logits, temperature=temperature)
    return 1.0 - divergence / math.log(2.0)


def logit_discrepancy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the logits, DFAD's teacher–student discrepancy.

    Fang et al. (DFAD, 2019) train the student to minimize and the generator to maximize
    this L1 distance between raw logits: unlike KL it does not vanish where both networks are
    confident, so the generator keeps receiving a gradient.

    Examples
    --------
    Logits ``[[1, 2], [3, 4]]`` against zeros differ by ``(1 + 2 + 3 + 4) / 4 = 2.5``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape."
        )
    return (student_logits - teacher_logits).abs().mean()


def student_objective(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """What the student minimizes on synthetic inputs.

    ``temperature`` 0: DFAD's L1 logit discrepancy. ``temperature`` T > 0: Hinton's
    ``T²·KL(p_T ‖ p_S)`` at T, as DAFL, CMI and Fast-DFKD train their students; it matches the
    teacher's class probabilities rather than its raw logit scale, which a small student need not
    reproduce.
    """
    if temperature == 0:
        return logit_discrepancy(student_logits, teacher_logits)
    # fedkd.distillation.kd_loss without labels; generators stay free of fedkd imports.
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    teacher = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, teacher, reduction="batchmean") * temperature**2


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Spatial attention of a ``(B, C, H, W)`` feature map: channel mean of squares, unit l2 norm per input.

    Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017; it does not depend on
    the number of channels, so a narrow student's map compares with a wide teacher's.
    """
    if features.dim() != 4:
        raise ValueError(
            f"attention_map needs (batch, channels, height, width) features, got shape {tuple(features.shape)}."
        )
    return F.normalize(features.pow(2).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(
    student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Sum over stages of the mean squared difference of student and teacher attention maps.

    ZSKT (Micaelli & Storkey, NeurIPS 2019) adds this term, weighted by β = 250, to the student's
    loss on generated inputs: each input then tells the student where the teacher looks, not only
    what it outputs.
    """
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(
            f"attention transfer needs the same number (≥ 1) of stages in student and teacher, got "
            f"{len(student_features)} and {len(teacher_features)}."
        )
    total = student_features[0].new_zeros(())
    for student, teacher in zip(student_features, teacher_features, strict=True):
        if student.shape[2:] != teacher.shape[2:]:
            raise ValueError(
                f"attention maps of different sizes: student {tuple(student.shape[2:])}, teacher "
                f"{tuple(teacher.shape[2:])}; attention transfer needs stages of equal resolution."
            )
        total = total + (attention_map(student) - attention_map(teacher)).pow(2).mean()
    return total


def one_hot_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """DAFL's one-hot loss: cross-entropy of the teacher's output to its own arg-max class.

    Chen et al. (DAFL, ICCV 2019): real inputs make the teacher confident, so a generator
    should produce inputs with near one-hot teacher outputs.
    """
    return F.cross_entropy(teacher_logits, teacher_logits.argmax(dim=1))


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """DAFL's activation loss ``−mean |f|``: real inputs excite the teacher's features strongly."""
    return -features.abs().mean()


def information_entropy_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """DAFL's information-entropy loss: the negative entropy of the batch-mean prediction.

    Minimizing ``Σ_c p̄_c log p̄_c`` with ``p̄ = mean_i softmax(z_i)`` pushes the batch toward
    equal class frequencies. DAFL's code uses ``log10``; this uses the natural log (nats), a
    constant factor ``ln 10`` on the weight.

    Examples
    --------
    A batch split evenly over two classes has ``p̄ = (½, ½)`` and loss ``−ln 2``.
    """
    mean_probability = F.softmax(teacher_logits, dim=1).mean(dim=0)
    return (mean_probability * torch.log(mean_probability.clamp_min(1e-12))).sum()
