"""``python -m searchspace.export <results folder | arch.json --weights FILE | preset> --format onnx --out FILE``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from compress.checkpoint import create_model, model_in_chans

from .. import cli
from ..latency import InputSpec
from . import FORMATS, SUFFIX, export_model

DESCRIPTION = """\
Export a model for deployment and check it: a search's results folder (its winner with trained weights), an
architecture JSON file with --weights, a compressed model folder, or a preset (random weights).

--format onnx writes one self-contained ONNX file (torch.onnx.export with the dynamo exporter) and runs it with
ONNX Runtime (needs: pip install -e '.[onnx]'); --format torch-export writes a torch.export program (.pt2, load it
with torch.export.load). The exported model's outputs are compared with PyTorch's on a random input and the
largest absolute difference is printed; for ONNX, its ONNX Runtime latency on this machine (milliseconds, one
thread by default, with its 95% interval) is measured too. The input size defaults to the size the results folder
was searched at (else 224x224); channels and classes come from the model itself."""


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="python -m searchspace.export", description=DESCRIPTION,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a results folder, an arch.json (with --weights), a compressed model folder or a "
                                 "preset name")
    p.add_argument("--weights", default=None, help="weights for an arch.json: a .safetensors or .pth file")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="onnx (default) or torch-export")
    p.add_argument("--out", default=None, help="the file to write (default: model.onnx / model.pt2 here)")
    p.add_argument("--input-size", type=int, default=None,
                   help="image side in pixels (default: what the results folder was searched at, else 224)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the exported input (default: 1)")
    p.add_argument("--threads", type=int, default=1, help="threads for the ONNX Runtime latency (default: 1)")
    p.add_argument("--no-latency", action="store_true", help="skip the ONNX Runtime latency measurement")
    return p


def run(args: argparse.Namespace) -> int:
    loaded = create_model(args.model, checkpoint=args.weights, input_size=args.input_size)
    model = loaded.model.eval()
    size = args.input_size or loaded.input_size or 224
    chans = model_in_chans(model) or 3
    spec = InputSpec(batch=args.batch, channels=chans, height=size, width=size)
    out = args.out or f"model{SUFFIX[args.format]}"
    print(f"exporting {loaded.name} ({loaded.kind}) for input {'x'.join(map(str, spec.shape))} to {out}",
          file=sys.stderr)
    result = export_model(model, spec, args.format, out, measure=not args.no_latency, threads=args.threads)
    print(result)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv, prog="python -m searchspace.export")


if __name__ == "__main__":
    sys.exit(main())
