"""The command line's options turned into what the API takes: configs, models, image sets."""

from __future__ import annotations

from pathlib import Path

from fxq.config import LFHConfig, MixedPrecisionConfig, PTQConfig, RoundingConfig
from fxq.data.images import ImageSet, load_images
from fxq.data.models import DEFAULT_MODEL, LoadedModel, default_image_sets, load_model
from fxq.data.subset import Subset
from fxq.io.artifact import saved_model_name
from fxq.ir.ops import pick_device
from fxq.targets import INT8

__all__ = [
    "fill_image_sets",
    "mixed_precision_config",
    "rounding_schedule",
    "ptq_config",
    "loaded_model",
    "model_and_images",
    "subset",
]


def fill_image_sets(args) -> None:
    """--calib/--val left out: the shared sets of the model named (of a quantized folder: the model its report
    names), so that a CIFAR-10 model is not calibrated and scored on ImageNet images."""
    missing = [k for k in ("calib", "val") if k in vars(args) and vars(args)[k] is None]
    if not missing:
        return
    name = args.model
    if Path(name).is_dir():
        name = saved_model_name(name) or DEFAULT_MODEL
    sets = dict(zip(("calib", "val"), default_image_sets(name)))
    for k in missing:
        setattr(args, k, str(sets[k]))


def mixed_precision_config(args, **budget) -> MixedPrecisionConfig | None:
    given = {
        "weight_memory": args.weight_memory,
        "avg_bits": args.avg_bits,
        "bops": args.bops,
        "act_avg_bits": args.act_avg_bits,
        **budget,
    }
    if all(v is None for v in given.values()):
        return None
    options = {"bit_options": args.bit_options} if args.bit_options else {}
    if args.act_bit_options:
        options["act_bit_options"] = args.act_bit_options
    options.update(args.mp_loss_weights or {})
    return MixedPrecisionConfig(**given, **options, images=args.mp_images, check_images=args.mp_check_images)


def rounding_schedule(args) -> tuple[str, RoundingConfig, LFHConfig]:
    """The rounding and LFH settings the flags ask for; 'auto' is full on a GPU, short on a CPU."""
    on_gpu = pick_device(args.device).type == "cuda"
    name = args.schedule if args.schedule != "auto" else ("full" if on_gpu else "short")
    overrides = {
        k: v
        for k, v in {
            # with a time budget the iteration count is an upper bound: the full schedule's unless given
            "iterations": args.iterations
            if args.iterations is not None
            else (RoundingConfig.iterations if getattr(args, "time_budget", None) else None),
            "batch_size": args.rounding_batch,
            "images": args.rounding_images,
            "checkpoint_dir": args.checkpoint_dir,
            "checkpoint_every": args.checkpoint_every,
            "frozen_share": args.frozen_share,
            "start_sensitivity": args.start_sensitivity,
            "act_drop": args.act_drop,
            "start_sweeps": args.start_sweeps,
            "prefix_steps": args.prefix_steps,
        }.items()
        if v is not None
    }
    overrides.update(
        loss_weights=args.loss_weights,
        train_bias=not args.no_bias_training,
        train_act_steps=args.train_act_steps,
        resume=args.resume,
        start=args.start,
    )
    rounding = RoundingConfig.short(**overrides) if name == "short" else RoundingConfig(**overrides)
    probes = args.lfh_probes or (16 if name == "short" else 100)
    return name, rounding, LFHConfig(min_probes=min(10, probes), max_probes=probes)


def ptq_config(
    args, weight_bits: int, method: str | None = None, mixed: MixedPrecisionConfig | None = None
) -> PTQConfig:
    _, rounding, lfh = rounding_schedule(args)
    return PTQConfig(
        mixed_precision=mixed or mixed_precision_config(args),
        target=INT8.with_bits(weight_bits, args.act_bits).for_isa(args.target),
        method=method or args.method,
        act_threshold=args.act_threshold,
        weight_error=args.weight_error,
        frontend=args.frontend,
        bias_correction=not args.no_bias_correction,
        rounding=rounding,
        lfh=lfh,
        time_budget=getattr(args, "time_budget", None),
        progress=not args.quiet,
    )


def subset(args, count: int | None) -> Subset:
    """The images --num-calib/--num-val (or another count) ask for: drawn at random with --subset-seed, or the first
    ones with --first."""
    return Subset(count, first=getattr(args, "first", False), seed=getattr(args, "subset_seed", 0))


def loaded_model(args) -> LoadedModel:
    """The model the flags name, on the device they name (the passes and the data follow its parameters)."""
    lm = load_model(args.model, args.weights, args.random_weights)
    lm.model.to(pick_device(args.device))
    return lm


def model_and_images(args) -> tuple[LoadedModel, ImageSet, ImageSet | None]:
    lm = loaded_model(args)
    show = not args.quiet
    calib = load_images(args.calib, lm.preprocess, subset(args, args.num_calib), progress=show)
    val = (
        None
        if getattr(args, "no_eval", False)
        else load_images(args.val, lm.preprocess, subset(args, args.num_val), labeled=True, progress=show)
    )
    return lm, calib, val
