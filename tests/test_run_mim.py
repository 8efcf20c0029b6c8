"""transformers' masked-image-modeling example (`run_mim.py`) drives our FCMAE model: its SimMIM-style masks per
`patch_size` patch, its config updates (`image_size`, `patch_size`, `encoder_stride`), the Trainer with
`remove_unused_columns=False`."""

import numpy as np
import pytest
import torch
import transformers
from transformers import Trainer, TrainingArguments

from conftest import make_image_folder, tiny_config
from convnextv2_hf import ConvNextV2ForMaskedImageModeling
from convnextv2_hf.training.data.transforms import PretrainTransform
from convnextv2_hf.training.data.decoding import decode_image


class SimMIMMaskGenerator:
    """run_mim.py's convention: `ceil(ratio * blocks)` random `mask_patch_size` blocks masked, the mask repeated to
    one entry per `model_patch_size` patch and flattened."""

    def __init__(self, input_size: int, mask_patch_size: int, model_patch_size: int, mask_ratio: float, seed: int = 0):
        self.blocks = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.masked = int(np.ceil(self.blocks**2 * mask_ratio))
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> torch.Tensor:
        mask = np.zeros(self.blocks**2, dtype=int)
        mask[self.rng.permutation(self.blocks**2)[: self.masked]] = 1
        mask = mask.reshape(self.blocks, self.blocks).repeat(self.scale, 0).repeat(self.scale, 1)
        return torch.tensor(mask.flatten())


def test_config_exposes_what_run_mim_reads_and_writes():
    config = tiny_config()
    assert (config.image_size, config.patch_size, config.encoder_stride) == (224, 2, 16)
    config.update({"image_size": 32, "patch_size": 2, "encoder_stride": 16})  # run_mim writes them back
    assert config.image_size == 32
    with pytest.raises(ValueError, match="encoder_stride=32 does not match"):
        config.update({"encoder_stride": 32})
    assert isinstance(transformers.AutoModelForMaskedImageModeling.from_config(config), ConvNextV2ForMaskedImageModeling)


def test_patch_level_masks_are_reduced_to_cells_or_refused():
    model = ConvNextV2ForMaskedImageModeling(tiny_config()).eval()
    images = torch.randn(2, 3, 32, 32)
    per_patch = SimMIMMaskGenerator(32, 16, 2, 0.5)
    patch_masks = torch.stack([per_patch(), per_patch()])
    assert patch_masks.shape == (2, 256)
    cells = patch_masks.view(2, 16, 16)[:, ::8, ::8].reshape(2, 4).bool()
    a = model(images, bool_masked_pos=patch_masks)
    b = model(images, bool_masked_pos=cells)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.loss, b.loss)
    uneven = patch_masks.clone()
    uneven[:, 0] = 1 - uneven[:, 0]  # one 2-px patch differs from the rest of its cell
    with pytest.raises(ValueError, match="not constant within each 16-px mask cell"):
        model(images, bool_masked_pos=uneven)
    with pytest.raises(ValueError, match="must have shape"):
        model(images, bool_masked_pos=torch.zeros(2, 100, dtype=torch.bool))


def test_run_mim_data_path_trains_with_the_trainer(tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=8, corrupt=False)
    from datasets import load_dataset

    dataset = load_dataset("imagefolder", data_files={"train": str(folder / "**")}, split="train")
    config = tiny_config()
    config.update({"image_size": 32, "patch_size": 2, "encoder_stride": config.encoder_stride})
    model = transformers.AutoModelForMaskedImageModeling.from_config(config)
    transform = PretrainTransform(32, [0.5] * 3, [0.5] * 3, scale=(0.67, 1.0))
    masks = SimMIMMaskGenerator(32, 16, config.patch_size, 0.6)
    generator = torch.Generator().manual_seed(0)

    def preprocess(examples):
        examples["pixel_values"] = [transform(decode_image(image), generator) for image in examples["image"]]
        examples["mask"] = [masks() for _ in examples["image"]]
        return examples

    def collate_fn(examples):  # run_mim.py's collator
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "bool_masked_pos": torch.stack([e["mask"] for e in examples])}

    dataset.set_transform(preprocess)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), remove_unused_columns=False,
                             label_names=["bool_masked_pos"], per_device_train_batch_size=4, max_steps=16,
                             learning_rate=3e-3, logging_steps=1, report_to="none", save_strategy="no", seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate_fn)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 16 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
