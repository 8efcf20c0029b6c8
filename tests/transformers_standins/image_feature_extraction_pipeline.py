"""Stand-in for transformers' `tests/pipelines/test_pipelines_image_feature_extraction.py`, which its sdist does
not ship: the two hooks `PipelineTesterMixin` calls, on local images."""

import numpy as np
from PIL import Image
from transformers import ImageFeatureExtractionPipeline


class ImageFeatureExtractionPipelineTests:
    def get_test_pipeline(self, model, tokenizer=None, image_processor=None, feature_extractor=None, processor=None,
                          dtype="float32"):
        extractor = ImageFeatureExtractionPipeline(model=model, image_processor=image_processor, dtype=dtype)
        rng = np.random.default_rng(1)
        return extractor, [Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)) for _ in range(2)]

    def run_pipeline_test(self, extractor, examples):
        outputs = extractor(examples)
        assert len(outputs) == len(examples)
        assert np.asarray(outputs[0]).ndim >= 2
