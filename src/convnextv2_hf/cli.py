"""The `convnextv2-hf` command line."""

from __future__ import annotations

import argparse
import os
import sys


def quickstart(args: argparse.Namespace) -> None:
    """Pre-train a tiny FCMAE model for a few steps on generated images and print the loss."""
    import torch
    from tqdm.auto import tqdm

    from . import ConvNextV2Config, ConvNextV2ForMaskedImageModeling
    from .synthetic import shape_images

    torch.manual_seed(args.seed)
    config = ConvNextV2Config(
        depths=[1, 1, 2, 1], hidden_sizes=[16, 32, 48, 64], patch_size=2, decoder_hidden_size=32, mask_ratio=0.6
    )
    model = ConvNextV2ForMaskedImageModeling(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    images = shape_images(args.batch_size * 4, size=64, seed=args.seed)
    progress = tqdm(range(args.steps), desc="FCMAE pre-training")
    for step in progress:
        batch = images[(step % 4) * args.batch_size : (step % 4 + 1) * args.batch_size]
        loss = model(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        progress.set_postfix(loss=f"{loss.item():.4f}")
        print(f"step {step + 1:3d}  loss {loss.item():.4f}", file=sys.stderr if args.quiet else sys.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="convnextv2-hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    quick = commands.add_parser("quickstart", help=quickstart.__doc__)
    quick.add_argument("--steps", type=int, default=20)
    quick.add_argument("--batch_size", type=int, default=8)
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--quiet", action="store_true")
    quick.set_defaults(func=quickstart)

    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args.func(args)


if __name__ == "__main__":
    main()
