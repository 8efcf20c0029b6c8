#!/usr/bin/env python
"""Fine-tune a ConvNeXt V2 image classifier with the Trainer (from FCMAE weights, a classifier, or scratch).

    python examples/classification/run_finetune.py --model_name_or_path fcmae-atto --train_dir path/to/labelled \
        --output_dir atto-finetuned --do_train --do_eval --num_train_epochs 50 --learning_rate 2e-4 \
        --layer_decay 0.9 --label_smoothing_factor 0.1 --eval_strategy epoch

All flags, including every `TrainingArguments` one: `python examples/classification/run_finetune.py --help`.
The code lives in `convnextv2_hf.training.finetune`.
"""

from convnextv2_hf.training.finetune import main

if __name__ == "__main__":
    main()
