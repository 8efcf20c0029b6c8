"""Where a batch comes from: `sources` opens folders (`folders`), shards (`shards`) or hub datasets as `datasets`
splits, indexed once per machine (`per_machine`); `decoding` turns a cell into an RGB image or an unreadable-image
error; `transforms`, `rand_augment` and `mixup` augment it, seeded per sample; `masked_datasets` makes FCMAE
batches. `shard_writer` is `convnextv2-hf write-shards`."""
