"""The two training loops: `fcmae` (FCMAE pre-training on Accelerate: plan, resume, epochs, validation,
checkpoints) and `trainer` (the fine-tuning `Trainer`: crash-safe checkpoints, EMA, mixup), with the reference
recipe's optimizer groups (`optim`) and weight EMA (`ema`)."""
