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


@pytest.mark.parametrize("autocast", [False, True])
def test_the_visible_depthwise_convolution_has_autograd_gradients_without_running_again(autocast):
    from torch.utils._python_dispatch import TorchDispatchMode

    from convnextv2_hf.sparse_ops import SiteIndex, scatter_to_grid, visible_depthwise_conv

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 6, kernel_size=7, padding=3, groups=6)
    visible = random_masking(3, (2, 3), 0.6, generator=torch.Generator().manual_seed(3)).view(3, 2, 3).logical_not()
    sites = SiteIndex(visible, (8, 12), per_image=2)
    rows = torch.randn(sites.flat.numel(), 6, requires_grad=True)
    grad_out = torch.randn(sites.flat.numel(), 6)

    def gradients(function):
        rows.grad = conv.weight.grad = conv.bias.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = function()
        ops = Ops()
        with ops:
            out.backward(grad_out.to(out.dtype))
        return out, [rows.grad, conv.weight.grad, conv.bias.grad], ops.names

    def through_autograd():  # the same maths, differentiated by autograd through scatter, convolution and gather
        grid = scatter_to_grid(rows, sites.flat, sites.batch_size, sites.size)
        return sites.gather(conv(grid.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))

    out, grads, ops = gradients(lambda: visible_depthwise_conv(conv, rows, sites))
    ref, ref_grads, _ = gradients(through_autograd)
    assert out.dtype == ref.dtype == (torch.bfloat16 if autocast else torch.float32)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for grad, ref_grad in zip(grads[:2], ref_grads[:2]):
        assert grad.dtype == torch.float32
        # in bf16 the two backward calls may take other CPU kernels (it differs by CPU): a few bf16 steps apart
        atol = 4 * torch.finfo(torch.bfloat16).eps * ref_grad.abs().max().item() if autocast else 1e-6
        torch.testing.assert_close(grad, ref_grad, rtol=0 if autocast else 1e-5, atol=atol)
    # the bias gradient is summed in fp32 (autograd's bf16 convolution rounds it to bf16)
    torch.testing.assert_close(grads[2], grad_out.to(out.dtype).float().sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[2], ref_grads[2], **({"rtol": 4e-3, "atol": 1e-2} if autocast else {}))
    assert "convolution" not in ops and "convolution_backward" in ops  # no second forward, as checkpointing has
    assert not {"index_add", "index_put", "scatter_add"} & set(ops)  # unique sites: copies, no atomics
