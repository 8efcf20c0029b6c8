"""Stand-in for transformers' `tests/pipelines/test_pipelines_image_classification.py`, which its sdist does not
ship: the same two hooks `PipelineTesterMixin` calls, on local images (the real test also fetches a URL)."""

import numpy as np
from PIL import Image
from transformers import ImageClassificationPipeline


def example_images():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (61, 83, 3), dtype=np.uint8))
    return [rgb, rgb.convert("L"), rgb.convert("RGBA"), Image.fromarray(rng.integers(0, 255, (30, 200, 3), dtype=np.uint8))]


class ImageClassificationPipelineTests:
    def get_test_pipeline(self, model, tokenizer=None, image_processor=None, feature_extractor=None, processor=None,
                          dtype="float32"):
        classifier = ImageClassificationPipeline(model=model, image_processor=image_processor, dtype=dtype, top_k=2)
        return classifier, example_images()

    def run_pipeline_test(self, classifier, examples):
        for output in [classifier(examples[0])] + classifier(examples):
            assert len(output) == 2, output
            for entry in output:
                assert isinstance(entry["score"], float) and isinstance(entry["label"], str), entry
                assert entry["label"] in classifier.model.config.id2label.values()
            assert output[0]["score"] >= output[1]["score"]
