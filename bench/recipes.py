"""Every shipped recipe on a checkpoint of each model family, at 224x224 with the 1000 classes kept.

What a user with an ImageNet checkpoint does, end to end, for each ``recipes/*.yaml`` and each family:

* **timm MetaFormer** (``caformer_s18``: convolution stages, then attention stages),
* **timm ViT** (``deit_tiny_patch16_224``: a class token and 12 attention blocks),
* **a MixerNAS preset** (``EfficientMod-xxs``),

a 1000-class checkpoint is written in timm's training layout (``{"epoch", "arch", "state_dict", ...}``). Nothing may
be downloaded here, so its backbone is the model's own initialisation (seed 0) and its classifier is a linear probe
fitted to the digits as classes 0-9 of 1000 (see :func:`make_checkpoint`): the agreement figures say how much of
that function a recipe keeps, not ImageNet accuracy. Then ``python -m compress --recipe R --model M --checkpoint
C`` runs in its own process, without ``--data``: the built-in digits, resized to 224 and repeated to 3 channels, are
used unlabelled, so the training steps learn the original model's outputs and the classifier is kept.

The recipes run as shipped with two changes, both printed: every training step is shortened to ``--train-steps``
optimizer steps of ``--batch`` images (a 2-core CPU cannot train three 224x224 epochs per run), and ``fit_budget``'s
5 ms target becomes ``--fit-fraction`` of the model's own latency, so that it has to prune.

Afterwards this script reloads each written model with ``compress.load`` (a JSON description plus safetensors) and
checks that it is the compressed model: the input size and 1000 classes kept, the parameter count that
``report.json`` gives, and the same agreement with the original on the same validation images, recomputed here.
The speed-up is the one ``compress`` measured side by side (original and compressed in one run, one thread).

    python bench/recipes.py                                          # 4 recipes x 3 families
    python bench/recipes.py --recipes token-keep-70 --models deit_tiny_patch16_224

Last line: ``recipes_ok=N/M`` then per run ``<recipe>@<model>_speedup=.. _agreement=..`` and ``cpu=..``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import compress  # noqa: E402
from searchspace.data import load_data  # noqa: E402
from searchspace.latency import InputSpec, device_name, measure_latency  # noqa: E402
from searchspace.latency.measure import num_threads  # noqa: E402
from searchspace.training import agreement  # noqa: E402

MODELS = ("caformer_s18", "deit_tiny_patch16_224", "EfficientMod-xxs")
RECIPES = ("prune-50-kd", "token-keep-70", "lowrank-kd", "fit-budget")
TRAINING_STEPS = ("distill", "finetune")
SIZE = 224


def make_checkpoint(name: str, path: Path, images: int) -> None:
    """A 1000-class checkpoint of ``name`` (a timm model or a MixerNAS preset) in timm's training layout.

    A freshly initialised classifier puts nearly the same logits on every image, so its top-1 class hangs on
    noise. To give the checkpoint decisions worth keeping, its classifier (only) is fitted to the digits' labels,
    as classes 0-9 of its 1000, on the frozen backbone's features of ``images`` training images (a linear probe)."""
    torch.manual_seed(0)
    model = compress.create_model(name, num_classes=1000, in_chans=3).model.eval()
    _, data, _ = compress.adapt_to_data(model, load_data(input_size=SIZE))
    x, y = data.train.tensors[0][:images], data.train.tensors[1][:images]
    with num_threads(2), torch.inference_mode():
        features = torch.cat([model.forward_head(model.forward_features(b), pre_logits=True) for b in x.split(32)])
    head = model.get_classifier()
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(head(features.clone()), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        fitted = (head(features).argmax(-1) == y).float().mean().item()
    print(f"  {name}: classifier probed on {len(y)} digits at {SIZE}px, training top-1 {fitted:.3f}", flush=True)
    torch.save({"epoch": 0, "arch": name, "state_dict": model.state_dict(), "version": 2}, path)


def recipe_file(path: Path, model: str, checkpoint: Path, args, work: Path) -> Path:
    """The shipped recipe with training shortened and, for fit_budget, a target of a fraction of the latency."""
    data = yaml.safe_load(path.read_text())
    for step in data["steps"]:
        if not isinstance(step, dict):
            continue
        (name, params), = step.items()
        params = step[name] = dict(params or {})
        if name in TRAINING_STEPS:
            params.update(steps=args.train_steps, batch_size=args.batch)
        if name == "token_prune" and params.get("schedule") == "warmup":
            params["warmup_steps"] = min(params.get("warmup_steps", 0), args.train_steps)
        if name == "fit_budget":
            net = compress.create_model(model, checkpoint=checkpoint).model.eval()
            with num_threads(1):
                ms = measure_latency(net, InputSpec(1, 3, SIZE, SIZE), threads=1).value_ms
            params.update(target=f"{args.fit_fraction * ms:.3f}ms", distill_steps=args.train_steps)
            print(f"  fit_budget target for {model}: {args.fit_fraction:.2f} x {ms:.2f} ms = "
                  f"{args.fit_fraction * ms:.2f} ms")
    out = work / f"{path.stem}-{model}.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def run_cli(recipe: Path, model: str, checkpoint: Path, out: Path, threads: int) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "compress", "--recipe", str(recipe), "--model", model, "--checkpoint",
           str(checkpoint), "--out", str(out), "--threads", str(threads), "--no-step-latency", "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    return done.returncode, time.perf_counter() - start, (done.stderr.strip().splitlines() or [""])[-1]


def verify(out: Path, model: str, checkpoint: Path) -> dict:
    """Reload the written model and check it against its own report and the original checkpoint."""
    report = json.loads((out / "report.json").read_text())
    reloaded = compress.load(out / "model").eval()
    original = compress.create_model(model, checkpoint=checkpoint).model.eval()
    _, data, _ = compress.adapt_to_data(original, load_data(input_size=SIZE))
    with num_threads(2), torch.inference_mode():
        agree = agreement(reloaded, original, data.val)
        logits = reloaded(torch.randn(2, 3, SIZE, SIZE))
    after = report["after"]
    return {"report": report, "agreement": agree, "classes_kept": logits.shape == (2, 1000),
            "size_kept": report["input_shape"] == [1, 3, SIZE, SIZE],
            "params_match": sum(p.numel() for p in reloaded.parameters()) == after["params"],
            "agreement_match": abs(agree - after["agreement"]) < 1e-9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default: {','.join(MODELS)})")
    p.add_argument("--recipes", default=",".join(RECIPES), help="recipes/<name>.yaml, comma-separated (default: all)")
    p.add_argument("--train-steps", type=int, default=10, help="optimizer steps of every training step (default: 10)")
    p.add_argument("--batch", type=int, default=16, help="images per training batch (default: 16)")
    p.add_argument("--probe-images", type=int, default=512,
                   help="digits the checkpoint's classifier is fitted on (default: 512)")
    p.add_argument("--fit-fraction", type=float, default=0.75,
                   help="fit_budget's target as a fraction of the model's own latency (default: 0.75)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of each compress run; latency is measured with them (default: 1)")
    p.add_argument("--work", default=None, help="keep checkpoints and outputs here (default: a temporary folder)")
    args = p.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mixernas-recipes-"))
    work.mkdir(parents=True, exist_ok=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    print(f"{len(recipes)} recipes x {len(models)} models at {SIZE}x{SIZE}, 1000 classes, training {args.train_steps} "
          f"steps of {args.batch}; on {device_name('cpu')}")

    rows, figures, ok = [], {}, 0
    for model in models:
        checkpoint = work / f"{model}.pth.tar"
        if not checkpoint.exists():
            make_checkpoint(model, checkpoint, args.probe_images)
        for name in recipes:
            recipe = recipe_file(ROOT / "recipes" / f"{name}.yaml", model, checkpoint, args, work)
            out = work / f"{name}@{model}"
            code, seconds, last = run_cli(recipe, model, checkpoint, out, args.threads)
            if code != 0:
                rows.append(f"{name:14s} {model:22s} FAILED (exit {code}): {last}")
                print(rows[-1], flush=True)
                continue
            check = verify(out, model, checkpoint)
            rep, good = check["report"], all(check[k] for k in ("classes_kept", "size_kept", "params_match",
                                                                     "agreement_match"))
            ok += good
            sbs = rep["side_by_side"]
            key = f"{name}@{model}".replace("-", "_")
            figures[f"{key}_speedup"] = sbs["speedup"]
            figures[f"{key}_agreement"] = check["agreement"]
            rows.append(f"{name:14s} {model:22s} {'ok' if good else 'MISMATCH':8s} "
                        f"params {rep['before']['params'] / 1e6:.2f}M -> {rep['after']['params'] / 1e6:.2f}M, "
                        f"{sbs['before_ms']:.1f} -> {sbs['after_ms']:.1f} ms ({sbs['speedup']:.2f}x side by side), "
                        f"top-1 agreement {check['agreement']:.3f}, reloaded: 224px {check['size_kept']}, "
                        f"1000 classes {check['classes_kept']}, same params {check['params_match']}, same "
                        f"agreement {check['agreement_match']}; {seconds:.0f} s")
            print(rows[-1], flush=True)

    print()
    print("\n".join(rows))
    print(f"outputs in {work}")
    total = len(models) * len(recipes)
    print(" ".join([f"recipes_ok={ok}/{total}"] + [f"{k}={v:.3f}" for k, v in figures.items()]
                   + [f"cpu={device_name('cpu').replace(' ', '_')}"]))
    return 0 if ok == total else 1


if __name__ == "__main__":
    sys.exit(main())
