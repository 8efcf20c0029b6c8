"""Mixup and cutmix for fine-tuning: a collator that mixes batches into soft labels (seeded by the batch)."""

from __future__ import annotations

import numpy as np
import torch


class MixupCutmixCollator:
    """Batches with mixup or cutmix (one chosen per batch) and soft, optionally smoothed, labels."""

    def __init__(self, num_labels: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, switch_prob: float = 0.5,
                 label_smoothing: float = 0.0, seed: int = 0):
        self.num_labels, self.mixup_alpha, self.cutmix_alpha = num_labels, mixup_alpha, cutmix_alpha
        self.switch_prob, self.label_smoothing, self.seed = switch_prob, label_smoothing, seed

    def batch_rng(self, examples) -> np.random.Generator:
        """Draws seeded by the batch itself (seed, epoch, sample indices): the same batch mixes the same way after a
        resume. Without indices (plain examples) the draws fall back to numpy's global state."""
        if all("sample_index" in e for e in examples):
            return np.random.default_rng([self.seed, examples[0].get("epoch", 0)] + [e["sample_index"] for e in examples])
        return np.random.default_rng(np.random.randint(2**31))

    def soft_labels(self, labels: torch.Tensor) -> torch.Tensor:
        off = self.label_smoothing / self.num_labels
        return torch.full((len(labels), self.num_labels), off).scatter_(1, labels[:, None], 1 - self.label_smoothing + off)

    def __call__(self, examples):
        pixels = torch.stack([e["pixel_values"] for e in examples])
        labels = self.soft_labels(torch.tensor([e["labels"] for e in examples]))
        rng = self.batch_rng(examples)
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        if alpha <= 0 or len(examples) < 2:
            return {"pixel_values": pixels, "labels": labels}
        lam = float(rng.beta(alpha, alpha))
        flipped = pixels.flip(0)
        if use_cutmix:
            h, w = pixels.shape[-2:]
            cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
            y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
            x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
            pixels = pixels.clone()
            pixels[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            pixels = lam * pixels + (1 - lam) * flipped
        return {"pixel_values": pixels, "labels": lam * labels + (1 - lam) * labels.flip(0)}
