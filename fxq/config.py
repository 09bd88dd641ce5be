"""Run configuration: one small frozen dataclass, checked at construction."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from fxq.errors import ConfigError
from fxq.frontend.trace import Frontend
from fxq.quant.qmath import ActThreshold, WeightError
from fxq.targets import INT8, Target, host_isa

__all__ = [
    "Method",
    "ActThreshold",
    "PTQConfig",
    "Probe",
    "LFHConfig",
    "RoundingConfig",
    "LossWeights",
    "Optimizer",
    "MixedPrecisionConfig",
    "measure_fields",
]


def _coerce_enums_(cfg, **fields: type[Enum]) -> None:
    """Accept an enum's value string for each field of a frozen config (CLI and JSON give strings)."""
    for name, enum in fields.items():
        value = getattr(cfg, name)
        if not isinstance(value, enum):
            try:
                object.__setattr__(cfg, name, enum(value))
            except ValueError:
                raise ConfigError(f"{name} must be one of {[e.value for e in enum]}, got {value!r}") from None


class Method(Enum):
    RTN = "rtn"  # round to nearest on error-minimising thresholds
    EPTQ = "eptq"  # RTN, then LFH-weighted distillation of the rounding over the whole network


class Probe(Enum):
    GAUSSIAN = "gaussian"  # v ~ N(0, I)
    RADEMACHER = "rademacher"  # v in {-1, +1}: lower variance for the same probe count


@dataclass(frozen=True)
class LFHConfig:
    """Label-Free Hessian estimation (EPTQ, arXiv 2309.11531, Thm 3.1; MCT's defaults: 10 to 100 probes, tolerance 1e-3)."""

    min_probes: int = 10
    max_probes: int = 100
    rel_tol: float = 1e-3  # stop when no trace's running mean moves by more than this, relatively
    probe: Probe = Probe.GAUSSIAN
    images: int = 32  # representative images (MCT's default for its Hessian: 32 on GPU, 16 in v1)
    batch_size: int = 32
    probes_per_pass: int = 1  # probes batched into one backward (replicated batch); trades memory for speed
    seed: int = 0
    flush_mib: int = 256  # CUDA kernel: gradients held before a fused launch (0: one launch per gradient)

    def __post_init__(self):
        if not 0 < self.min_probes <= self.max_probes:
            raise ConfigError(f"need 0 < min_probes <= max_probes, got {self.min_probes}, {self.max_probes}")
        if not self.rel_tol > 0:
            raise ConfigError(f"rel_tol must be > 0, got {self.rel_tol}")
        if self.images < 1 or self.batch_size < 1 or self.probes_per_pass < 1:
            raise ConfigError(
                f"images, batch_size and probes_per_pass must be >= 1, got {self.images}, {self.batch_size}, "
                f"{self.probes_per_pass}"
            )
        if self.flush_mib < 0:
            raise ConfigError(f"flush_mib must be >= 0, got {self.flush_mib}")
        _coerce_enums_(self, probe=Probe)


class Optimizer(Enum):
    RADAM = "radam"  # MCT's: variance-rectified, so its steps start small and reach the full rate over ~1/(1-b2)
    ADAM = "adam"  # the full rate from the first steps (a short schedule has few to spare)


class Start(Enum):
    FLOAT = "float"  # every soft weight starts at its float weight (AdaRound's start, EPTQ's)
    LAYERWISE = "layerwise"  # at each layer's own rounding, made in graph order (fxq.eptq.layerwise)


class LossWeights(Enum):
    LFH = "lfh"  # lambda_z from the label-free Hessian (EPTQ)
    MEAN = "mean"  # every interest tensor alike (the paper's Table 1 ablation)
    OUTPUT = "output"  # the model output alone (a mixed-precision sensitivity that tracks top-1 closely)


@dataclass(frozen=True)
class RoundingConfig:
    """EPTQ rounding optimization (arXiv 2309.11531; defaults are MCT's EPTQ v1 ones unless noted).

    The full schedule is 20K iterations at batch 32 (the paper's); `RoundingConfig.short()` is the CPU one.
    """

    iterations: int = 20_000
    batch_size: int = 32
    lr_rounding: float = 3e-2  # on the AdaRound variables V, with `optimizer`
    # V's learning rate once the regulariser is on (None: lr_rounding): a lower one hardens V more slowly
    lr_rounding_hardening: float | None = None
    optimizer: Optimizer = Optimizer.RADAM
    lr_bias: float = 1e-3  # SGD, on every quantized layer's bias
    train_bias: bool = True
    train_scale: bool = False  # a trainable per-channel factor on each weight step (SGD, lr_scale)
    lr_scale: float = 1e-3
    # every activation quantizer's step trained beside V (LSQ's gradient, on a log factor: fxq.eptq.act_steps),
    # with the rounding's optimizer at lr_act_steps
    train_act_steps: bool = False
    lr_act_steps: float = 1e-3
    # QDrop: the share of each activation quantizer's elements left float in the steps' forwards (fxq.quant.qmath.
    # drop_quantization; QDrop's 0.5), so the weights fit the graph between float and quantized activations. 0: off
    act_drop: float = 0.0
    start: Start = Start.FLOAT  # where the rounding variables start
    # images the layer-local start reads (drawn with `seed`); None: all (a quarter of the time and memory of 1000,
    # about the same choices)
    start_images: int | None = 256
    # with the layer-local start: the share of each layer's objective that weighs its output positions by the model
    # output's sensitivity to them (fxq.eptq.layerwise.Sensitivity); 0: every position alike
    start_sensitivity: float = 0.0
    # with the layer-local start: each layer rounds the weights that bring its output on its quantized inputs nearest
    # the float graph's (GPTAQ's target: it makes up for the error of the layers above); off: its own float weights
    start_aim: bool = True
    # with the layer-local start: passes of coordinate descent on each layer's error after GPTQ's error feedback
    start_sweeps: int = 0
    start_confidence: float = 0.75  # h(V) on the layer-local choice's side at the start (0.5: undecided; 1: kept)
    # with the layer-local start: the largest share of the quantized weights that the first layers may hold and
    # stay at their start, so that the steps read the graph's value past them, computed once (fxq.eptq.prefix)
    frozen_share: float = 0.01
    # with a frozen prefix: steps that train the prefix's layers alone before they freeze, on the loss of the prefix's
    # interest tensors and of its end, which stands for every term past it (fxq.eptq.prefix); 0: they keep the start
    prefix_steps: int = 0
    reg: float = 0.01  # lambda_reg of the rounding regulariser
    beta: tuple[float, float] = (20.0, 2.0)  # annealed linearly after the warm-up
    warmup: float = 0.2  # fraction of the iterations with the regulariser off
    loss_weights: LossWeights = LossWeights.LFH
    # the model output's share of the distillation's weights, the hidden tensors keeping their ratios (None: what
    # `loss_weights` gives it; with the LFH, the largest trace of all)
    output_share: float | None = None
    # the weight of the model output's KL(float || quantized) of the softmax, a mean over the images, added to each
    # step's loss (not to the keep-best check's). Needs a model that returns one tensor of class scores; 0: off
    output_kl: float = 0.0
    normalize_loss: bool = True  # each tensor's squared error relative to its float energy (as MCT does)
    images: int | None = None  # optimize on N calibration images drawn at random with `seed` (None: all)
    keep_best: bool = True  # fall back to RTN when the optimized rounding distils worse on the check's images
    # the keep-best check's images (the first 128) kept out of the start, the steps and the prefix's training: the
    # check then measures the rounding on images it never fit
    check_apart: bool = False
    checkpoint_every: int = 500  # iterations between checkpoints (with checkpoint_dir)
    checkpoint_dir: str | None = None
    resume: bool = False
    teacher_cache: str = "auto"  # float interest tensors of every image kept (fp16) or recomputed: auto|on|off
    # bf16 autocast of the student and teacher forwards: None, on CUDA only; True, on the CPU too (slower there,
    # but it lets the CPU tests run the GPU's numerics path); False, off
    amp: bool | None = None
    compile: bool = False  # torch.compile the student and teacher graphs (off: slower than eager on the CPU)
    channels_last: bool = True  # NHWC during the optimization for 4-D images (faster convolutions on the CPU)
    seed: int = 0

    def __post_init__(self):
        if self.iterations < 0 or self.batch_size < 1:
            raise ConfigError(f"need iterations >= 0 and batch_size >= 1, got {self.iterations}, {self.batch_size}")
        rates = (self.lr_rounding, self.lr_rounding_hardening or 0.0, self.lr_bias, self.lr_scale, self.lr_act_steps)
        if min(*rates, self.reg, self.output_kl) < 0:
            raise ConfigError("learning rates, reg and output_kl must be >= 0")
        if self.check_apart and not self.keep_best:
            raise ConfigError("check_apart keeps the keep-best check's images out of the fit: it needs keep_best on")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup is a fraction of the iterations in [0, 1), got {self.warmup}")
        if self.images is not None and self.images < 1:
            raise ConfigError(f"images must be >= 1 or None, got {self.images}")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("resume needs checkpoint_dir: the folder an earlier run checkpointed to")
        if self.teacher_cache not in ("auto", "on", "off"):
            raise ConfigError(f"teacher_cache must be auto, on or off, got {self.teacher_cache!r}")
        if (self.start_images is not None and self.start_images < 1) or not 0.5 < self.start_confidence <= 1:
            raise ConfigError(
                f"need start_images >= 1 (or None) and start_confidence in (0.5, 1], got {self.start_images}, "
                f"{self.start_confidence}"
            )
        if not 0 <= self.start_sensitivity < 1:  # at 1 the positions the output does not read leave H singular
            raise ConfigError(f"start_sensitivity is a share in [0, 1), got {self.start_sensitivity}")
        if self.start_sweeps < 0:
            raise ConfigError(f"start_sweeps is a number of passes, 0 or more, got {self.start_sweeps}")
        if not 0 <= self.act_drop < 1:  # at 1 no step would see a quantized activation
            raise ConfigError(f"act_drop is a share of the activations in [0, 1), got {self.act_drop}")
        if self.prefix_steps < 0:
            raise ConfigError(f"prefix_steps is a number of steps, 0 or more, got {self.prefix_steps}")
        if not 0 <= self.frozen_share < 1:
            raise ConfigError(f"frozen_share is a share of the weights in [0, 1), got {self.frozen_share}")
        _coerce_enums_(self, loss_weights=LossWeights, optimizer=Optimizer, start=Start)
        if self.output_share is not None and not (
            0 < self.output_share < 1 and self.loss_weights != LossWeights.OUTPUT
        ):
            raise ConfigError(
                f"output_share must lie in (0, 1), with loss_weights 'lfh' or 'mean' (the output alone is "
                f"loss_weights='output'), got {self.output_share} with {self.loss_weights.value!r}"
            )

    @property
    def loss_weights_read(self) -> LossWeights:
        """The weights the run reads: with no whole-network steps only the keep-best check reads them, and there
        the LFH's probes would cost more than all the rest of a layer-local run, so the tensors count alike."""
        return LossWeights.MEAN if self.iterations == 0 else self.loss_weights

    @classmethod
    def short(cls, **overrides) -> RoundingConfig:
        """A CPU schedule that finishes in minutes on EfficientNet-Lite0 (2 cores): 400 iterations of 8 images."""
        return cls(**{"iterations": 400, "batch_size": 8, **overrides})


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """Per-layer weight bit-widths from an ILP over sensitivities (EPTQ's mixed precision). Give at least one budget.

    weight_memory: bytes of quantized weights (numel * bits / 8 summed); avg_bits: the same as bits per weight.
    bops: bit-operations (MACs * weight bits * activation bits). latency: a limit on the summed per-layer
    latency table `latency_table` ({layer name: {bits: ms}}, measured on the target).
    """

    weight_memory: float | None = None
    avg_bits: float | None = None
    bops: float | None = None
    latency: float | None = None
    latency_table: dict | None = None
    bit_options: tuple[int, ...] = (2, 4, 8)  # the widths each layer may take
    images: int = 32  # calibration images for the sensitivity measurement
    batch_size: int = 16
    stack_candidates: bool | None = None  # a layer's widths in one pass along the batch; None: on CUDA only
    loss_weights: LossWeights = LossWeights.LFH  # how the interest tensors' distances add up (mean: MCT's AVG)
    # further measures to solve the ILP under; the allocation whose RTN model agrees most often with the float
    # model's top-1 on the last `check_images` calibration images (no labels) is kept. None (the default): the
    # output measure where the model returns class scores (one tensor, a class dim), else none; () turns it off
    select_from: tuple[LossWeights, ...] | None = None
    check_images: int = 256
    act_bit_options: tuple[int, ...] | None = None
    act_avg_bits: float | None = None

    @property
    def measures(self) -> tuple[LossWeights, ...]:
        """loss_weights, then the other measures the allocation is selected from (the automatic choice of
        select_from=None is made on the graph, by the Sensitivity pass)."""
        return (self.loss_weights, *(self.select_from or ()))

    def __post_init__(self):
        budgets = (self.weight_memory, self.avg_bits, self.bops, self.latency, self.act_avg_bits)
        if all(b is None for b in budgets):
            raise ConfigError("mixed precision needs a budget: weight_memory, avg_bits, bops, latency or act_avg_bits")
        if any(b is not None and not b > 0 for b in budgets):
            raise ConfigError(f"budgets must be > 0, got {budgets}")
        if (self.latency is None) != (self.latency_table is None):
            raise ConfigError("a latency budget needs latency_table ({layer: {bits: ms}}), and the table a budget")
        if len(self.bit_options) < 2 or any(not 2 <= b <= 8 for b in self.bit_options):
            raise ConfigError(f"bit_options must hold two or more widths in [2, 8], got {self.bit_options}")
        acts = self.act_bit_options
        if acts is not None and (len(acts) < 2 or any(not 2 <= b <= 8 for b in acts)):
            raise ConfigError(f"act_bit_options must hold two or more widths in [2, 8], got {acts}")
        if self.act_avg_bits is not None and acts is None:
            raise ConfigError("act_avg_bits budgets the activation widths: give act_bit_options too, e.g. (4, 8)")
        if acts is not None and self.bops is not None:
            raise ConfigError(
                "a BOPs budget with activation widths to choose is not supported (BOPs multiply the two choices); "
                "budget activations with act_avg_bits, or leave act_bit_options unset"
            )
        if self.images < 1 or self.batch_size < 1 or self.check_images < 1:
            raise ConfigError(
                f"images, batch_size and check_images must be >= 1, got {self.images}, {self.batch_size}, "
                f"{self.check_images}"
            )
        _coerce_enums_(self, loss_weights=LossWeights)
        if self.select_from is None:
            return
        given = (self.select_from,) if isinstance(self.select_from, (str, LossWeights)) else self.select_from
        try:
            measures = tuple(LossWeights(m) for m in given)
        except ValueError:
            raise ConfigError(
                f"select_from must hold measures from {[w.value for w in LossWeights]}, got {self.select_from!r}"
            ) from None
        object.__setattr__(self, "select_from", tuple(m for m in dict.fromkeys(measures) if m != self.loss_weights))


def measure_fields(text: str | None) -> dict:
    """The MixedPrecisionConfig fields a written measure list asks for, so the CLI and the benches read it alike.

    "lfh,output" (or "lfh+output") -> loss_weights=lfh, select_from=(output,): solve the ILP under each and keep
    the better-agreeing allocation. One measure alone turns the choice off; None or "auto" -> {} (the default).
    """
    if text is None or text.strip() == "auto":
        return {}
    known = [w.value for w in LossWeights]
    names = [t.strip() for t in re.split(r"[,+]", text) if t.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ConfigError(f"unknown measure(s) {bad} in {text!r}: write e.g. lfh or lfh,output; choose from {known}")
    first, *others = names
    return {"loss_weights": LossWeights(first), "select_from": tuple(LossWeights(n) for n in others)}


@dataclass(frozen=True)
class PTQConfig:
    """What to quantize to and how.

    Example:
        PTQConfig(target=fxq.targets.INT8.with_bits(weight_bits=4), method=Method.RTN)
    """

    target: Target = INT8
    method: Method = Method.RTN
    act_threshold: ActThreshold = ActThreshold.MSE
    weight_grid: int = 64  # threshold candidates per weight channel
    weight_error: WeightError = WeightError.MSE  # what the weight threshold minimises (OUTPUT: the layer's output)
    bias_correction: bool = True  # cancel the mean output shift of weight rounding (MCT's default too)
    frontend: Frontend = Frontend.AUTO  # fx, else export
    leaf_modules: tuple = field(default_factory=tuple)
    rounding: RoundingConfig = field(default_factory=RoundingConfig)  # method=EPTQ
    lfh: LFHConfig = field(default_factory=LFHConfig)  # method=EPTQ / mixed precision: the loss weights
    mixed_precision: MixedPrecisionConfig | None = None  # per-layer weight widths under a budget
    # seconds of wall time for the whole run (method=EPTQ): the LFH and the rounding's iteration count are planned
    # to end inside it (fxq.eptq.budget); rounding.iterations stays the upper bound
    time_budget: float | None = None
    progress: bool = True

    def __post_init__(self):
        _coerce_enums_(self, method=Method, act_threshold=ActThreshold, weight_error=WeightError, frontend=Frontend)
        if not isinstance(self.target, Target):
            raise ConfigError(f"target must be an fxq.targets.Target, got {type(self.target).__name__}")
        if self.target.isa is None:  # this machine's integer kernels, so that its backends compute the reference
            object.__setattr__(self, "target", self.target.for_isa(host_isa()))
        if self.weight_grid < 2:
            raise ConfigError(f"weight_grid must be >= 2, got {self.weight_grid}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ConfigError(f"time_budget is seconds of wall time, > 0; got {self.time_budget}")
