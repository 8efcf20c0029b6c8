"""Every sparse-encoder backend computes the same loss, reconstruction and gradients as the dense reference."""

import pytest
import torch

from conftest import active_mim, tiny_config
from convnextv2_hf import ConvNextV2Config, ConvNextV2ForMaskedImageModeling
from convnextv2_hf.masking import random_masking
from convnextv2_hf.sparse_backends import SPARSE_BACKENDS, get_sparse_backend, minkowski_engine_available

# MinkowskiEngine is optional: its equivalence tests run wherever it is importable (CI builds it).
FAST_BACKENDS = ["gather"] + (["minkowski"] if minkowski_engine_available() else [])


def run(model, backend, images, mask):
    model.config.sparse_backend = backend
    model.zero_grad(set_to_none=True)
    out = model(images, bool_masked_pos=mask, output_hidden_states=True)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_backends_agree(model, images, mask, backend):
    ref, ref_grads = run(model, "dense", images, mask)
    out, grads = run(model, backend, images, mask)
    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, **close)
    torch.testing.assert_close(out.reconstruction, ref.reconstruction, **close)
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, **close)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **close, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("scope", ["batch", "sample"])
@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.9])
def test_tiny_config_rectangular_inputs(backend, scope, ratio):
    model = active_mim(tiny_config(sparse_grn_scope=scope, drop_path_rate=0.2)).eval()  # drop path: eval mode
    images = torch.randn(3, 3, 48, 80)
    mask = random_masking(3, (3, 5), ratio, generator=torch.Generator().manual_seed(1)).view(3, 3, 5)
    assert_backends_agree(model, images, mask, backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("preset", ["atto", "femto"])
def test_presets(backend, preset):
    model = active_mim(ConvNextV2Config.from_preset(preset, decoder_hidden_size=32, norm_pix_loss=True))
    images = torch.randn(2, 3, 64, 96)
    mask = random_masking(2, (2, 3), 0.6, generator=torch.Generator().manual_seed(2)).view(2, 2, 3)
    assert_backends_agree(model.eval(), images, mask, backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_non_default_stem_and_uneven_masks(backend):
    model = active_mim(tiny_config(patch_size=1, num_stages=3, depths=[1, 2, 1], hidden_sizes=[8, 12, 16]))
    images = torch.randn(2, 3, 20, 12)  # 4-px cells: a 5 x 3 grid
    mask = torch.zeros(2, 5, 3, dtype=torch.bool)
    mask[0, :4] = True  # sample 0 keeps one row of cells
    mask[1, ::2, 1] = True
    assert_backends_agree(model.train(), images, mask, backend)  # no drop path: train mode is deterministic


@pytest.mark.parametrize("backend", ["dense"] + FAST_BACKENDS)
def test_a_mask_without_visible_cells_is_rejected(backend):
    model = ConvNextV2ForMaskedImageModeling(tiny_config(sparse_backend=backend))
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1] = True
    with pytest.raises(ValueError, match="visible"):
        model(torch.randn(2, 3, 32, 32), bool_masked_pos=mask)


def test_minkowski_backend_refuses_clearly_without_the_engine(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "MinkowskiEngine", None)
    model = ConvNextV2ForMaskedImageModeling(tiny_config(sparse_backend="minkowski"))
    with pytest.raises(ImportError, match="install_minkowski_engine.sh"):
        model(torch.randn(1, 3, 32, 32))


def test_every_registered_backend_is_tested():
    assert set(SPARSE_BACKENDS) == {"dense", "gather", "minkowski"}


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="Unknown sparse backend 'cuda-magic'"):
        get_sparse_backend("cuda-magic")


def test_drop_path_in_training_drops_whole_samples():
    model = active_mim(tiny_config(drop_path_rate=0.5, sparse_backend="gather")).train()
    images = torch.randn(4, 3, 32, 32)
    mask = torch.tensor([[True, False, False, True]] * 4)
    losses = {model(images, bool_masked_pos=mask).loss.item() for _ in range(4)}
    assert len(losses) > 1  # stochastic in training
    model.eval()
    assert len({model(images, bool_masked_pos=mask).loss.item() for _ in range(2)}) == 1


def test_config_accepts_exactly_the_registered_backends():
    # The config cannot import the torch-side registry (it ships without it), so it keeps its own list of names.
    from convnextv2_hf.configuration_convnextv2 import SPARSE_BACKEND_NAMES

    assert sorted(SPARSE_BACKEND_NAMES) == sorted(SPARSE_BACKENDS)
