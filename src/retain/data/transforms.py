"""Batched tensor transforms: they take a whole batch (B, C, H, W) on any device and stay on it.

Working on batches (instead of one PIL image at a time) keeps augmentation vectorised and lets it run
on the GPU next to the model. Random transforms accept an optional ``torch.Generator``; the random
numbers are drawn on the generator's device and moved to the batch, so a CPU generator gives the same
augmentation whether the batch is on the CPU or a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from retain.data.datasets import TensorSplits

__all__ = [
    "Compose",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "ToFloat",
    "Transform",
    "default_transforms",
]


class Transform:
    """Base class: ``transform(batch, generator=None) -> batch``."""

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def _args(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._args()})"


def _random_device(x: Tensor, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else x.device


class Compose(Transform):
    """Apply transforms in order; the generator is passed on to each :class:`Transform`."""

    def __init__(self, transforms: Sequence[Callable[[Tensor], Tensor]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        for t in self.transforms:
            x = t(x, generator=generator) if isinstance(t, Transform) else t(x)
        return x

    def __repr__(self) -> str:
        if not self.transforms:
            return "Compose([])"
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{inner}\n])"


class ToFloat(Transform):
    """Convert to a float dtype and divide by ``scale`` (e.g. 255 for uint8 images) to get [0, 1]."""

    def __init__(self, scale: float = 255.0, dtype: torch.dtype = torch.float32) -> None:
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = float(scale)
        self.dtype = dtype

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return x.to(self.dtype) / self.scale

    def _args(self) -> str:
        dtype = "" if self.dtype == torch.float32 else f", dtype={self.dtype}"
        return f"scale={self.scale}{dtype}"


class Normalize(Transform):
    """Subtract ``mean`` and divide by ``std`` per channel (dim 1) of a float batch."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError("mean and std need the same, non-zero, number of channels")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        self._constants: dict[tuple[torch.device, torch.dtype, int], tuple[Tensor, Tensor]] = {}

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if not x.is_floating_point():
            raise TypeError(f"Normalize expects a float batch, got {x.dtype}; put ToFloat first")
        if x.ndim < 2 or x.shape[1] != len(self.mean):
            raise ValueError(f"Normalize has {len(self.mean)} channels, batch shape is {tuple(x.shape)}")
        key = (x.device, x.dtype, x.ndim)
        if key not in self._constants:  # build the (1, C, 1, ...) constants once per device/dtype
            shape = (1, -1) + (1,) * (x.ndim - 2)
            self._constants[key] = (torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape),
                                    torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape))
        mean, std = self._constants[key]
        return (x - mean) / std

    def _args(self) -> str:
        return f"mean={self.mean}, std={self.std}"


class RandomCrop(Transform):
    """Zero-pad each image by ``padding`` on every side, then crop a random ``size`` window per sample."""

    def __init__(self, size: int | tuple[int, int], padding: int = 0) -> None:
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if min(self.size) <= 0 or padding < 0:
            raise ValueError(f"need positive size and non-negative padding, got {size}, {padding}")
        self.padding = int(padding)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.ndim < 3:
            raise ValueError(f"RandomCrop expects (B, ..., H, W), got shape {tuple(x.shape)}")
        lead, (H, W) = x.shape[:-2], x.shape[-2:]
        h, w = self.size
        p = self.padding
        if H + 2 * p < h or W + 2 * p < w:
            raise ValueError(f"crop {self.size} is larger than the padded image {(H + 2 * p, W + 2 * p)}")
        B = x.shape[0]
        x4 = x.reshape(B, -1, H, W)
        padded = F.pad(x4, (p, p, p, p)) if p else x4
        device = _random_device(x, generator)
        top = torch.randint(0, H + 2 * p - h + 1, (B,), generator=generator, device=device).to(x.device)
        left = torch.randint(0, W + 2 * p - w + 1, (B,), generator=generator, device=device).to(x.device)
        rows = top[:, None] + torch.arange(h, device=x.device)  # (B, h)
        cols = left[:, None] + torch.arange(w, device=x.device)  # (B, w)
        batch = torch.arange(B, device=x.device)[:, None, None]
        out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, h, w, C)
        return out.permute(0, 3, 1, 2).reshape(*lead, h, w).contiguous()

    def _args(self) -> str:
        size = self.size[0] if self.size[0] == self.size[1] else self.size
        return f"size={size}, padding={self.padding}"


class RandomHorizontalFlip(Transform):
    """Mirror each sample left-right (last dim) with probability ``p``, independently per sample."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.ndim < 2:
            raise ValueError(f"RandomHorizontalFlip expects (B, ..., W), got shape {tuple(x.shape)}")
        draw = torch.rand(x.shape[0], generator=generator, device=_random_device(x, generator))
        flip = (draw < self.p).to(x.device).view((-1,) + (1,) * (x.ndim - 1))
        return torch.where(flip, x.flip(-1), x)

    def _args(self) -> str:
        return f"p={self.p}"


def default_transforms(splits: TensorSplits, augment: bool = False) -> tuple[Compose, Compose]:
    """The standard ``(train, test)`` pipelines: ToFloat(scale) and Normalize(mean, std).

    With ``augment`` and a CIFAR dataset, training adds RandomCrop(32, padding=4) and a horizontal flip
    on the [0, 1] floats, before normalising (padding is then black, as in the usual CIFAR recipe).
    Other datasets get no augmentation (flips and crops would change digit identity or add little).
    """
    to_float = ToFloat(splits.scale)
    normalize = Normalize(splits.mean, splits.std)
    test = Compose([to_float, normalize])
    if augment and splits.name.startswith("cifar"):
        train = Compose([to_float, RandomCrop(splits.input_shape[-1], padding=4), RandomHorizontalFlip(),
                         normalize])
    else:
        train = Compose([to_float, normalize])
    return train, test
