"""RandAugment, random erasing and colour jitter as the reference fine-tuning applies them, on PIL and torch.

The reference (`main_finetune.py`) builds its training transform with timm: RandAugment `rand-m9-mstd0.5-inc1`
(two ops drawn uniformly from fifteen, each applied with probability 0.5 at a magnitude drawn from N(9, 0.5) clipped
to [0, 10]), bicubic resampling and the ImageNet mean as fill colour, then random erasing after normalisation
(`--reprob 0.25 --remode pixel --recount 1`); colour jitter only when RandAugment is off. The op definitions below
follow timm's (`timm/data/auto_augment.py`, `random_erasing.py`); they are tested op by op against outputs timm
computed (`tests/fixtures/make_augment_fixture.py`). All randomness comes from an explicit `torch.Generator`, so a
sample's augmentation is seeded by (seed, epoch, index) like the rest of our pipeline.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import PIL.Image
import PIL.ImageEnhance
import PIL.ImageOps
import torch

MAX_LEVEL = 10.0  # magnitudes are on a 0..10 scale
# timm's `_RAND_INCREASING_TRANSFORMS` (`inc1`: every op gets stronger with the magnitude) and `_RAND_TRANSFORMS`.
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
ORIGINAL_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
SIGNED_OPS = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing",
              "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}
ENHANCERS = {"Color": PIL.ImageEnhance.Color, "Contrast": PIL.ImageEnhance.Contrast,
             "Brightness": PIL.ImageEnhance.Brightness, "Sharpness": PIL.ImageEnhance.Sharpness}


def uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * torch.rand(1, generator=generator, dtype=torch.float64).item()


def op_argument(name: str, magnitude: float, sign: int) -> float | int | None:
    """The argument an op gets at `magnitude` (0..10) with `sign` (+1 or -1, used by the signed ops), as timm's
    `LEVEL_TO_ARG` computes it."""
    level = magnitude / MAX_LEVEL
    if name == "Rotate":
        return sign * level * 30.0
    if name in ("ShearX", "ShearY"):
        return sign * level * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * level * 0.45
    if name.endswith("Increasing") and name.removesuffix("Increasing") in ENHANCERS:
        return max(0.1, 1.0 + sign * level * 0.9)
    if name in ENHANCERS:
        return level * 1.8 + 0.1
    if name in ("Posterize", "PosterizeIncreasing"):
        bits = int(level * 4)
        return 4 - bits if name == "PosterizeIncreasing" else bits
    if name in ("Solarize", "SolarizeIncreasing"):
        threshold = min(256, int(level * 256))
        return 256 - threshold if name == "SolarizeIncreasing" else threshold
    if name == "SolarizeAdd":
        return min(128, int(level * 110))
    return None


def posterize(image: PIL.Image.Image, bits: int) -> PIL.Image.Image:
    """Keep the `bits` high bits of every channel (0..7). At 0 bits the image turns black, as Pillow before 13 did
    (and so the reference's runs saw, e.g. `PosterizeIncreasing` at magnitude 10); Pillow 13 refuses 0 bits."""
    keep = ~(2 ** (8 - max(0, bits)) - 1) & 0xFF
    return image.point([value & keep for value in range(256)] * len(image.getbands()))


def apply_op(image: PIL.Image.Image, name: str, argument, fill: tuple[int, ...],
             resample=PIL.Image.BICUBIC) -> PIL.Image.Image:
    """One RandAugment op on an RGB image with its argument (see [`op_argument`])."""
    geometric = dict(resample=resample, fillcolor=fill)
    if name == "AutoContrast":
        return PIL.ImageOps.autocontrast(image)
    if name == "Equalize":
        return PIL.ImageOps.equalize(image)
    if name == "Invert":
        return PIL.ImageOps.invert(image)
    if name == "Rotate":
        return image.rotate(argument, **geometric)
    if name in ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        matrix = {"ShearX": (1, argument, 0, 0, 1, 0), "ShearY": (1, 0, 0, argument, 1, 0),
                  "TranslateXRel": (1, 0, argument * image.width, 0, 1, 0),
                  "TranslateYRel": (1, 0, 0, 0, 1, argument * image.height)}[name]
        return image.transform(image.size, PIL.Image.AFFINE, matrix, **geometric)
    if name.startswith("Posterize"):
        return image if argument >= 8 else posterize(image, argument)
    if name.startswith("SolarizeAdd"):
        table = [min(255, value + argument) if value < 128 else value for value in range(256)]
        return image.point(table * len(image.getbands()))
    if name.startswith("Solarize"):
        return PIL.ImageOps.solarize(image, argument)
    return ENHANCERS[name.removesuffix("Increasing")](image).enhance(argument)


@dataclass(frozen=True)
class RandAugment:
    """`num_ops` ops drawn uniformly (with replacement), each applied with probability `prob` at a magnitude drawn
    from N(`magnitude`, `magnitude_std`) clipped to [0, 10]."""

    magnitude: float = 9.0
    num_ops: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.5
    increasing: bool = True
    fill: tuple[int, ...] = (128, 128, 128)

    @classmethod
    def from_config(cls, text: str, fill: tuple[int, ...]) -> "RandAugment":
        """timm's config string, e.g. `rand-m9-mstd0.5-inc1` (`m` magnitude, `n` ops, `p` probability, `mstd`
        magnitude std, `inc` increasing ops)."""
        parts = text.split("-")
        if parts[0] != "rand":
            raise ValueError(f"--aa {text!r}: only RandAugment configs ('rand-m9-mstd0.5-inc1') or 'none' are supported.")
        settings = dict(magnitude=MAX_LEVEL, increasing=False)
        names = {"m": "magnitude", "n": "num_ops", "p": "prob", "mstd": "magnitude_std", "inc": "increasing"}
        for part in parts[1:]:
            found = re.fullmatch(r"([a-z]+)(\d+(?:\.\d*)?)", part)
            if not found or found.group(1) not in names:
                raise ValueError(f"--aa {text!r}: unknown part {part!r}; use m, n, p, mstd and inc, e.g. "
                                 "'rand-m9-mstd0.5-inc1'.")
            name, value = names[found.group(1)], found.group(2)
            settings[name] = {"num_ops": int, "increasing": lambda v: bool(int(v))}.get(name, float)(value)
        return cls(fill=fill, **settings)

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else ORIGINAL_OPS

    def __call__(self, image: PIL.Image.Image, generator: torch.Generator) -> PIL.Image.Image:
        chosen = torch.randint(0, len(self.ops), (self.num_ops,), generator=generator).tolist()
        for index in chosen:
            name = self.ops[index]
            if uniform(generator) > self.prob:
                continue
            magnitude = self.magnitude
            if self.magnitude_std > 0:
                magnitude += self.magnitude_std * torch.randn(1, generator=generator, dtype=torch.float64).item()
            magnitude = max(0.0, min(MAX_LEVEL, magnitude))
            sign = -1 if name in SIGNED_OPS and uniform(generator) > 0.5 else 1
            image = apply_op(image, name, op_argument(name, magnitude, sign), self.fill)
        return image


@dataclass(frozen=True)
class RandomErasing:
    """After normalisation: with probability `prob`, `count` rectangles of 2-33 % of the image each (aspect 0.3-3.3),
    filled with per-pixel normal noise (`mode="pixel"`), one normal colour per channel (`"rand"`) or zeros
    (`"const"`); up to 10 tries for a rectangle that fits."""

    prob: float = 0.25
    mode: str = "pixel"
    count: int = 1
    min_area: float = 0.02
    max_area: float = 1 / 3
    log_aspect: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3))

    def __post_init__(self):
        if self.mode not in ("pixel", "rand", "const"):
            raise ValueError(f"--remode {self.mode!r}: choose pixel, rand or const.")

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if uniform(generator) > self.prob:
            return pixels
        channels, height, width = pixels.shape
        for _ in range(self.count):
            for _attempt in range(10):
                area = uniform(generator, self.min_area, self.max_area) * height * width / self.count
                aspect = math.exp(uniform(generator, *self.log_aspect))
                h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if w < width and h < height:
                    top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                    left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                    pixels[:, top:top + h, left:left + w] = self.fill((channels, h, w), generator, pixels.dtype)
                    break
        return pixels

    def fill(self, shape: tuple[int, int, int], generator: torch.Generator, dtype) -> torch.Tensor:
        if self.mode == "pixel":
            return torch.randn(shape, generator=generator, dtype=dtype)
        if self.mode == "rand":
            return torch.randn((shape[0], 1, 1), generator=generator, dtype=dtype).expand(shape)
        return torch.zeros(shape, dtype=dtype)


@dataclass(frozen=True)
class ColorJitter:
    """Brightness, contrast and saturation factors drawn from [1 - s, 1 + s], applied in random order (as
    torchvision's `ColorJitter(s, s, s)` on PIL images)."""

    strength: float = 0.4

    def __call__(self, image: PIL.Image.Image, generator: torch.Generator) -> PIL.Image.Image:
        enhancers = (PIL.ImageEnhance.Brightness, PIL.ImageEnhance.Contrast, PIL.ImageEnhance.Color)
        for index in torch.randperm(3, generator=generator).tolist():
            factor = uniform(generator, max(0.0, 1 - self.strength), 1 + self.strength)
            image = enhancers[index](image).enhance(factor)
        return image


def mean_fill(mean) -> tuple[int, int, int]:
    """The fill colour of geometric ops: the normalisation mean in 8 bits (timm's `img_mean`)."""
    return tuple(min(255, round(255 * value)) for value in mean)
