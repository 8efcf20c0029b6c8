"""The training toolkit: never copied into checkpoints. Read it in the order a run goes:

- `pretrain`, `finetune`: the two entry points, each a short list of the steps below.
- `arguments`, `recipes`, `device_settings`, `models`: the flags, the reference recipes, precision and devices, and
  the model and processor a run starts from.
- `data/`: where a batch comes from. `sources` (folders, shards, hub datasets) -> `folders`, `shards` and the
  `per_machine` index -> `decoding` (one decoder, unreadable images) -> `transforms`, `rand_augment`, `mixup` ->
  `masked_datasets` (FCMAE batches); `shard_writer` makes shards.
- `loops/`: `fcmae` (the pre-training loop on Accelerate) and `trainer` (the fine-tuning `Trainer`), with the
  recipe's `optim` and `ema`.
- `checkpoints`, `plots`: what a run writes on top of `convnextv2_hf.outputs` (output folder, staging, manifest,
  cards): checkpoints found, rotated and checked; loss curves and reconstructions.
"""
