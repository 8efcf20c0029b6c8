"""`convnextv2-hf demo --quick` end to end: the label-efficiency sweep (two label counts, one seed), its table and
plot, the budget table, checkpoints that plain transformers serves, numbers that parse."""

import json
import re

import pytest
from PIL import Image

from conftest import assert_served_like_ours, write_photo
from convnextv2_hf.cli import main as cli
from convnextv2_hf.demo.data import stratified_sample


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert 0 == cli(["demo", "--quick", "--output_dir", str(out)])
    for name in ("results.md", "results.json", "label_efficiency.png", "finetune_curves.png", "reconstructions.png",
                 "pretrain_loss_curve.png", "feature_collapse.png"):
        assert (out / name).exists(), name
    assert Image.open(out / "label_efficiency.png").size[0] > 300
    report = (out / "results.md").read_text()
    assert report.index("## Label efficiency") < report.index("## Fine-tuning budget") < report.index("Feature collapse")
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([+-][\d.]+) \| ([\d.]+) / ([\d.]+) \| ([\d.]+) / ([\d.]+) "
                      r"\| (\d+) epochs, (\d+) steps of (\d+) \| ([\d.]+) \|$", report, flags=re.M)
    assert [r[0] for r in rows] == ["1", "10"]
    summary = json.loads((out / "results.json").read_text())
    for labels, fcmae, scratch, gain, *probes in rows:
        point = summary["label_sweep"][labels]
        assert float(fcmae) == pytest.approx(100 * point["top1"]["fcmae"][0], abs=0.051)
        assert float(gain) == pytest.approx(float(fcmae) - float(scratch), abs=0.11)
        assert all(0 <= float(v) <= 100 for v in probes[:4]) and int(probes[5]) == point["steps"]
        assert set(point["top1"]) == {"fcmae", "scratch", "linear FCMAE", "linear random", "knn FCMAE", "knn random"}
    assert summary["stops_being_ahead"].startswith("By the mean over seeds")
    assert summary["stops_being_ahead"] in report and "seed-to-seed spread" in summary["stops_being_ahead"]
    assert re.search(r"\| fine-tuned from FCMAE \| [\d.]+ \| [\d.]+ \|", report)
    assert len(summary["collapse"]["FCMAE, with GRN"]) == 6
    assert "label sweep" in capsys.readouterr().out
    # the published classifier is a plain transformers checkpoint, served like ours
    assert_served_like_ours(out / "convnextv2-demo-finetuned", write_photo(tmp_path / "digit.jpg", (40, 52)), tmp_path)
    capsys.readouterr()
    assert cli(["demo", "--quick", "--output_dir", str(out)]) == 2  # a second demo needs --overwrite_output_dir
    message = capsys.readouterr().err
    assert "--overwrite_output_dir" in message and "--resume_from_checkpoint" not in message  # the demo has no resume


def test_feature_collapse_sample_covers_every_class(tmp_path):
    files = []
    for digit in range(10):
        (tmp_path / str(digit)).mkdir()
        for i in range(40):
            files.append(tmp_path / str(digit) / f"{i}.png")
    sample = stratified_sample(files, 256, seed=0)
    per_class = {d: sum(p.parent.name == str(d) for p in sample) for d in range(10)}
    assert len(sample) == 256 and set(per_class.values()) <= {25, 26}
    assert stratified_sample(files, 256, seed=0) == sample != stratified_sample(files, 256, seed=1)


def test_own_folders_keep_only_images_of_class_folders(tmp_path):
    from conftest import make_image_folder
    from convnextv2_hf.demo.data import list_folder

    root = make_image_folder(tmp_path / "mine", per_class=3, corrupt=False)
    (root / "cats" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("about these images")
    files, classes = list_folder(root)
    assert classes == ["cats", "dogs"] and len(files) == 6
    assert all(path.suffix == ".png" and classes[label] == path.parent.name for path, label in files)


def test_pictures_name_every_line_tick_and_masked_cell(tmp_path, monkeypatch):
    """The label-efficiency plot names its last tick "all (N)", not the mean per class; every curve is in a legend;
    masked cells are drawn in a colour of their own, not white or black like the digits' strokes and background."""
    import matplotlib.pyplot as plt
    import torch

    from convnextv2_hf.training.plots import MASKED_COLOUR, as_rgb, save_curves

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    save_curves({"FCMAE": ([1, 10, 125.8], [0.5, 0.7, 0.9])}, str(tmp_path / "a.png"), "t", logx=True,
                tick_labels={125.8: "all (126)"}, ylim=(0, 1))
    axes = figures[-1].axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["1", "10", "all (126)"]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["FCMAE"] and axes.get_ylim() == (0, 1)
    grey = torch.tensor([[[[0.0, 1.0], [float("nan"), 0.5]]]])  # one channel, one masked pixel
    shown = as_rgb(grey)
    assert shown.shape == (1, 3, 2, 2) and shown[0, :, 1, 0].tolist() == pytest.approx(MASKED_COLOUR)
    assert shown[0, :, 0, 1].tolist() == [1.0, 1.0, 1.0]
