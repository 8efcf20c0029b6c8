"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`, `PipelineTesterMixin`,
`BackboneTesterMixin`), run for real over our classes from the sdist of the installed transformers version.

Where a common check cannot apply to a masked autoencoder it is overridden below with a one-line reason, as
transformers' own ViTMAE tests do.
"""

import json
import os
import sys
import tempfile
import unittest
from pathlib import Path

import pytest
import torch
import transformers

from transformers_suite import transformers_test_tree

TREE, REASON = transformers_test_tree()
if TREE is None:
    pytest.skip(f"transformers' common tests are unavailable: {REASON}", allow_module_level=True)

from convnextv2_hf import (  # noqa: E402
    ConvNextV2Backbone,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
    ConvNextV2ForMaskedImageModeling,
    ConvNextV2Model,
)

PIPELINE_CLASSES = {"image-classification": ConvNextV2ForImageClassification, "image-feature-extraction": ConvNextV2Model}


def write_tiny_models(root: Path) -> None:
    """The pipeline mixin's tiny models, in the local layout it reads from `TRANSFORMERS_TINY_MODEL_PATH`."""
    from transformers import ConvNextImageProcessorPil

    summary = {}
    for model_class in PIPELINE_CLASSES.values():
        folder = root / "convnextv2" / model_class.__name__
        config = ConvNextV2Config(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], num_labels=3)
        model_class(config).save_pretrained(folder)
        ConvNextImageProcessorPil(size={"shortest_edge": 32}).save_pretrained(folder)
        summary[model_class.__name__] = {"tokenizer_classes": [], "processor_classes": ["ConvNextImageProcessorPil"],
                                         "model_classes": [model_class.__name__]}
    (root / "reports").mkdir(parents=True, exist_ok=True)
    (root / "reports" / "tiny_model_summary.json").write_text(json.dumps(summary))


TINY_MODELS = Path(tempfile.mkdtemp(prefix="convnextv2-tiny-models-"))
write_tiny_models(TINY_MODELS)
os.environ["TRANSFORMERS_TINY_MODEL_PATH"] = str(TINY_MODELS)
sys.path.insert(0, str(TREE))

from tests.test_backbone_common import BackboneTesterMixin  # noqa: E402
from tests.test_configuration_common import ConfigTester  # noqa: E402
from tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor  # noqa: E402
from tests.test_pipeline_mixin import PipelineTesterMixin  # noqa: E402


class ConvNextV2ModelTester:
    """Sizes and checks as in transformers' own ConvNeXt V2 tests; `extra` adds config fields."""

    def __init__(self, parent, batch_size=13, image_size=32, with_mask=False, **extra):
        self.parent, self.batch_size, self.image_size, self.with_mask = parent, batch_size, image_size, with_mask
        self.num_channels, self.num_stages, self.num_labels, self.is_training = 3, 4, 10, True
        self.hidden_sizes, self.depths = [10, 20, 30, 40], [2, 2, 3, 2]
        self.extra = extra

    def get_config(self):
        return ConvNextV2Config(num_channels=self.num_channels, hidden_sizes=self.hidden_sizes, depths=self.depths,
                                num_stages=self.num_stages, hidden_act="gelu", is_decoder=False,
                                initializer_range=0.02, out_features=["stage2", "stage3", "stage4"],
                                out_indices=[2, 3, 4], num_labels=self.num_labels, decoder_hidden_size=16,
                                **self.extra)

    def fixed_mask(self):
        """Masks fixed by the inputs, not drawn in forward: the common checks compare several forward passes."""
        cells = (self.image_size // 32) ** 2
        mask = torch.zeros(self.batch_size, cells, dtype=torch.bool)
        for i in range(self.batch_size):
            mask[i, torch.randperm(cells, generator=torch.Generator().manual_seed(i))[: cells // 2]] = True
        return mask

    def prepare_config_and_inputs_for_common(self):
        inputs = {"pixel_values": floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])}
        if self.with_mask:
            inputs["bool_masked_pos"] = self.fixed_mask()
        return self.get_config(), inputs

    def prepare_config_and_inputs_with_labels(self):
        config, inputs = self.prepare_config_and_inputs_for_common()
        if not self.with_mask:
            inputs["labels"] = ids_tensor([self.batch_size], self.num_labels)
        return config, inputs


class TransformersDefaults:
    """transformers' tests expect its default log level (some read warnings); conftest turns it down."""

    def setUp(self):
        previous = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_warning()
        self.addCleanup(transformers.logging.set_verbosity, previous)
        self.model_tester = self.make_tester()


class ConvNextV2ModelChecks:
    """What transformers' own ConvNeXt V2 tests change in the common checks: no token embeddings or feed-forward
    chunking to test, and hidden states checked as the stem plus one map per stage, the stem at 1/4."""

    test_resize_embeddings = False
    has_attentions = False
    test_torch_exportable = True
    expected_batch = 1

    @unittest.skip(reason="ConvNeXt V2 takes pixel values only, no inputs_embeds (as in transformers' own tests)")
    def test_inputs_embeds(self):
        pass

    def test_model_get_set_embeddings(self):
        """As transformers' vision models (ViT) check it: the input embedding is a module (the stem convolution,
        which FSDP2 and `enable_input_require_grads` use), and there is no output embedding."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
            self.assertIsNone(model.get_output_embeddings())

    @unittest.skip(reason="ConvNeXt V2 has no feed-forward chunking (as in transformers' own ConvNeXt V2 tests)")
    def test_feed_forward_chunking(self):
        pass


    def test_hidden_states_output(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        tester = self.model_tester
        for model_class in self.all_model_classes:
            for via_config in (False, True):
                config.output_hidden_states = via_config
                model = model_class(config).eval()
                with torch.no_grad():
                    outputs = model(**self._prepare_for_class(inputs, model_class), output_hidden_states=not via_config or None)
                hidden_states = outputs.hidden_states
                self.assertEqual(len(hidden_states), tester.num_stages + 1)
                self.assertEqual(list(hidden_states[0].shape), [tester.batch_size * self.expected_batch,
                                                                tester.hidden_sizes[0], tester.image_size // 4,
                                                                tester.image_size // 4])


class ConvNextV2CommonTest(TransformersDefaults, ConvNextV2ModelChecks, ModelTesterMixin, PipelineTesterMixin,
                          unittest.TestCase):
    all_model_classes = (ConvNextV2Model, ConvNextV2ForImageClassification, ConvNextV2Backbone)
    pipeline_model_mapping = PIPELINE_CLASSES

    def make_tester(self):
        self.config_tester = ConfigTester(self, config_class=ConvNextV2Config, has_text_modality=False, hidden_size=37,
                                          common_properties=["hidden_sizes", "num_channels"])
        return ConvNextV2ModelTester(self)

    def test_config(self):
        self.config_tester.run_common_tests()


class ConvNextV2BackboneCommonTest(TransformersDefaults, BackboneTesterMixin, unittest.TestCase):
    all_model_classes = (ConvNextV2Backbone,)
    config_class = ConvNextV2Config
    has_attentions = False

    def make_tester(self):
        return ConvNextV2ModelTester(self)


class FCMAECommonTest(TransformersDefaults, ConvNextV2ModelChecks, ModelTesterMixin, unittest.TestCase):
    all_model_classes = (ConvNextV2ForMaskedImageModeling,)
    # Per-image GRN norms: with the reference's batch-wide sparse GRN, one sample's output depends on the others,
    # which the batching checks rightly reject.
    tester_kwargs = {"sparse_grn_scope": "sample"}

    def make_tester(self):
        return ConvNextV2ModelTester(self, image_size=64, with_mask=True, **self.tester_kwargs)


class MixMAECommonTest(FCMAECommonTest):
    tester_kwargs = {"sparse_grn_scope": "sample", "mask_strategy": "mixmae"}
    expected_batch = 2  # the sources' own encodings, then their partners'

    @unittest.skip(reason="MixMAE pairs each image with the batch-flipped one, so a sample's output depends on its batch")
    def test_batching_equivalence(self):
        pass
