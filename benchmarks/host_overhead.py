"""Host time of an FCMAE training step, measured on the CPU: what bounds a GPU step at 64 images per GPU.

    python benchmarks/host_overhead.py                 # base depths, dense and gather
    python benchmarks/host_overhead.py --preset tiny

At the reference's 64 images per GPU the H200 step is host-bound (release 0.2.0: host CPU time = step time), so
the time the host spends dispatching ops is what to cut. This runs the preset's depths with 8-32 channels on 64 px
images, batch 2, bf16 autocast, one thread: the kernels cost next to nothing and what remains is Python, the
dispatcher and autograd, op by op as on the GPU. Prints the median forward+backward time and the aten ops per step.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_step  # noqa: E402  (the batch as the loader hands it over, the median timer)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def host_step(preset: str, backend: str, repeats: int) -> tuple[float, int]:
    """(median ms, aten ops) of one forward+backward of the preset's depths at 8-32 channels."""
    from convnextv2_hf import ConvNextV2Config, ConvNextV2ForMaskedImageModeling

    torch.manual_seed(0)
    config = ConvNextV2Config.from_preset(preset, sparse_backend=backend, hidden_sizes=[8, 16, 24, 32],
                                          decoder_hidden_size=16)
    model = ConvNextV2ForMaskedImageModeling(config).train()
    batch = gpu_step.training_batch(2, 64, config.mask_cell_size, "cpu")

    def forward_backward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    forward_backward()
    with OpCounter() as counter:
        forward_backward()
    return 1000 * gpu_step.median_seconds(forward_backward, "cpu", 3, repeats), sum(counter.counts.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"| {args.preset} depths, 8-32 channels | host ms per step | aten ops per step |\n|---|---|---|")
    for backend in ("dense", "gather"):
        ms, ops = host_step(args.preset, backend, args.repeats)
        print(f"| {backend} | {ms:.1f} | {ops} |")


if __name__ == "__main__":
    main()
