#!/usr/bin/env python
"""Fine-tune a ConvNeXt V2 image classifier with the Trainer (from FCMAE weights, a classifier, or scratch).

    python examples/classification/run_finetune.py --model_name_or_path fcmae-atto --train_dir path/to/labelled \
        --output_dir atto-finetuned --num_train_epochs 50 --layer_decay 0.9 --model_ema

All flags, including every `TrainingArguments` one: `python examples/classification/run_finetune.py --help`.
Expected errors print one line; `CONVNEXTV2_HF_DEBUG=1` shows the traceback (`--debug` is a TrainingArguments
option here). The code lives in `convnextv2_hf.training.finetune`.
"""

import sys

from convnextv2_hf.cli import run_entry_point
from convnextv2_hf.training.finetune import main

if __name__ == "__main__":
    sys.exit(run_entry_point(main, debug_flag=False))
