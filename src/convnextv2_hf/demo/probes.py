"""Label-free checks of an encoder's features: linear and k-NN probes on frozen, pooled last-stage features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..training.data.decoding import decode_image


@torch.no_grad()
def pooled_features(encoder, processor, files: list[Path], batch_size: int = 256) -> np.ndarray:
    """Global-average-pooled last-stage features (N, C) of `files`, as the processor prepares them for inference."""
    encoder.eval()
    chunks = []
    for start in range(0, len(files), batch_size):
        images = [decode_image({"path": str(p), "bytes": None}) for p in files[start:start + batch_size]]
        pixels = processor(images, return_tensors="pt")["pixel_values"]
        chunks.append(encoder(pixels).last_hidden_state.mean((2, 3)).numpy())
    return np.concatenate(chunks)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Held-out accuracy of a logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    probe = LogisticRegression(max_iter=5000).fit((train_x - mean) / std, train_y)
    return float(probe.score((test_x - mean) / std, test_y))


def knn_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int = 10) -> float:
    """Held-out accuracy of a k-nearest-neighbour vote (cosine distance, votes weighted by closeness); k is capped
    at the number of labelled images."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=min(k, len(train_y)), metric="cosine", weights="distance")
    return float(knn.fit(train_x, train_y).score(test_x, test_y))


class FrozenFeatures:
    """Pooled features of every training and test image under one encoder, computed once for all probes."""

    def __init__(self, encoder, processor, train_files: list[Path], test_files: list[Path]):
        self.index = {path.name: i for i, path in enumerate(train_files)}
        self.train_x = pooled_features(encoder, processor, train_files)
        self.test_x = pooled_features(encoder, processor, test_files)
        self.test_y = np.array([p.parent.name for p in test_files])

    def probe(self, labelled: list[Path]) -> dict[str, float]:
        """Linear and k-NN probe accuracies with `labelled` (training files, labels from their folders)."""
        rows = [self.index[p.name] for p in labelled]
        train_x, train_y = self.train_x[rows], np.array([p.parent.name for p in labelled])
        return {"linear": linear_probe(train_x, train_y, self.test_x, self.test_y),
                "knn": knn_probe(train_x, train_y, self.test_x, self.test_y)}
