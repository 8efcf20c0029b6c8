"""The `convnextv2-hf` command line."""

from __future__ import annotations

import argparse
import os
import sys


def convert(args: argparse.Namespace) -> None:
    """Convert a reference-repository, timm or transformers checkpoint into this package's format."""
    from .convert_convnextv2 import convert_checkpoint, read_id2label
    from .hub import ensure_hub_available

    if args.push_to_hub:
        ensure_hub_available("push the converted model", args.hub_token)
    model = convert_checkpoint(
        args.checkpoint, args.source, args.output_dir, task=args.task, id2label=read_id2label(args.id2label),
        push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id,
    )
    config = model.config
    print(f"{type(model).__name__}: depths {config.depths}, widths {config.hidden_sizes}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters -> {args.output_dir}")


def export(args: argparse.Namespace) -> None:
    """Write one of our checkpoints in the reference repository's or timm's layout."""
    from transformers import AutoConfig

    from . import ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling
    from .convert_convnextv2 import export_checkpoint

    config = AutoConfig.from_pretrained(args.model_name_or_path)
    fcmae = "ConvNextV2ForMaskedImageModeling" in (config.architectures or [])
    model_class = ConvNextV2ForMaskedImageModeling if fcmae else ConvNextV2ForImageClassification
    model = model_class.from_pretrained(args.model_name_or_path)
    foreign = export_checkpoint(model, args.layout, args.output)
    print(f"wrote {len(foreign)} tensors in the {args.layout} layout to {args.output}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="convnextv2-hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    conv = commands.add_parser("convert", help=convert.__doc__)
    conv.add_argument("--from", dest="source", required=True, choices=["reference", "timm", "transformers"])
    conv.add_argument("--checkpoint", required=True, help="a .pth/.pt/.bin/.safetensors file or a model folder")
    conv.add_argument("--output_dir", required=True)
    conv.add_argument("--task", default="auto", choices=["auto", "fcmae", "classification"],
                      help="auto: FCMAE checkpoints -> masked image modeling (with decoder), others -> classifier")
    conv.add_argument("--id2label", help="JSON file: a list of class names or an {index: name} object")
    conv.add_argument("--push_to_hub", action="store_true")
    conv.add_argument("--hub_model_id")
    conv.add_argument("--hub_token")
    conv.set_defaults(func=convert)

    exp = commands.add_parser("export", help=export.__doc__)
    exp.add_argument("--to", dest="layout", required=True, choices=["reference", "timm"])
    exp.add_argument("--model_name_or_path", required=True)
    exp.add_argument("--output", required=True, help="file to write (.pth for reference, .safetensors for timm)")
    exp.set_defaults(func=export)

    demo = commands.add_parser("demo", help="pre-train, fine-tune and report on a real data set, offline", add_help=False)
    demo.set_defaults(func=None)

    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "demo":  # the demo has its own parser (and --help)
        from .demo import main as run_demo

        run_demo(argv[1:])
        return
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args.func(args)


if __name__ == "__main__":
    main()
