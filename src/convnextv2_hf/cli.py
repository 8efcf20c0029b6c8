"""The `convnextv2-hf` command line, and the error handling every entry point shares.

An expected error (a bad input, a missing file, a full disk) ends the program with one line on stderr that names the
input and the fix, and exit code 2; `--debug` (or `CONVNEXTV2_HF_DEBUG=1`) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

DEBUG_ENV = "CONVNEXTV2_HF_DEBUG"
# Raised on purpose for bad inputs (ValueError, OSError and subclasses, KeyError from conversion, RuntimeError from
# hub and dataset loading, ImportError for optional engines); anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (ValueError, OSError, KeyError, RuntimeError, ImportError)
HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter
DESCRIPTION = ("ConvNeXt V2 and FCMAE for the Hugging Face ecosystem: convert and export checkpoints, write image "
               "shards, run the demo. Training: examples/pretraining/run_fcmae.py and "
               "examples/classification/run_finetune.py.")


def one_line(error: BaseException) -> str:
    text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    if "\nOriginal Traceback (most recent call last):" in text:  # re-raised from a data-loader worker: its message
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split()) or type(error).__name__


def run_entry_point(main: Callable[[list[str]], object], argv: list[str] | None = None,
                    debug_flag: bool = True) -> int:
    """Run `main(argv)` and return its exit code; with `debug_flag`, `--debug` in `argv` asks for tracebacks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
    if debug_flag and "--debug" in argv:
        argv.remove("--debug")
        debug = True
    quiet_transformers()
    try:
        main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as error:
        if debug:
            raise
        from .launch_errors import say_error
        from .training.data.shared_memory import explain_shared_memory_error

        hint = "--debug or " if debug_flag else ""
        message = explain_shared_memory_error(one_line(error))
        say_error(f"error: {message} ({hint}{DEBUG_ENV}=1 shows the traceback)", message)
        return 2
    return 0


def quiet_transformers() -> None:
    """transformers' own info and warnings off, unless the user chose a level (it reads TRANSFORMERS_VERBOSITY
    when it is imported, so setting the variable here would have no effect)."""
    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


def convert(args: argparse.Namespace) -> None:
    """Convert a reference-repository, timm or transformers checkpoint into this package's format."""
    from .outputs.cards import check_license
    from .convert_convnextv2 import convert_checkpoint, read_id2label
    from .hub import ensure_hub_available
    from .outputs.output_dir import claim_output_dir

    check_license(args.license)  # before any work
    if args.push_to_hub:
        ensure_hub_available("push the converted model", args.hub_token)
    refuse_output_over_input(args.checkpoint, args.output_dir)
    with claim_output_dir(args.output_dir, resume=False, overwrite=args.overwrite_output_dir):
        model = convert_checkpoint(
            args.checkpoint, args.source, args.output_dir, task=args.task, id2label=read_id2label(args.id2label),
            push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id, hub_token=args.hub_token,
            license=args.license,
        )
    config = model.config
    print(f"{type(model).__name__}: depths {config.depths}, widths {config.hidden_sizes}, "
          f"{model.num_parameters() / 1e6:.2f} M parameters -> {args.output_dir}")


def refuse_output_over_input(checkpoint: str, output_dir: str) -> None:
    """`--checkpoint` must not be `--output_dir` itself nor a file there that the conversion writes."""
    from fnmatch import fnmatch

    from .outputs.output_dir import RUN_OUTPUTS

    source, target = Path(checkpoint).resolve(), Path(output_dir).resolve()
    if source == target or (source.parent == target and any(fnmatch(source.name, p) for p in RUN_OUTPUTS)):
        raise ValueError(f"--checkpoint {checkpoint!r} would be overwritten by the converted model in --output_dir "
                         f"{output_dir!r}; choose another --output_dir.")


def export(args: argparse.Namespace) -> None:
    """Write one of our checkpoints in the reference repository's or timm's layout."""
    from . import ConvNextV2Config, ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling
    from .convert_convnextv2 import export_checkpoint
    from .weights import load_checked
    from .outputs.cards import start_card

    source, output = args.model_name_or_path, Path(args.output)
    if not os.path.isdir(source) and (os.path.exists(source) or source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise FileNotFoundError(f"--model_name_or_path {source!r} is not a model folder (one holding config.json).")
    if output.is_dir():
        raise IsADirectoryError(f"--output {str(output)!r} is a folder; give a file path, e.g. {output / 'model.pth'}.")
    if os.path.isdir(source) and output.resolve().parent == Path(source).resolve():
        raise ValueError(f"--output {str(output)!r} is inside the model folder it exports from; write it elsewhere, "
                         f"e.g. {Path(source).resolve().parent / output.name}.")
    config = ConvNextV2Config.from_pretrained(source)
    fcmae = "ConvNextV2ForMaskedImageModeling" in (config.architectures or [])
    model_class = ConvNextV2ForMaskedImageModeling if fcmae else ConvNextV2ForImageClassification
    model = load_checked(model_class, source, config)
    card = start_card(source)
    foreign = export_checkpoint(model, args.layout, output, card=card)
    print(f"wrote {len(foreign)} tensors in the {args.layout} layout to {output}")
    license = card.get("license")
    print(f"licence of these weights: {license} (from {source}'s card)" if license else
          f"licence of these weights: not recorded in {source}; weights converted from the reference repository "
          "or timm are CC-BY-NC 4.0")


def write_shards(args: argparse.Namespace) -> None:
    """Write an image folder as webdataset (.tar) or parquet shards, for --train_files on many machines."""
    from .training.data.shard_writer import write_shards as write

    written = write(args.train_dir, args.output_dir, args.format, args.images_per_shard, args.num_proc,
                    None if args.keep_order else args.seed)
    print(f"wrote {len(written)} {args.format} shard(s) to {args.output_dir}; pre-train on them with "
          f"--train_files '{Path(args.output_dir) / ('*.tar' if args.format == 'webdataset' else '*.parquet')}'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convnextv2-hf", description=DESCRIPTION,
                                     epilog=f"--debug (or {DEBUG_ENV}=1) shows full tracebacks.")
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser("convert", help=convert.__doc__, formatter_class=HELP_FORMAT)
    conv.add_argument("--from", dest="source", required=True, choices=["reference", "timm", "transformers"],
                      help="the layout of --checkpoint")
    conv.add_argument("--checkpoint", required=True, help="a .pth/.pt/.bin/.safetensors file or a model folder")
    conv.add_argument("--output_dir", required=True, help="folder for the converted model, processor and card")
    conv.add_argument("--overwrite_output_dir", action="store_true", help="replace a model already in --output_dir")
    conv.add_argument("--task", default="auto", choices=["auto", "fcmae", "classification"],
                      help="auto: FCMAE checkpoints -> masked image modeling (with decoder), others -> classifier")
    conv.add_argument("--id2label", help="JSON file: a list of class names or an {index: name} object")
    conv.add_argument("--license", help="hub licence id of the weights for the card; None: the source's (CC-BY-NC 4.0 "
                      "for the reference's and timm's ConvNeXt V2 weights)")
    conv.add_argument("--push_to_hub", action="store_true", help="upload the converted folder to the hub")
    conv.add_argument("--hub_model_id", help="hub repository to push to; None: the --output_dir name")
    conv.add_argument("--hub_token", help="hub token; None: the one `hf auth login` saved")
    conv.set_defaults(func=convert)
    exp = commands.add_parser("export", help=export.__doc__, formatter_class=HELP_FORMAT)
    exp.add_argument("--to", dest="layout", required=True, choices=["reference", "timm"], help="the layout to write")
    exp.add_argument("--model_name_or_path", required=True, help="a model folder of ours (classifier or FCMAE)")
    exp.add_argument("--output", required=True, help="file to write (.pth for reference, .safetensors for timm)")
    exp.set_defaults(func=export)
    shard = commands.add_parser("write-shards", help=write_shards.__doc__, formatter_class=HELP_FORMAT)
    shard.add_argument("--train_dir", required=True, help="an image folder (class sub-folders become labels)")
    shard.add_argument("--output_dir", required=True, help="a new or empty folder")
    shard.add_argument("--format", default="webdataset", choices=["webdataset", "parquet"],
                       help="webdataset: .tar of <key>.jpg (+ .cls); parquet: datasets' Image and ClassLabel columns, "
                            "as the hub's ImageNet copies")
    shard.add_argument("--images_per_shard", type=int, default=1000,
                       help="images per shard; give at least processes x data-loader workers shards")
    shard.add_argument("--num_proc", type=int, help="processes writing shards; None: the cores, at most 8")
    shard.add_argument("--seed", type=int, default=0, help="the shuffle of the images across shards")
    shard.add_argument("--keep_order", action="store_true",
                       help="write the folder's sorted order instead (shards of about one class each)")
    shard.set_defaults(func=write_shards)
    commands.add_parser("demo", help="How many labels does FCMAE pre-training save? Pre-train, fine-tune and report "
                        "on a real data set, offline (demo --help).", add_help=False)
    return parser


def dispatch(argv: list[str]) -> None:
    if argv and argv[0] == "demo":  # the demo has its own parser (and --help)
        from .demo import main as run_demo

        run_demo(argv[1:])
        return
    args = build_parser().parse_args(argv)
    args.func(args)


def main(argv: list[str] | None = None) -> int:
    """The `convnextv2-hf` console script; returns the exit code."""
    return run_entry_point(dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())
