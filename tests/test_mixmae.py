"""MixMAE-style mixed masking: no leakage between the mixed sources, both reconstructed, backends agree."""

import pytest
import torch

from conftest import active_mim, tiny_config
from convnextv2_hf import ConvNextV2Config
from convnextv2_hf.masking import patchify
from test_sparse_backends import FAST_BACKENDS, assert_backends_agree


def mixmae_model(**kwargs):
    return active_mim(tiny_config(mask_strategy="mixmae", sparse_grn_scope="sample", **kwargs)).eval()


def test_changing_the_partner_leaves_the_source_untouched():
    model = mixmae_model()
    images = torch.randn(2, 3, 32, 48)  # image 0 and image 1 are each other's partner
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    changed = images.clone()
    changed[1] = torch.randn(3, 32, 48) * 5
    a = model(images, bool_masked_pos=mask, output_hidden_states=True)
    b = model(changed, bool_masked_pos=mask, output_hidden_states=True)
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(ha[0], hb[0])  # image 0's encoded cells
    torch.testing.assert_close(a.logits[0][mask[0]], b.logits[0][mask[0]])  # its reconstruction of its hidden cells
    # image 0 also fills image 1's masked cells; that set is encoded on its own too: the partner prediction made
    # from image 0's pixels (row 1 of partner_logits) does not see image 1 either
    torch.testing.assert_close(a.partner_logits[1][~mask[1]], b.partner_logits[1][~mask[1]])
    assert not torch.allclose(a.logits[1], b.logits[1])


def test_both_sources_are_reconstructed_and_counted():
    model = mixmae_model()
    images = torch.randn(3, 3, 32, 32)
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    out = model(images, bool_masked_pos=mask)
    own = ((out.logits - patchify(images, 16)) ** 2).mean(-1)[mask]
    partner = ((out.partner_logits - patchify(images.flip(0), 16)) ** 2).mean(-1)[~mask]
    torch.testing.assert_close(out.loss, torch.cat([own, partner]).mean())
    assert own.numel() + partner.numel() == 12  # every cell of every image is a target once
    up = mask.view(3, 1, 2, 2).repeat_interleave(16, 2).repeat_interleave(16, 3)
    torch.testing.assert_close(out.mixed_pixel_values, torch.where(up, images.flip(0), images))
    assert out.partner_reconstruction.shape == images.shape


def test_batch_of_one_is_rejected():
    with pytest.raises(ValueError, match="batch of 2"):
        mixmae_model()(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="mask_strategy"):
        ConvNextV2Config(mask_strategy="mixup")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_backends_agree_under_mixmae(backend, scope):
    model = active_mim(tiny_config(mask_strategy="mixmae", sparse_grn_scope=scope))
    images = torch.randn(3, 3, 48, 32)
    mask = torch.rand(3, 3, 2, generator=torch.Generator().manual_seed(0)) < 0.5
    mask[:, 0, 0], mask[:, 1, 1] = True, False  # at least one visible and one masked cell per image
    assert_backends_agree(model.eval(), images, mask, backend)


def test_gradients_flow_from_both_sources():
    model = mixmae_model().train()
    out = model(torch.randn(2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert model.decoder.mask_token.grad.abs().sum() > 0
