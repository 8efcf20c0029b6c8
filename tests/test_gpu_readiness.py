"""What a GPU training step needs, checked on the CPU: no op that waits for the device in the FCMAE step, a compiled
step that is the eager step (and never recompiles), deterministic runs, the EMA on the model's device."""

import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_config, with_active_grn
from convnextv2_hf import ConvNextV2ForMaskedImageModeling
from convnextv2_hf.masking import random_masking
from convnextv2_hf.training.data.masked_datasets import collate

# aten ops that copy a value or a data-dependent shape back to the host: each one waits for the GPU
SYNCING = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive",
           "is_nonzero", "equal", "nonzero_static"}


class SyncCounter(TorchDispatchMode):
    """Counts the syncing ops, and indexing by a boolean mask (`x[mask]`, which is a `nonzero` on the device)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if name in SYNCING or boolean_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def training_batch(size=64, batch=4, seed=0):
    """A batch as the pre-training data loader gives it: images and masks stacked by the FCMAE collator."""
    generator = torch.Generator().manual_seed(seed)
    grid = (size // 16, size // 16)
    samples = [{"pixel_values": torch.randn(3, size, size, generator=generator),
                "bool_masked_pos": random_masking(1, grid, 0.6, generator=generator)[0]} for _ in range(batch)]
    return collate(samples)


def test_the_gather_training_step_never_waits_for_the_device():
    for scope in ("batch", "sample"):
        model = with_active_grn(ConvNextV2ForMaskedImageModeling(tiny_config(sparse_backend="gather",
                                                                             sparse_grn_scope=scope,
                                                                             drop_path_rate=0.1))).train()
        batch = training_batch()
        assert batch["visible_cells_per_image"] == 6  # int(16 * 0.4), counted on the host by the collator
        counter = SyncCounter()
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        with counter:
            loss.backward()
        assert counter.seen == [], (scope, counter.seen)
        # the counter does see them: a mask without its count is read back once to be checked
        batch.pop("visible_cells_per_image")
        with SyncCounter() as reading:
            model(**batch)
        assert reading.seen, "the counter missed the mask check"


def test_collated_sites_equal_the_general_path_and_grn_is_repeatable():
    model = with_active_grn(ConvNextV2ForMaskedImageModeling(tiny_config(sparse_backend="gather",
                                                                         sparse_grn_scope="sample")))
    batch = training_batch(seed=3)
    losses, grads = [], []
    for count in (batch["visible_cells_per_image"], None, batch["visible_cells_per_image"]):
        model.zero_grad()
        loss = model(**{**batch, "visible_cells_per_image": count}).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(losses[0], losses[1], rtol=1e-6) and torch.allclose(grads[0], grads[1], atol=1e-6)
    assert torch.equal(losses[0], losses[2]) and torch.equal(grads[0], grads[2])  # bit for bit, run to run


def test_grn_statistics_are_fp32_under_bf16_autocast():
    model = with_active_grn(ConvNextV2ForMaskedImageModeling(tiny_config(sparse_backend="gather",
                                                                         sparse_grn_scope="sample")))
    batch = training_batch(seed=5)
    exact = model(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = model(**batch).loss
    assert torch.isfinite(half) and abs(float(half) - float(exact)) < 0.05 * float(exact)
    rows = torch.full((2 * 3000, 4), 300.0, dtype=torch.float16)  # 3000 * 300^2 overflows an fp16 sum of squares
    from convnextv2_hf.sparse_ops import channel_norm

    assert torch.isfinite(channel_norm(rows.view(2, 3000, 4), 1)).all()


def test_both_backends_compile_to_one_graph_that_never_recompiles():
    from torch._dynamo.testing import CompileCounterWithBackend

    for backend in ("gather", "dense"):
        torch._dynamo.reset()
        model = with_active_grn(ConvNextV2ForMaskedImageModeling(tiny_config(sparse_backend=backend,
                                                                             drop_path_rate=0.1))).train()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
        for step in range(4):  # new images, masks and drop-path draws every step
            compiled(**training_batch(seed=step)).loss.backward()
        assert counter.frame_count == 1, (backend, counter.frame_count)


def run_script(script, args, tmp_path, **env):
    from conftest import run_as_user

    result = run_as_user([*script, *args], tmp_path, timeout=600, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_torch_compile_flag_trains_as_eager_without_recompiles(tmp_path):
    """`run_fcmae.py --torch_compile` (inductor, fp32 on the CPU): the same losses as eager within 1e-5, no
    recompilation over the run's steps, checkpoints that load, and the card says so. The compiled run asks for CUDA
    graphs (which inductor leaves out on the CPU) with gradient accumulation: its gradients go into buffers kept over
    the run and zeroed in place, and still add up as eager's do; the log says that the graphs were left out."""
    import json

    from conftest import PRETRAIN, TINY_OVERRIDES, make_image_folder

    images = make_image_folder(tmp_path / "images", per_class=6, corrupt=False)
    common = ["--train_dir", str(images), "--config_overrides", TINY_OVERRIDES, "--image_size", "32",
              "--per_device_train_batch_size", "4", "--max_train_steps", "4", "--num_warmup_steps", "1",
              "--sparse_backend", "gather", "--checkpointing_steps", "2", "--dataloader_num_workers", "0",
              "--gradient_accumulation_steps", "2"]
    histories = {}
    for name, extra in (("eager", []), ("compiled", ["--torch_compile", "--torch_compile_mode", "reduce-overhead"])):
        result = run_script(PRETRAIN, [*common, "--output_dir", str(tmp_path / name), *extra], tmp_path,
                            TORCH_LOGS="recompiles")
        histories[name] = json.loads((tmp_path / name / "train_results.json").read_text())["loss_history"]
        assert "Recompiling" not in result.stderr, result.stderr[-3000:]
        said = "asked for CUDA graphs, but inductor left them out" in result.stderr
        assert said == (name == "compiled" and not torch.cuda.is_available()), result.stderr[-3000:]
    assert [step for step, _ in histories["compiled"]] == [1, 2, 3, 4]
    for (_, eager), (_, compiled) in zip(histories["eager"], histories["compiled"]):
        assert abs(eager - compiled) < 1e-5
    assert "fp32 on cpu, compiled" in (tmp_path / "compiled" / "README.md").read_text()
    assert (tmp_path / "compiled" / "checkpoint-4" / "model.safetensors").is_file()


def test_deterministic_runs_repeat_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    from conftest import PRETRAIN, TINY_OVERRIDES, make_image_folder

    images = make_image_folder(tmp_path / "images", per_class=6, corrupt=False)
    weights = []
    for run in ("a", "b"):
        run_script(PRETRAIN, ["--train_dir", str(images), "--config_overrides", TINY_OVERRIDES, "--image_size", "32",
                              "--per_device_train_batch_size", "4", "--max_train_steps", "3", "--num_warmup_steps",
                              "1", "--deterministic", "--dataloader_num_workers", "2", "--output_dir",
                              str(tmp_path / run)], tmp_path)
        weights.append(load_file(str(tmp_path / run / "model.safetensors")))
        assert "deterministic" in (tmp_path / run / "README.md").read_text()
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_the_ema_follows_the_model_to_its_device():
    """The Trainer moves the model after the callback is made; the EMA must follow (a stand-in device: meta)."""
    from convnextv2_hf import ConvNextV2ForImageClassification
    from convnextv2_hf.training.loops.trainer import EMACallback

    model = ConvNextV2ForImageClassification(tiny_config())
    callback = EMACallback(model, 0.9)
    assert next(callback.ema.parameters()).device.type == "cpu"
    model.to("meta")  # as `Trainer._move_model_to_device` does, to cuda
    callback.on_train_begin(None, None, None, model=model)
    assert {p.device.type for p in callback.ema.parameters()} == {"meta"}
    assert {t.device.type for t in callback.ema.state_dict().values()} == {"meta"}


def test_precision_defaults_bf16_on_cuda_and_fp32_elsewhere(monkeypatch):
    from transformers import TrainingArguments

    from convnextv2_hf.training import device_settings

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert device_settings.default_mixed_precision(None) is None  # no CUDA here
    assert device_settings.default_mixed_precision("no") == "no"
    monkeypatch.setattr(device_settings, "cuda_bf16_available", lambda: True)
    assert device_settings.default_mixed_precision(None) == "bf16"
    assert device_settings.default_mixed_precision("no") == "no"  # the flag turns it off
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert device_settings.default_mixed_precision(None) is None  # the launch config decides
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    args = TrainingArguments(output_dir="unused", report_to="none")
    device_settings.finetuning_precision(args, lambda name: False)
    assert args.bf16 and args.mixed_precision == "bf16"
    kept = TrainingArguments(output_dir="unused", report_to="none")
    device_settings.finetuning_precision(kept, lambda name: name == "bf16")  # --bf16 false given
    assert not kept.bf16 and kept.mixed_precision == "no"


def test_the_cuda_benchmark_section_runs_in_quick_mode(tmp_path):
    """`benchmark.py --sections gpu --quick`: the GPU section's code on the CPU, so it cannot rot between GPU runs."""
    from conftest import REPO, run_as_user

    report = tmp_path / "quick.md"
    result = run_as_user([sys.executable, str(REPO / "benchmarks" / "benchmark.py"), "--sections", "gpu", "--quick",
                          "--output", str(report)], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in report.read_text().splitlines() if line.startswith("| quick 4 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["dense", "gather"]
    assert [row.split("|")[7].strip() for row in rows] == ["0 / -", "0 / -"], rows  # no sync in forward, backward
    assert "EMA update" in report.read_text() and "transformers" in report.read_text()


def test_fine_tuning_pins_loader_memory_only_where_there_is_an_accelerator():
    """Pinning on a CPU-only machine warns once per loader and pins nothing; a given flag is kept."""
    from transformers import TrainingArguments

    from convnextv2_hf.training import device_settings

    args = TrainingArguments(output_dir="unused", report_to="none")
    device_settings.finetuning_pin_memory(args, lambda name: False)
    assert args.dataloader_pin_memory is torch.accelerator.is_available()
    kept = TrainingArguments(output_dir="unused", report_to="none", dataloader_pin_memory=True)
    device_settings.finetuning_pin_memory(kept, lambda name: name == "dataloader_pin_memory")
    assert kept.dataloader_pin_memory
