"""ConvNeXt V2 and FCMAE masked pre-training for the Hugging Face ecosystem.

Three layers:

- **Model side** (`configuration_convnextv2`, `modeling_convnextv2`, `sparse_backends`, `sparse_ops`, `masking`,
  `image_processing_convnextv2`): flat modules that import only torch, transformers and each other, because FCMAE
  checkpoints carry them as their `trust_remote_code` files.
- **Library side** (`inference`, `convert_convnextv2`, `weights`, `analysis`, `hub`, `metrics`, `outputs/`, `cli`,
  `demo/`): never shipped in checkpoints; conversion and export use none of the training toolkit.
- **Training toolkit** (`training/`): arguments and recipes, `data/`, `loops/`, checkpoints and plots.

Importing the package registers the classes with the `transformers` Auto classes. Classifier, backbone and base
model folders are plain transformers checkpoints; only FCMAE folders carry code, since transformers has no FCMAE.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
)
from transformers.utils import logging as hf_logging

from .configuration_convnextv2 import CONVNEXTV2_PRESETS, ConvNextV2Config
from .image_processing_convnextv2 import ConvNextImageProcessorPil, ConvNextV2ImageProcessor
from .modeling_convnextv2 import (
    ConvNextV2Backbone,
    ConvNextV2ForImageClassification,
    ConvNextV2ForMaskedImageModeling,
    ConvNextV2MaskedImageModelingOutput,
    ConvNextV2Model,
    ConvNextV2PreTrainedModel,
)

__version__ = "0.4.1"

AutoConfig.register(ConvNextV2Config.model_type, ConvNextV2Config, exist_ok=True)
AutoModel.register(ConvNextV2Config, ConvNextV2Model, exist_ok=True)
AutoModelForImageClassification.register(ConvNextV2Config, ConvNextV2ForImageClassification, exist_ok=True)
AutoModelForMaskedImageModeling.register(ConvNextV2Config, ConvNextV2ForMaskedImageModeling, exist_ok=True)
AutoBackbone.register(ConvNextV2Config, ConvNextV2Backbone, exist_ok=True)
_backend = "pil" if issubclass(ConvNextV2ImageProcessor, ConvNextImageProcessorPil) else "torchvision"
_verbosity = hf_logging.get_verbosity()
hf_logging.set_verbosity_error()  # registering resolves transformers' torchvision processor, which warns without it
try:
    AutoImageProcessor.register(ConvNextV2Config, image_processor_classes={_backend: ConvNextV2ImageProcessor},
                                exist_ok=True)
finally:
    hf_logging.set_verbosity(_verbosity)

# Only what transformers lacks writes its code into saved folders (for trust_remote_code).
ConvNextV2ForMaskedImageModeling.register_for_auto_class("AutoModelForMaskedImageModeling")
ConvNextV2ImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "CONVNEXTV2_PRESETS",
    "ConvNextV2Config",
    "ConvNextV2ImageProcessor",
    "ConvNextV2Model",
    "ConvNextV2PreTrainedModel",
    "ConvNextV2ForImageClassification",
    "ConvNextV2Backbone",
    "ConvNextV2ForMaskedImageModeling",
    "ConvNextV2MaskedImageModelingOutput",
]
