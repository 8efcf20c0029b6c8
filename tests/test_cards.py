"""Cards of converted weights carry the source and its licence, and models trained from them inherit both; every
card the project writes parses with `huggingface_hub.ModelCard` (its `validate()` needs the Hub, so it cannot run
offline)."""

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from conftest import (CLI, FINETUNE, assert_ok, assert_one_line, make_image_folder, perturbed, run_as_user,
                      tiny_config)
from convnextv2_hf import ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling
from convnextv2_hf.convert_convnextv2 import export_checkpoint


def card_of(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def test_converted_reference_weights_carry_their_licence_to_fine_tuning(tmp_path):
    export_checkpoint(perturbed(ConvNextV2ForMaskedImageModeling(tiny_config(image_size=32))), "reference",
                      tmp_path / "convnextv2_tiny_fcmae.pt")
    converted = tmp_path / "converted"
    assert_ok(run_as_user([*CLI, "convert", "--from", "reference", "--checkpoint", str(tmp_path / "convnextv2_tiny_fcmae.pt"),
                           "--output_dir", str(converted), "--task", "classification"], tmp_path))
    card = card_of(converted)
    assert card.data.license == "cc-by-nc-4.0" and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification" and "converted" in card.data.tags
    assert "convnextv2_tiny_fcmae.pt" in card.text and "facebookresearch/ConvNeXt-V2" in card.text
    assert "encoder of an FCMAE checkpoint" in card.text
    assert "Converted with the `convnextv2-hf` Python package" in card.text and "Trained with" not in card.text
    images = make_image_folder(tmp_path / "images", per_class=6, corrupt=False)
    tuned = tmp_path / "tuned"
    assert_ok(run_as_user([*FINETUNE, "--model_name_or_path", str(converted), "--train_dir", str(images),
                           "--output_dir", str(tuned), "--image_size", "32", "--per_device_train_batch_size", "4",
                           "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
                           "--train_val_split", "0.25"], tmp_path))
    assert card_of(tuned).data.license == "cc-by-nc-4.0"
    exported = assert_ok(run_as_user([*CLI, "export", "--to", "timm", "--model_name_or_path", str(tuned), "--output",
                                      str(tmp_path / "tuned-timm.safetensors")], tmp_path))
    assert "licence of these weights: cc-by-nc-4.0" in exported


def test_licence_override_and_base_model_from_a_transformers_folder(tmp_path):
    source = tmp_path / "hf"
    model = ConvNextV2ForImageClassification(tiny_config(image_size=32))
    model.save_pretrained(source)
    ModelCard.from_template(ModelCardData(license="apache-2.0", base_model="facebook/convnextv2-atto-1k-224"),
                            template_str="---\n{{ card_data }}\n---\n# source\n").save(source / "README.md")
    kept = tmp_path / "kept"
    assert_ok(run_as_user([*CLI, "convert", "--from", "transformers", "--checkpoint", str(source), "--output_dir",
                           str(kept)], tmp_path))
    card = card_of(kept)
    assert (card.data.license, card.data.base_model) == ("apache-2.0", "facebook/convnextv2-atto-1k-224")
    overridden = tmp_path / "overridden"
    assert_ok(run_as_user([*CLI, "convert", "--from", "transformers", "--checkpoint", str(source), "--output_dir",
                           str(overridden), "--license", "mit"], tmp_path))
    assert card_of(overridden).data.license == "mit"
    for wrong in ("licença", "x" * 10_000):  # not hub licence identifiers: one line, nothing written
        refused = run_as_user([*CLI, "convert", "--from", "transformers", "--checkpoint", str(source), "--output_dir",
                               str(tmp_path / "refused"), "--license", wrong], tmp_path)
        assert_one_line(refused, "is not a Hugging Face Hub licence identifier", "--license other")
        assert len(refused.stderr) < 600 and not (tmp_path / "refused").exists()
    from_file = tmp_path / "from-file"  # a weights file is not a hub id: nothing to inherit, no base_model
    assert_ok(run_as_user([*CLI, "convert", "--from", "transformers", "--checkpoint", str(source / "model.safetensors"),
                           "--output_dir", str(from_file)], tmp_path))
    assert card_of(from_file).data.base_model is None
    fcmae_ref = tmp_path / "fcmae.pt"
    export_checkpoint(perturbed(ConvNextV2ForMaskedImageModeling(tiny_config())), "reference", fcmae_ref)
    assert_ok(run_as_user([*CLI, "convert", "--from", "reference", "--checkpoint", str(fcmae_ref), "--output_dir",
                           str(tmp_path / "fcmae")], tmp_path))
    card = card_of(tmp_path / "fcmae")
    assert card.data.license == "cc-by-nc-4.0" and card.data.pipeline_tag is None
    assert "FCMAE pre-trained encoder and decoder" in card.text


def test_export_then_convert_back_keeps_labels_licence_and_base_model(tmp_path):
    """An export records the source folder's class names, licence and base model beside the weights (a key of the
    reference checkpoint, safetensors metadata for timm); converting the file back restores them, and the card says
    the file was an export of ours, not the reference's own weights."""
    from convnextv2_hf.cli import main as cli

    source = tmp_path / "mine"
    labels = {0: "cat", 1: "dog", 2: "fish"}
    model = perturbed(ConvNextV2ForImageClassification(tiny_config(image_size=32, id2label=labels)))
    model.save_pretrained(source)
    ModelCard.from_template(ModelCardData(license="mit", base_model="someone/convnextv2-start"),
                            template_str="---\n{{ card_data }}\n---\n# mine\n").save(source / "README.md")
    for layout, name in (("reference", "mine.pth"), ("timm", "mine.safetensors")):
        assert 0 == cli(["export", "--to", layout, "--model_name_or_path", str(source), "--output",
                         str(tmp_path / name)])
        back = tmp_path / f"back-{layout}"
        assert 0 == cli(["convert", "--from", layout, "--checkpoint", str(tmp_path / name), "--output_dir", str(back)])
        assert ConvNextV2ForImageClassification.from_pretrained(back).config.id2label == labels, layout
        card = card_of(back)
        assert (card.data.license, card.data.base_model) == ("mit", "someone/convnextv2-start"), layout
        assert "an export by `convnextv2-hf export`" in card.text and "not trained by convnextv2-hf" not in card.text
