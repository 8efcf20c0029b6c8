import pytest
import torch

from convnextv2_hf.masking import (
    normalize_patches,
    num_visible_cells,
    patchify,
    random_masking,
    unpatchify,
    upsample_mask,
)


def test_patchify_round_trip_and_pixel_order():
    images = torch.randn(2, 3, 32, 48)
    patches = patchify(images, 16)
    assert patches.shape == (2, 6, 16 * 16 * 3)
    # cell (row 0, col 1), pixel (row 2, col 5), channel 1 sits at index (2 * 16 + 5) * 3 + 1
    assert patches[0, 1, (2 * 16 + 5) * 3 + 1] == images[0, 1, 2, 16 + 5]
    assert torch.equal(unpatchify(patches, 16, (2, 3), 3), images)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.6, 0.75, 0.9])
def test_random_masking_keeps_exactly_the_reference_count(ratio):
    mask = random_masking(5, (3, 7), ratio, generator=torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and mask.shape == (5, 21)
    assert ((~mask).sum(1) == num_visible_cells(21, ratio)).all()


def test_random_masking_keeps_lowest_noise_and_is_seedable():
    noise = torch.tensor([[0.3, -1.0, 2.0, 0.1]])
    mask = random_masking(1, (2, 2), 0.5, noise=noise)
    assert mask.tolist() == [[True, False, True, False]]
    a = random_masking(2, (4, 4), 0.6, generator=torch.Generator().manual_seed(3))
    b = random_masking(2, (4, 4), 0.6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="noise"):
        random_masking(1, (2, 2), 0.5, noise=torch.zeros(1, 5))


def test_upsample_mask_makes_whole_windows():
    mask = torch.tensor([[[True, False], [False, True]]])
    up = upsample_mask(mask, (4, 4))
    assert up.shape == (1, 1, 4, 4)
    assert up[0, 0, :2, :2].all() and not up[0, 0, :2, 2:].any()


def test_normalize_patches_uses_unbiased_variance():
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    expected = (x - 2.5) / (torch.tensor(5.0 / 3.0) + 1e-6).sqrt()
    torch.testing.assert_close(normalize_patches(x), expected)
