"""RandAugment, random erasing and colour jitter against the reference's definitions (timm's): every op pixel for
pixel against outputs timm computed, and the sampling statistics of `rand-m9-mstd0.5-inc1` and `reprob 0.25`."""

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from convnextv2_hf.training.data.rand_augment import (
    INCREASING_OPS, ORIGINAL_OPS, SIGNED_OPS, ColorJitter, RandAugment, RandomErasing, apply_op, mean_fill,
    op_argument)

FIXTURE = Path(__file__).parent / "fixtures" / "augment_timm.safetensors"
IMAGENET_FILL = mean_fill((0.485, 0.456, 0.406))


def timm_outputs():
    tensors = load_file(str(FIXTURE))
    image = Image.fromarray(tensors.pop("input").numpy())
    cases = []
    for key, expected in tensors.items():
        name, whole, fraction, sign = key.split(".")
        cases.append((name, float(f"{whole}.{fraction}"), 1 if sign == "plus" else -1, expected.numpy()))
    return image, cases


def test_every_op_equals_timms_pixel_for_pixel():
    image, cases = timm_outputs()
    assert {name for name, *_ in cases} == set(INCREASING_OPS) | set(ORIGINAL_OPS)
    assert len(cases) == 21 * 2 * 2  # 21 distinct ops, 2 magnitudes, 2 signs
    for name, magnitude, sign, expected in cases:
        ours = np.asarray(apply_op(image, name, op_argument(name, magnitude, sign), IMAGENET_FILL))
        assert np.array_equal(ours, expected), (name, magnitude, sign)


def test_config_string_means_what_timm_reads():
    policy = RandAugment.from_config("rand-m9-mstd0.5-inc1", IMAGENET_FILL)
    assert (policy.magnitude, policy.num_ops, policy.prob, policy.magnitude_std, policy.increasing) == (9, 2, 0.5, 0.5,
                                                                                                        True)
    assert policy.ops == INCREASING_OPS and policy.fill == (124, 116, 104)
    assert RandAugment.from_config("rand-m7-n3-p0.8", IMAGENET_FILL).ops == ORIGINAL_OPS
    with pytest.raises(ValueError, match="unknown part"):
        RandAugment.from_config("rand-m9-zz1", IMAGENET_FILL)


def applied_ops(policy: RandAugment, samples: int, monkeypatch) -> list[tuple[str, float, int]]:
    """(op, magnitude, sign) of every op `policy` applies to `samples` images, each seeded by its index."""
    import convnextv2_hf.training.data.rand_augment as module

    records = []
    monkeypatch.setattr(module, "op_argument", lambda name, magnitude, sign: records.append((name, magnitude, sign)))
    monkeypatch.setattr(module, "apply_op", lambda image, name, argument, fill: image)
    for index in range(samples):
        policy(Image.new("RGB", (4, 4)), torch.Generator().manual_seed(index))
    return records


def test_sampling_statistics_match_the_reference_definition(monkeypatch):
    policy = RandAugment.from_config("rand-m9-mstd0.5-inc1", IMAGENET_FILL)
    samples = 6000
    records = applied_ops(policy, samples, monkeypatch)
    # each of 2 slots applies its op with probability 0.5: about one op per image
    assert abs(len(records) / (2 * samples) - 0.5) < 0.02
    counts = Counter(name for name, *_ in records)
    assert set(counts) == set(INCREASING_OPS)  # uniform over the fifteen increasing ops
    expected = len(records) / 15
    assert all(abs(count - expected) < 5 * math.sqrt(expected) for count in counts.values()), counts
    magnitudes = np.array([m for _, m, _ in records])
    assert magnitudes.max() <= 10 and abs(magnitudes.mean() - 9.0) < 0.03 and abs(magnitudes.std() - 0.5) < 0.03
    signs = [s for name, _, s in records if name in SIGNED_OPS]
    assert abs(np.mean(signs)) < 0.06 and {name for name, _, s in records if s == -1} <= SIGNED_OPS


def test_random_erasing_area_aspect_and_probability():
    erasing = RandomErasing(prob=0.25, mode="pixel", count=1)
    erased, areas, aspects = 0, [], []
    for index in range(3000):
        pixels = torch.zeros(3, 48, 64)
        erasing(pixels, torch.Generator().manual_seed(index))
        hit = pixels[0] != 0
        if hit.any():
            erased += 1
            rows, cols = hit.any(1).nonzero(), hit.any(0).nonzero()
            h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
            areas.append(h * w / (48 * 64))
            aspects.append(h / w)
            assert torch.equal(hit[rows.min():rows.max() + 1, cols.min():cols.max() + 1], torch.ones(h, w, dtype=bool))
    assert abs(erased / 3000 - 0.25) < 0.025
    assert 0.015 < min(areas) and max(areas) < 0.36  # 2 %-33 % up to rounding of the sides
    assert 0.25 < min(aspects) and max(aspects) < 3.7  # 0.3-3.3 up to rounding
    assert abs(np.mean(areas) - (0.02 + 1 / 3) / 2) < 0.03  # uniform in area
    with pytest.raises(ValueError, match="--remode"):
        RandomErasing(mode="noise")


def test_erasing_modes_fill_as_defined():
    generator = torch.Generator().manual_seed(3)
    for mode in ("pixel", "rand", "const"):
        pixels = torch.full((3, 40, 40), 7.0)
        RandomErasing(prob=1.0, mode=mode)(pixels, generator)
        region = pixels[pixels != 7.0].view(3, -1) if mode != "const" else pixels[:, pixels[0] == 0]
        assert region.numel() > 0
        if mode == "rand":
            assert torch.allclose(region, region[:, :1].expand_as(region))
        if mode == "const":
            assert torch.equal(region, torch.zeros_like(region))


def test_colour_jitter_stays_within_its_range_and_is_seeded():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    a = ColorJitter(0.4)(image, torch.Generator().manual_seed(1))
    b = ColorJitter(0.4)(image, torch.Generator().manual_seed(1))
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(image))
    assert np.array_equal(np.asarray(ColorJitter(0.0)(image, torch.Generator())), np.asarray(image))


def test_the_fine_tuning_transform_is_seeded_per_sample_and_off_means_off():
    from convnextv2_hf.training.arguments import FinetuningArguments
    from convnextv2_hf.training.data.transforms import FinetuneTransform, PretrainTransform, sample_generator

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    full = FinetuneTransform.from_recipe(32, mean, std, FinetuningArguments())
    assert full.rand_augment is not None and full.erasing is not None and full.color_jitter is None
    same = [full(photo, sample_generator(0, 1, 5)) for _ in range(2)]
    assert torch.equal(same[0], same[1])
    assert not torch.equal(same[0], full(photo, sample_generator(0, 2, 5)))  # another epoch, other draws
    off = FinetuneTransform.from_recipe(32, mean, std, FinetuningArguments(aa="none", reprob=0.0, color_jitter=0.0))
    plain = PretrainTransform(32, mean, std, scale=(0.08, 1.0))
    assert torch.equal(off(photo, sample_generator(0, 1, 5)), plain(photo, sample_generator(0, 1, 5)))
    jitter = FinetuneTransform.from_recipe(32, mean, std, FinetuningArguments(aa="none"))
    assert jitter.color_jitter is not None and jitter.rand_augment is None  # jitter only without RandAugment


def test_every_op_runs_at_the_magnitude_bounds_with_both_signs():
    """Magnitudes are clipped to [0, 10]: every op must give an image of the input's size and mode at both ends
    (PosterizeIncreasing at 10 and Posterize at 0 ask for 0 bits, which Pillow 13 refuses)."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    for name in sorted(set(INCREASING_OPS) | set(ORIGINAL_OPS)):
        for magnitude in (0.0, 10.0):
            for sign in (1, -1):
                out = apply_op(image, name, op_argument(name, magnitude, sign), IMAGENET_FILL)
                assert out.size == image.size and out.mode == image.mode, (name, magnitude, sign)


def test_posterize_keeps_the_high_bits_and_turns_black_at_zero_bits():
    """The definition Pillow used before 13 (timm's reference runs): keep the top `bits` bits; 0 bits -> black."""
    image = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16).repeat(3).reshape(16, 16, 3))
    pixels = np.asarray(image)
    for bits in range(0, 8):
        ours = np.asarray(apply_op(image, "Posterize", bits, IMAGENET_FILL))
        assert np.array_equal(ours, pixels & (0xFF << (8 - bits) & 0xFF)), bits
    assert not np.asarray(apply_op(image, "PosterizeIncreasing", op_argument("PosterizeIncreasing", 10, 1),
                                   IMAGENET_FILL)).any()
    assert np.array_equal(np.asarray(apply_op(image, "Posterize", 8, IMAGENET_FILL)), pixels)


def test_the_default_policy_survives_5000_seeded_draws_on_the_installed_pillow():
    """`rand-m9-mstd0.5-inc1` on real pixels: about one draw in 800 used to reach 0 posterize bits and crash."""
    policy = RandAugment.from_config("rand-m9-mstd0.5-inc1", IMAGENET_FILL)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (12, 16, 3), dtype=np.uint8))
    for index in range(5000):
        out = policy(image, torch.Generator().manual_seed(index))
        assert out.size == image.size and out.mode == "RGB"
