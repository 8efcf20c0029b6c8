"""Top-1 and top-5 accuracy from classifier logits, as an `evaluate` metric module shipped with convnextv2-hf.

Hub metrics cannot be fetched offline; this module loads from its path:
`evaluate.load(convnextv2_hf.metrics.metric_path("topk_accuracy"))`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of samples whose label is among the k highest-scoring classes, for k = 1 and k = 5."
_KWARGS_DESCRIPTION = """
Args:
    predictions: logits or scores, one list of floats per sample; or one predicted class id per sample (as
        `evaluate.evaluator("image-classification")` passes them), from which only top-1 can be computed.
    references: integer class labels.
    top_k: the k values to report (default (1, 5); k larger than the class count counts every sample correct).
Returns:
    top1_accuracy, top5_accuracy (one key per k), in [0, 1]; for class-id predictions only top1_accuracy.
Example:
    >>> metric = evaluate.load("path/to/topk_accuracy")
    >>> metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1])
    {'top1_accuracy': 0.5, 'top5_accuracy': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopkAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
                ),
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            ],
        )

    def _compute(self, predictions, references, top_k=(1, 5)):
        labels = np.asarray(references)
        if np.asarray(predictions).ndim == 1:  # class ids: the ranking of the other classes is unknown
            return {"top1_accuracy": float((np.asarray(predictions) == labels).mean())}
        scores = np.asarray(predictions, dtype=np.float64)
        if scores.ndim != 2 or len(scores) != len(labels):
            raise ValueError(f"predictions must be (samples, classes) scores; got shape {scores.shape} for {len(labels)} labels")
        order = np.argsort(-scores, axis=1)
        return {
            f"top{k}_accuracy": float((order[:, :k] == labels[:, None]).any(axis=1).mean()) for k in top_k
        }
