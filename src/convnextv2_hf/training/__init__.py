"""The training toolkit: never copied into checkpoints.

- `arguments`: `HfArgumentParser` dataclasses shared by both entry points, typed `--config_overrides`.
- `data`, `augmentation`, `masked_datasets`: loading and checking images, seeded augmentation, masked datasets.
- `models`: the model and processor an entry point starts from.
- `checkpoints`, `output_dir`: crash-safe checkpoints and rotation, one run per output folder.
- `optim`, `mixup`, `ema`: the reference recipe's optimizer groups, mixup/cutmix and EMA.
- `fcmae_engine`: the FCMAE loop (plan, resume, epochs, validation).
- `reporting`: pictures and model cards.
- `pretrain`, `finetune`: the entry points, each a short list of these steps.
"""
