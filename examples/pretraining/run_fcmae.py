#!/usr/bin/env python
"""Pre-train ConvNeXt V2 with FCMAE on your images (Accelerate).

    accelerate launch examples/pretraining/run_fcmae.py --train_dir path/to/images --output_dir fcmae-atto \
        --model_preset atto --per_device_train_batch_size 64 --num_train_epochs 100 --warmup_epochs 10

All flags: `python examples/pretraining/run_fcmae.py --help`. Expected errors print one line; `--debug` shows the
traceback. The loop lives in `convnextv2_hf.training.pretrain`.
"""

import sys

from convnextv2_hf.cli import run_entry_point
from convnextv2_hf.training.pretrain import main

if __name__ == "__main__":
    sys.exit(run_entry_point(main))
