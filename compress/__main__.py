"""``python -m compress``: apply a YAML recipe to a checkpoint; write the compressed model and a before/after report.

    python -m compress --recipe recipes/prune-50-kd.yaml --model runs/default-5ms
    python -m compress --recipe recipes/lowrank-kd.yaml --model convformer_s18 --checkpoint cf18.pth --data photos/
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from searchspace import cli
from searchspace.errors import MixerNASError

DESCRIPTION = """\
Apply a compression recipe (recipes/*.yaml: channel pruning, token pruning, low-rank, distillation, fine-tuning,
measurement) to a model and its checkpoint. The recipe is validated whole before anything runs.

Model (--model): a MixerNAS search results folder (its weights are used; --checkpoint optional), a folder written
by this command, an architecture JSON file, a MixerNAS preset (e.g. PoolFormerV2-S12), or a timm model name (e.g.
poolformerv2_s12, convformer_s18, caformer_s18, vit_tiny_patch16_224, deit_small_patch16_224), created with
pretrained=False: nothing is downloaded, the weights come from --checkpoint (.pth/.pt loaded with
weights_only=True, or .safetensors; training-script layouts are unwrapped; a file that needs pickled code is
refused, never executed).

The model stays the user's: its input size, input channels and classifier are kept unless asked otherwise
(--input-size, --num-classes, or the recipe's input_size).

Data (--data): an image folder, one sub-folder per class (split reproducibly into train/validation), or a folder
of loose images (unlabelled); default the built-in handwritten digits, resized to the model's input size and
repeated to its 3 channels. Data without labels of the checkpoint's classes (the digits for an ImageNet
checkpoint, loose images) is used unlabelled: the training steps learn the original model's outputs
(distillation), and the report gives agreement with the original model's top-1 instead of accuracy. A --data
folder whose classes differ from the checkpoint's replaces the classifier with a new, untrained one for those
classes (its accuracy starts at chance, so such recipes should fine-tune first); the summary says so.

Units: latency in milliseconds (ms) or microseconds (us), measured on --device with --threads at batch 1 and
--input-size pixels: the median of short interleaved rounds (reference-corrected on the CPU), with the spread of
the rounds in percent. Params and MACs (multiply-accumulates of one forward pass) are counts; accuracy is
validation top-1 in [0, 1]. The
speed-up is original / compressed latency, measured side by side in one run."""

DEFAULT_INPUT_SIZE = 224  # what timm's models and the MixerNAS presets are configured for

EPILOG = """\
output folder (--out): model/ (compressed.json + model.safetensors; reload with compress.load(folder)),
report.json, report.md and recipe.yaml (a copy of the recipe).
exit status: 0 success, 2 bad input (one line on stderr says what to change), 130 interrupted."""


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="python -m compress", description=DESCRIPTION, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", metavar="YAML", help="recipe file, e.g. recipes/prune-50-kd.yaml (required)")
    p.add_argument("--model", metavar="NAME|FILE|DIR",
                   help="results folder, compressed-model folder, arch.json, MixerNAS preset or timm model name "
                        "(required)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="weights: .pth, .pt or .safetensors (required unless --model is a folder with weights)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="image folder, one sub-folder per class (default: the built-in digits)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: runs/compress/<model>-<recipe>)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--input-size", type=int, default=None, metavar="PIXELS",
                   help="square image side in pixels the model is compressed and measured at (default: the recipe's "
                        "input_size, else the model's own: the size a ViT checkpoint's grid was trained at, a timm "
                        f"model's configured size, the size a results folder was searched at; else "
                        f"{DEFAULT_INPUT_SIZE})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for training and measuring (default: torch's; 1 gives the steadiest "
                        "latencies on a small shared CPU)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes the compressed model predicts (default: the checkpoint's, read from it); another "
                        "number replaces the classifier and needs --data with that many classes")
    p.add_argument("--use-ema", action="store_true", help="load the EMA weights of a timm training checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default: 0)")
    g = p.add_argument_group("latency measurement")
    g.add_argument("--rounds", type=int, default=10, help="interleaved rounds per measurement (default: 10)")
    g.add_argument("--warmup", type=int, default=10, help="untimed runs before measuring (default: 10)")
    cli.add_run_arguments(g)  # --runtime reaches the measure and fit_budget steps too
    g.add_argument("--round-ms", type=float, default=20.0,
                   help="target length of one round in milliseconds; sets the runs per round (default: 20)")
    g.add_argument("--no-step-latency", action="store_true",
                   help="measure latency only before and after the recipe, not after every step")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.add_argument("--list-steps", action="store_true", help="print every recipe step with its parameters and exit")
    return p


def list_steps() -> str:
    """Every registered step: description, then each parameter with its type, default, range and help."""
    from .recipe import describe_types
    from .steps import STEPS, get_step

    lines = []
    for name in STEPS.names():
        spec = get_step(name)
        lines.append(f"{name}{' (needs data)' if spec.needs_data else ''}: {spec.description}")
        for key, param in spec.params.items():
            types = param.type if isinstance(param.type, tuple) else (param.type,)
            bounds = [f">= {param.minimum}" if param.minimum is not None else "",
                      f"<= {param.maximum}" if param.maximum is not None else "",
                      f"one of {', '.join(map(str, param.choices))}" if param.choices else ""]
            shown = list(param.default) if isinstance(param.default, tuple) else param.default
            default = "required" if param.required else f"default {shown!r}"
            extra = ", ".join(b for b in bounds if b)
            lines.append(f"    {key}: {describe_types(types)}, {default}{', ' + extra if extra else ''}"
                         f"{' - ' + param.help if param.help else ''}")
    return "\n".join(lines)


def _check_args(args: argparse.Namespace) -> None:
    for flag, value, low in (("--input-size", args.input_size, 8), ("--threads", args.threads, 1),
                             ("--num-classes", args.num_classes, 1), ("--rounds", args.rounds, 1),
                             ("--warmup", args.warmup, 0)):
        if value is not None and value < low:
            raise MixerNASError(f"{flag} must be at least {low}, got {value}")
    if not args.round_ms > 0:
        raise MixerNASError(f"--round-ms must be a positive number of milliseconds, got {args.round_ms}")


def _default_out(model: str, recipe: str) -> Path:
    stem = Path(model.rstrip("/")).stem if ("/" in model or model.endswith(".json")) else model
    return Path("runs") / "compress" / re.sub(r"[^\w.-]+", "_", f"{stem}-{recipe}")


def run(args: argparse.Namespace) -> int:
    from searchspace.data import load_data
    from searchspace.latency import InputSpec, resolve_device
    from searchspace.runtimes import get_runtime

    from . import apply, saving
    from .checkpoint import adapt_to_data, create_model, model_num_classes, read_state_dict
    from .recipe import load_recipe
    from .steps.measure import MeasureOptions

    if args.list_steps:
        print(list_steps())
        return 0
    for flag, value in (("--recipe", args.recipe), ("--model", args.model)):
        if value is None:
            raise MixerNASError(f"{flag} is required (see --help)")
    _check_args(args)
    recipe = load_recipe(args.recipe)  # validated whole before anything else is loaded
    device = str(resolve_device(args.device))
    get_runtime(args.runtime).check(device)  # installed and runs here, before any work
    dtype, run = cli.run_options(args, device)
    model_path = Path(args.model).expanduser()
    if args.checkpoint is None and not model_path.is_dir():
        raise MixerNASError(f"--checkpoint is required with --model {args.model!r} (a name or arch.json has no "
                            f"weights); only a results or compressed-model folder brings its own")
    log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))

    state = read_state_dict(args.checkpoint, use_ema=args.use_ema) if args.checkpoint else None  # fail fast
    asked = args.input_size or recipe.input_size
    loaded = create_model(args.model, checkpoint=state, checkpoint_label=args.checkpoint, input_size=asked)
    size = asked or loaded.input_size or DEFAULT_INPUT_SIZE
    data = load_data(args.data, input_size=size, seed=args.seed, allow_unlabelled=True)
    log(f"data: {data.describe()}")
    model, data, notes = adapt_to_data(loaded.model, data, seed=args.seed, num_classes=args.num_classes,
                                       other_classes="replace" if args.data else "distil")
    label = f"{loaded.kind} model {loaded.name!r}" + (f" (checkpoint {args.checkpoint})" if args.checkpoint else "")
    spec = InputSpec(batch=1, channels=data.in_chans, height=data.input_size, width=data.input_size)
    out = Path(args.out) if args.out else _default_out(args.model, recipe.name)

    compressed, report = apply(
        recipe, model, data, input_spec=spec, device=device, threads=args.threads,
        measure=MeasureOptions(warmup=args.warmup, rounds=args.rounds, target_round_ms=args.round_ms,
                               runtime=args.runtime, dtype=dtype, run=run),
        step_latency=not args.no_step_latency, label=label, notes=loaded.notes + notes, log=log)

    extra = {"recipe": recipe.name, "input_size": data.input_size, "in_chans": data.in_chans,
             "num_classes": model_num_classes(compressed),
             "class_names": list(data.class_names) if data.labelled else None, "data": data.describe(),
             "mean": list(data.mean), "std": list(data.std), "from": label, "change": report.change()}
    saving.save(compressed, out / "model", example=spec, extra=extra)
    report.write(out)
    from searchspace._io import atomic_write_text

    atomic_write_text(out / "recipe.yaml", recipe.text or "")
    print(report.summary())
    print(f"written: {out}/ (model/, report.md, report.json, recipe.yaml)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
