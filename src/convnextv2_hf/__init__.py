"""ConvNeXt V2 and FCMAE masked pre-training for the Hugging Face ecosystem.

Importing the package registers its classes with the `transformers` Auto classes, and marks them so that
`save_pretrained` writes their code beside the weights (`trust_remote_code=True` then works without this package).
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
)
from transformers.utils import logging as hf_logging

from .configuration_convnextv2 import CONVNEXTV2_PRESETS, ConvNextV2Config
from .image_processing_convnextv2 import ConvNextV2ImageProcessor
from .modeling_convnextv2 import (
    ConvNextV2ForImageClassification,
    ConvNextV2ForMaskedImageModeling,
    ConvNextV2MaskedImageModelingOutput,
    ConvNextV2Model,
    ConvNextV2PreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register(ConvNextV2Config.model_type, ConvNextV2Config, exist_ok=True)
AutoModel.register(ConvNextV2Config, ConvNextV2Model, exist_ok=True)
AutoModelForImageClassification.register(ConvNextV2Config, ConvNextV2ForImageClassification, exist_ok=True)
AutoModelForMaskedImageModeling.register(ConvNextV2Config, ConvNextV2ForMaskedImageModeling, exist_ok=True)
_verbosity = hf_logging.get_verbosity()
hf_logging.set_verbosity_error()  # registering resolves transformers' torchvision processor, which warns without it
try:
    AutoImageProcessor.register(
        ConvNextV2Config, image_processor_classes={"pil": ConvNextV2ImageProcessor}, exist_ok=True
    )
finally:
    hf_logging.set_verbosity(_verbosity)

ConvNextV2Config.register_for_auto_class()
ConvNextV2Model.register_for_auto_class("AutoModel")
ConvNextV2ForImageClassification.register_for_auto_class("AutoModelForImageClassification")
ConvNextV2ForMaskedImageModeling.register_for_auto_class("AutoModelForMaskedImageModeling")
ConvNextV2ImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "CONVNEXTV2_PRESETS",
    "ConvNextV2Config",
    "ConvNextV2ImageProcessor",
    "ConvNextV2Model",
    "ConvNextV2PreTrainedModel",
    "ConvNextV2ForImageClassification",
    "ConvNextV2ForMaskedImageModeling",
    "ConvNextV2MaskedImageModelingOutput",
]
