"""`convnextv2-hf demo --quick` end to end: files, checkpoints and numbers that parse."""

import json
import re

import pytest

from convnextv2_hf.cli import main as cli


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert 0 == cli(["demo", "--quick", "--output_dir", str(out)])
    for name in ("results.md", "results.json", "reconstructions.png", "pretrain_loss_curve.png",
                 "finetune_curves.png", "feature_collapse.png"):
        assert (out / name).exists(), name
    for checkpoint in ("fcmae", "convnextv2-demo-finetuned"):
        assert (out / checkpoint / "model.safetensors").exists()
        assert "model-index" in (out / checkpoint / "README.md").read_text() or checkpoint == "fcmae"
        assert (out / checkpoint / "README.md").exists()
    report = (out / "results.md").read_text()
    rows = re.findall(r"\| \((a|b)\) [^|]+\| ([\d.]+) \+- ([\d.]+) % \| ([\d., ]+) \|", report)
    assert [r[0] for r in rows] == ["a", "b"]
    for _, mean, std, per_seed in rows:
        seeds = [float(v) for v in per_seed.split(",")]
        assert len(seeds) == 2 and all(0 <= v <= 100 for v in seeds)
        assert float(mean) == pytest.approx(sum(seeds) / 2, abs=0.06)
    summary = json.loads((out / "results.json").read_text())
    assert summary["gain_points"] == pytest.approx(100 * (sum(summary["fcmae_top1"]) - sum(summary["scratch_top1"])) / 2)
    collapse = summary["collapse"]["FCMAE, with GRN"]
    assert len(collapse) == 6 and all(0 <= v <= 1 for v in collapse.values())
    assert "held-out" in capsys.readouterr().out
