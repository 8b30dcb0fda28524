"""Adversarial data-free distillation: a generator and the student trained together.

A conditional generator ``G(z, y)`` and the student play a game over the teacher's input space
(DFAD, Fang et al. 2019; ZSKT, Micaelli & Storkey, NeurIPS 2019). Each iteration:

1. **Generator step.** ``G`` is pushed toward inputs that the teacher assigns to the requested
   class ``y`` (the class-conditional cross-entropy of CMI and Fast-DFKD; DAFL's unconditional
   one-hot loss is available too), whose per-channel statistics at every teacher BatchNorm layer
   match the teacher's running statistics (DeepInversion, Yin et al. CVPR 2020; CMI, Fang et al.
   IJCAI 2021), and on which the student *disagrees* with the teacher: the generator maximizes
   DFAD's L1 logit discrepancy (:func:`~generators.losses.logit_discrepancy`). DAFL's activation
   and information-entropy terms (Chen et al., ICCV 2019) can be switched on by weight.
2. **Student steps.** The generated batch, rounded to 8-bit pixels, goes into a memory bank with
   the teacher's logits on it; the student takes ``student_steps`` steps minimizing the same L1
   discrepancy on batches drawn from the bank. Reusing generated batches (Fast-DFKD, Fang et al.
   AAAI 2022; CMI's memory bank) means a student step costs one student forward and backward
   pass: no generator or teacher forward pass.

The generator is one network reused across all batches and trained a few steps at a time (the
"short inner loop" of Fast-DFKD) rather than re-optimized per batch as DeepInversion's pixels
are; once trained, :meth:`AdversarialDistillation.sample` synthesizes by forward pass.
``num_generators > 1`` trains an ensemble of independently initialized generators that take
turns, one step each per iteration, and share the bank (Luo et al. 2020): each generator
settles on its own subset of the teacher's modes, and the student learns from their union.

References
----------
Fang et al., "Data-Free Adversarial Distillation", arXiv:1912.11006, 2019 (DFAD).
Micaelli & Storkey, "Zero-shot Knowledge Transfer via Adversarial Belief Matching", NeurIPS 2019.
Chen et al., "Data-Free Learning of Student Networks", ICCV 2019 (DAFL).
Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020.
Fang et al., "Contrastive Model Inversion for Data-Free Knowledge Distillation", IJCAI 2021 (CMI).
Fang et al., "Up to 100× Faster Data-free Knowledge Distillation", AAAI 2022 (Fast-DFKD).
Luo et al., "Large-Scale Generative Data-Free Distillation", arXiv:2012.05578, 2020 (an ensemble
of generators).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from generators.amortized import ConditionalGenerator
from generators.common import (
    MNIST_MEAN,
    MNIST_STD,
    balanced_targets,
    check_class_prior,
    check_input_shape,
    check_pixel_normalization,
    check_targets,
    frozen,
    is_count,
    module_device,
    module_dtype,
    pixel_bounds,
)
from generators.hooks import (
    DEFAULT_FIRST_BN_MULTIPLIER,
    RunningStatistics,
    StatisticsTargets,
    bn_statistics,
    check_statistics,
    layer_weights,
)
from generators.losses import (
    activation_loss,
    attention_transfer_loss,
    information_entropy_loss,
    logit_discrepancy,
    one_hot_loss,
    student_objective,
    total_variation,
)

_WEIGHTS = (
    "adversarial_weight",
    "bn_weight",
    "first_bn_multiplier",
    "ce_weight",
    "tv_weight",
    "one_hot_weight",
    "activation_weight",
    "entropy_weight",
)


STUDENT_OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class AdversarialConfig:
    """Hyper-parameters of :class:`AdversarialDistillation`; the defaults suit 28×28 MNIST-like data.

    Parameters
    ----------
    batch_size : int
        Inputs generated per generator step, and the student's batch size.
    student_steps : int
        Student steps per generator step (DFAD takes 5). Drawing from the bank, a student step
        costs only a student forward and backward pass.
    generator_lr, student_lr : float
        Learning rates of the generator's Adam and of the student's optimizer. The student's
        decays to zero along a cosine over the run.
    student_optimizer : str
        ``"adam"``, or ``"sgd"``: SGD with momentum 0.9 and weight decay 5·10⁻⁴, DFAD's student
        optimizer (Fang et al. 2019 train it at a learning rate of 0.1).
    latent_dim, width : int
        Noise size and widest layer of :class:`~generators.amortized.ConditionalGenerator`.
    num_generators : int
        Independently initialized generators taking turns (1 = DFAD's single generator). Each
        iteration still costs one generator step, so each of ``k`` generators takes ``1/k`` of them.
    adversarial_weight : float
        Weight of the (maximized) teacher–student L1 discrepancy in the generator's loss.
    bn_weight, first_bn_multiplier : float
        BatchNorm statistics matching, as in DeepInversion.
    ce_weight : float
        Cross-entropy of the teacher's output to the requested class.
    tv_weight : float
        DeepInversion's image prior: the l2 total variation of the generated batch
        (:func:`~generators.losses.total_variation`), which smooths away the generator's grid
        artifacts where the teacher has few BatchNorm layers to constrain its inputs.
    one_hot_weight, activation_weight, entropy_weight : float
        DAFL's one-hot, activation and information-entropy terms (0 = off).
    bank_batches : int
        Generated batches kept for the student to draw from (1 = only the latest).
    student_temperature : float
        The student's loss: 0 for DFAD's L1 on logits, T > 0 for ``T²·KL`` at temperature T
        (:func:`~generators.losses.student_objective`). The generator's discrepancy stays L1.
    attention_weight : float
        ZSKT's attention-transfer term in the student's loss (β, 250 in Micaelli & Storkey 2019;
        0 = off): the student also matches the teacher's spatial attention after every pooling
        stage (:func:`~generators.losses.attention_transfer_loss`). Costs a teacher forward pass
        per student step.
    pixel_mean, pixel_std : tuple of float
        Normalization of the teacher's inputs; generated pixels stay in the range of ``[0, 1]``.
    """

    batch_size: int = 128
    student_steps: int = 10
    generator_lr: float = 1e-3
    student_lr: float = 1e-3
    student_optimizer: str = "adam"
    latent_dim: int = 64
    width: int = 32
    num_generators: int = 1
    adversarial_weight: float = 1.0
    bn_weight: float = 1.0
    first_bn_multiplier: float = DEFAULT_FIRST_BN_MULTIPLIER
    ce_weight: float = 1.0
    tv_weight: float = 0.0
    one_hot_weight: float = 0.0
    activation_weight: float = 0.0
    entropy_weight: float = 0.0
    bank_batches: int = 200
    student_temperature: float = 0.0
    attention_weight: float = 0.0
    pixel_mean: tuple[float, ...] = MNIST_MEAN
    pixel_std: tuple[float, ...] = MNIST_STD

    def __post_init__(self) -> None:
        counts = {
            "batch_size": 2,
            "student_steps": 1,
            "latent_dim": 1,
            "width": 2,
            "num_generators": 1,
            "bank_batches": 1,
        }
        for name, minimum in counts.items():
            if not is_count(getattr(self, name), minimum=minimum):
                raise ValueError(f"{name} must be an integer >= {minimum}, got {getattr(self, name)!r}.")
        for name in ("generator_lr", "student_lr"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
        for name in _WEIGHTS:
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}; use 0 to turn the term off.")
        if all(getattr(self, name) == 0 for name in _WEIGHTS if name != "first_bn_multiplier"):
            raise ValueError(
                "every generator loss weight is 0, so the generator would not learn; set at least one > 0."
            )
        if self.student_optimizer not in STUDENT_OPTIMIZERS:
            raise ValueError(
                f"student_optimizer must be one of {list(STUDENT_OPTIMIZERS)}, got {self.student_optimizer!r}."
            )
        if not math.isfinite(self.student_temperature) or self.student_temperature < 0:
            raise ValueError(
                f"student_temperature must be 0 (L1 on logits) or a finite T > 0 (KL at T), got {self.student_temperature!r}."
            )
        if not math.isfinite(self.attention_weight) or self.attention_weight < 0:
            raise ValueError(f"attention_weight must be a finite number >= 0 (0 = off), got {self.attention_weight!r}.")
        check_pixel_normalization(self.pixel_mean, self.pixel_std)


def build_student_optimizer(student: nn.Module, config: AdversarialConfig) -> torch.optim.Optimizer:
    """The student's optimizer named by ``config.student_optimizer``."""
    if config.student_optimizer == "sgd":
        return torch.optim.SGD(student.parameters(), lr=config.student_lr, momentum=0.9, weight_decay=5e-4)
    return torch.optim.Adam(student.parameters(), lr=config.student_lr)


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear``: its input is the feature vector DAFL's activation loss reads."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer; set activation_weight=0.")
    return linears[-1]


@contextmanager
def penultimate_features(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block, the list holds the input of the model's last linear layer, per forward."""
    captured: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured[:] = [args[0]]

    handle = last_linear(model).register_forward_pre_hook(record)
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def pooled_features(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block, the list holds the output of each of the model's ``nn.MaxPool2d`` layers, per forward.

    The pooling stages are where LeNet-style networks change resolution; a teacher and its
    half-width student have the same ones, so their attention maps compare stage by stage.
    """
    captured: list[torch.Tensor] = []
    layers = [module for module in model.modules() if isinstance(module, nn.MaxPool2d)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.MaxPool2d stage; set attention_weight=0.")

    def record(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured.append(output)

    handles = [layer.register_forward_hook(record) for layer in layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class AdversarialDistillation:
    """Train a generator against ``student`` while ``student`` learns from the teacher on its output.

    The student is trained in place; the teacher is left exactly as it was.

    Parameters
    ----------
    teacher, student : nn.Module
        Classifiers with the same number of outputs; the teacher needs BatchNorm layers when
        ``bn_weight > 0``.
    input_shape : Sequence[int]
        ``(C, H, W)`` of one input.
    num_classes : int
        Number of outputs.
    total_iterations : int
        Length of the run, for the student's cosine learning-rate schedule.
    generator : torch.Generator
        Source of the generator's initialization, noise and classes, and of bank draws.
    config : AdversarialConfig
        Loss weights and optimizer settings.
    statistics : StatisticsTargets, optional
        BatchNorm statistics to match instead of the teacher's running statistics.
    class_prior : Sequence[float], optional
        Relative weight of each requested class; uniform by default.
    augment : Callable[[Tensor], Tensor], optional
        Applied to each student batch drawn from the bank (e.g. random shifts); the teacher's
        logits are then recomputed on the augmented inputs.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        total_iterations: int,
        generator: torch.Generator,
        config: AdversarialConfig = AdversarialConfig(),
        statistics: StatisticsTargets | None = None,
        class_prior: Sequence[float] | None = None,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.input_shape = check_input_shape(input_shape, config.pixel_mean)
        if not is_count(num_classes, minimum=2):
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
        if not is_count(total_iterations, minimum=1):
            raise ValueError(f"total_iterations must be an integer >= 1, got {total_iterations!r}.")
        if config.bn_weight > 0:
            check_statistics(RunningStatistics.from_model(teacher) if statistics is None else statistics, teacher)
        if config.activation_weight > 0:
            last_linear(teacher)
        self.teacher, self.student, self.config = teacher, student, config
        self.num_classes = num_classes
        self.statistics = statistics
        self.class_prior = check_class_prior(class_prior, num_classes)
        self.random = generator
        self.augment = augment
        device, dtype = module_device(teacher), module_dtype(teacher)
        bounds = pixel_bounds(config.pixel_mean, config.pixel_std, device=device, dtype=dtype)
        assert bounds is not None  # pixel_mean/pixel_std are required by the config
        self.low, self.high = bounds
        self.networks: list[ConditionalGenerator] = []
        self.generator_optimizers: list[torch.optim.Optimizer] = []
        for _ in range(config.num_generators):
            seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                network = ConditionalGenerator(
                    input_shape=self.input_shape,
                    num_classes=num_classes,
                    latent_dim=config.latent_dim,
                    width=config.width,
                    bounds=bounds,
                ).to(device=device, dtype=dtype)
            self.networks.append(network)
            self.generator_optimizers.append(
                torch.optim.Adam(network.parameters(), lr=config.generator_lr, betas=(0.5, 0.999))
            )
        self.student_optimizer = build_student_optimizer(student, config)
        self.student_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.student_optimizer, T_max=total_iterations * config.student_steps
        )
        capacity = config.bank_batches * config.batch_size
        self.bank_inputs = torch.zeros((capacity, *self.input_shape), device=device, dtype=dtype)
        self.bank_logits = torch.zeros((capacity, num_classes), device=device, dtype=dtype)
        self.bank_size = 0
        self._bank_next = 0
        self.iterations = 0

    @property
    def network(self) -> ConditionalGenerator:
        """The generator that takes the next generator step (the only one when ``num_generators == 1``)."""
        return self.networks[self.iterations % len(self.networks)]

    def quantize(self, images: torch.Tensor) -> torch.Tensor:
        """Round normalized inputs to the nearest 8-bit pixel value, as they would cross the wire."""
        span = self.high - self.low
        return self.low + torch.round((images - self.low) / span * 255.0).clamp(0, 255) / 255.0 * span

    def _noise(self, num: int) -> torch.Tensor:
        device = module_device(self.teacher)
        return torch.randn((num, self.config.latent_dim), generator=self.random, device=self.random.device).to(device)

    def _targets(self, num: int) -> torch.Tensor:
        targets = balanced_targets(num, self.num_classes, self.random, self.class_prior)
        return targets.to(module_device(self.teacher))

    def generator_loss(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every term of the generator's objective on one generated batch (``total`` is minimized)."""
        config = self.config
        with ExitStack() as stack:
            stats = (
                stack.enter_context(bn_statistics(self.teacher, targets=self.statistics))
                if config.bn_weight > 0
                else None
            )
            features = stack.enter_context(penultimate_features(self.teacher)) if config.activation_weight > 0 else None
            teacher_logits = self.teacher(images)
            terms: dict[str, torch.Tensor] = {}
            if stats is not None:
                weights = layer_weights(stats.num_layers, first_multiplier=config.first_bn_multiplier)
                terms["bn"] = stats.feature_loss(weights)
            if features is not None:
                terms["activation"] = activation_loss(features[0])
        if config.ce_weight > 0:
            terms["ce"] = F.cross_entropy(teacher_logits, targets)
        if config.tv_weight > 0:
            terms["tv"] = total_variation(images)
        if config.one_hot_weight > 0:
            terms["one_hot"] = one_hot_loss(teacher_logits)
        if config.entropy_weight > 0:
            terms["entropy"] = information_entropy_loss(teacher_logits)
        if config.adversarial_weight > 0:
            terms["discrepancy"] = logit_discrepancy(self.student(images), teacher_logits)
        weight = {
            "bn": config.bn_weight,
            "activation": config.activation_weight,
            "ce": config.ce_weight,
            "tv": config.tv_weight,
            "one_hot": config.one_hot_weight,
            "entropy": config.entropy_weight,
            # Maximized: the generator seeks inputs the student has not learned yet.
            "discrepancy": -config.adversarial_weight,
        }
        total = torch.zeros((), device=images.device, dtype=images.dtype)
        for name, value in terms.items():
            total = total + weight[name] * value
        terms["total"] = total
        return terms

    def _push(self, images: torch.Tensor, logits: torch.Tensor) -> None:
        capacity = len(self.bank_inputs)
        for start in range(0, len(images), capacity):
            chunk_images, chunk_logits = images[start : start + capacity], logits[start : start + capacity]
            positions = (self._bank_next + torch.arange(len(chunk_images))) % capacity
            self.bank_inputs[positions] = chunk_images
            self.bank_logits[positions] = chunk_logits
            self._bank_next = int(positions[-1] + 1) % capacity
            self.bank_size = min(capacity, self.bank_size + len(chunk_images))

    def step(self) -> dict[str, float]:
        """One generator step, then ``student_steps`` student steps on the bank; returns the losses."""
        config = self.config
        targets = self._targets(config.batch_size)
        turn = self.iterations % len(self.networks)
        network, optimizer = self.networks[turn], self.generator_optimizers[turn]
        network.train()
        with frozen([self.teacher, self.student]), torch.enable_grad():
            images = network(self._noise(config.batch_size), targets)
            terms = self.generator_loss(images, targets)
            total = terms["total"]
            if not math.isfinite(total.item()):
                raise RuntimeError(
                    f"generator loss became {total.item()} at iteration {self.iterations}; "
                    "lower generator_lr or the loss weights."
                )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            stored = self.quantize(images.detach())
            self._push(stored, self.teacher(stored))
        self.student.train()
        student_losses = []
        with torch.enable_grad():
            for _ in range(config.student_steps):
                picks = torch.randint(
                    0, self.bank_size, (config.batch_size,), generator=self.random, device=self.random.device
                )
                picks = picks.to(self.bank_inputs.device)
                inputs, targets = self.bank_inputs[picks], self.bank_logits[picks]
                if self.augment is not None:
                    inputs = self.augment(inputs)
                if config.attention_weight > 0:
                    loss = self._student_loss_with_attention(inputs)
                else:
                    if self.augment is not None:
                        with frozen([self.teacher]), torch.no_grad():
                            targets = self.teacher(inputs)
                    loss = student_objective(self.student(inputs), targets, temperature=config.student_temperature)
                self.student_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.student_optimizer.step()
                self.student_schedule.step()
                student_losses.append(loss.item())
        self.iterations += 1
        summary = {f"generator_{name}": float(value.item()) for name, value in terms.items()}
        summary["student_loss"] = sum(student_losses) / len(student_losses)
        return summary

    def _student_loss_with_attention(self, inputs: torch.Tensor) -> torch.Tensor:
        """The student's logit loss plus ZSKT's attention transfer, the teacher run afresh on ``inputs``."""
        config = self.config
        with frozen([self.teacher]), torch.no_grad(), pooled_features(self.teacher) as teacher_features:
            targets = self.teacher(inputs)
        with pooled_features(self.student) as student_features:
            logits = self.student(inputs)
        loss = student_objective(logits, targets, temperature=config.student_temperature)
        return loss + config.attention_weight * attention_transfer_loss(student_features, teacher_features)

    def synthesize(self, *, targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One generated input per class id in ``targets`` (a forward pass; the generators take turns)."""
        check_targets(targets, self.num_classes)
        device = module_device(self.teacher)
        noise = torch.randn((len(targets), self.config.latent_dim), generator=generator, device=generator.device)
        noise, targets = noise.to(device), targets.to(device=device, dtype=torch.long)
        images = torch.empty((len(targets), *self.input_shape), device=device, dtype=module_dtype(self.teacher))
        with torch.no_grad():
            for index, network in enumerate(self.networks):
                network.eval()
                turn = slice(index, None, len(self.networks))
                if len(targets[turn]):
                    images[turn] = network(noise[turn], targets[turn])
        return images

    def sample(
        self, num: int, *, generator: torch.Generator, student: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``num`` generated inputs with targets following the class prior (no training happens here)."""
        targets = balanced_targets(num, self.num_classes, generator, self.class_prior)
        images = torch.cat(
            [
                self.synthesize(targets=chunk, generator=generator)
                for chunk in targets.split(max(self.config.batch_size, 256))
            ]
        )
        return images, targets.to(images.device)
