"""Batched transforms: values, shapes, per-sample randomness and determinism with a generator."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from retain.data.datasets import TensorSplits
from retain.data.transforms import (
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    ToFloat,
    default_transforms,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _splits(name: str, shape: tuple[int, ...], channels: int) -> TensorSplits:
    x = torch.randint(0, 256, (6, *shape), dtype=torch.uint8)
    y = torch.arange(6) % 2
    return TensorSplits(name, x, y, x, y, 2, shape, 255.0, (0.5,) * channels, (0.25,) * channels)


def test_to_float() -> None:
    x = torch.tensor([[0, 51, 255]], dtype=torch.uint8)
    out = ToFloat(255.0)(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.2, 1.0]]))
    assert ToFloat(16.0, dtype=torch.float64)(torch.tensor([8])).dtype == torch.float64


def test_normalize_per_channel() -> None:
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
    x = torch.empty(2, 3, 4, 4)
    for c in range(3):
        x[0, c] = mean[c]
        x[1, c] = mean[c] + std[c]
    out = Normalize(mean, std)(x)
    torch.testing.assert_close(out[0], torch.zeros(3, 4, 4))
    torch.testing.assert_close(out[1], torch.ones(3, 4, 4))
    with pytest.raises(TypeError, match="ToFloat"):
        Normalize(mean, std)(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="channels"):
        Normalize(mean, std)(torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"std must be positive, got \(0.0,\)"):
        Normalize((0.5,), (0.0,))


def _position_images(batch: int, h: int, w: int) -> torch.Tensor:
    """Images whose pixel values (1..h*w) encode their position; 0 means padding."""
    base = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w)
    return base.expand(batch, 2, h, w).clone()


def test_random_crop_shifts_content_per_sample() -> None:
    B, H, W, p = 64, 8, 8, 3
    x = _position_images(B, H, W)
    out = RandomCrop(H, padding=p)(x, generator=_gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = F.pad(x, (p, p, p, p))
    offsets = []
    for i in range(B):
        matches = [(top, left) for top in range(2 * p + 1) for left in range(2 * p + 1)
                   if torch.equal(out[i], padded[i, :, top:top + H, left:left + W])]
        assert len(matches) == 1  # every output is exactly one window of the padded image
        offsets.append(matches[0])
    assert len(set(offsets)) > 10  # offsets differ per sample
    assert any(o != (p, p) for o in offsets)  # content really moved
    assert any((out[i] == 0).any() for i in range(B))  # zero padding came in


def test_random_crop_smaller_window_and_uint8() -> None:
    x = torch.randint(0, 256, (5, 3, 10, 12), dtype=torch.uint8)
    out = RandomCrop((6, 7))(x, generator=_gen(1))
    assert out.shape == (5, 3, 6, 7) and out.dtype == torch.uint8
    with pytest.raises(ValueError, match="larger"):
        RandomCrop(20, padding=2)(x)


def test_random_crop_determinism() -> None:
    x = torch.rand(16, 3, 32, 32)
    crop = RandomCrop(32, padding=4)
    a = crop(x, generator=_gen(7))
    b = crop(x, generator=_gen(7))
    c = crop(x, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_flip_flips_exactly_the_drawn_samples() -> None:
    B = 40
    x = torch.rand(B, 3, 5, 7)  # asymmetric content: a flip is always visible
    out = RandomHorizontalFlip(p=0.5)(x, generator=_gen(3))
    chosen = torch.rand(B, generator=_gen(3)) < 0.5
    for i in range(B):
        expected = x[i].flip(-1) if chosen[i] else x[i]
        assert torch.equal(out[i], expected)
    assert 0 < int(chosen.sum()) < B
    assert torch.equal(RandomHorizontalFlip(p=0.0)(x), x)
    assert torch.equal(RandomHorizontalFlip(p=1.0)(x), x.flip(-1))
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 1.5"):
        RandomHorizontalFlip(p=1.5)


def test_compose_passes_generator_and_is_deterministic() -> None:
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    pipeline = Compose([ToFloat(255.0), RandomCrop(32, 4), RandomHorizontalFlip(), lambda t: t * 2])
    a = pipeline(x, generator=_gen(11))
    b = pipeline(x, generator=_gen(11))
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert float(a.max()) <= 2.0


def test_reprs() -> None:
    pipeline = Compose([ToFloat(255.0), RandomCrop(32, 4), RandomHorizontalFlip(0.5),
                        Normalize((0.5,), (0.25,))])
    text = repr(pipeline)
    for part in ("ToFloat(scale=255.0)", "RandomCrop(size=32, padding=4)", "RandomHorizontalFlip(p=0.5)",
                 "Normalize(mean=(0.5,), std=(0.25,))"):
        assert part in text
    assert repr(RandomCrop((3, 4))) == "RandomCrop(size=(3, 4), padding=0)"


def test_default_transforms() -> None:
    mnist_like = _splits("mnist", (1, 28, 28), 1)
    train, test = default_transforms(mnist_like, augment=True)
    assert repr(train) == repr(test)  # no augmentation outside CIFAR
    out = test(mnist_like.test_inputs)
    expected = (mnist_like.test_inputs.float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(out, expected)

    cifar_like = _splits("cifar10", (3, 32, 32), 3)
    train, test = default_transforms(cifar_like, augment=True)
    assert [type(t).__name__ for t in train.transforms] == [
        "ToFloat", "RandomCrop", "RandomHorizontalFlip", "Normalize"]
    assert train.transforms[1].size == (32, 32) and train.transforms[1].padding == 4
    assert train(cifar_like.train_inputs, generator=_gen(0)).shape == (6, 3, 32, 32)
    plain, _ = default_transforms(cifar_like, augment=False)
    assert [type(t).__name__ for t in plain.transforms] == ["ToFloat", "Normalize"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_transforms_stay_on_gpu() -> None:
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device="cuda")
    pipeline = Compose([ToFloat(255.0), RandomCrop(32, 4), RandomHorizontalFlip(), Normalize((0.5,) * 3,
                                                                                             (0.25,) * 3)])
    cpu_gen = pipeline(x, generator=_gen(0))
    assert cpu_gen.device.type == "cuda"
    torch.testing.assert_close(cpu_gen.cpu(), pipeline(x.cpu(), generator=_gen(0)))  # same draws
    cuda_gen = pipeline(x, generator=torch.Generator(device="cuda").manual_seed(0))
    assert cuda_gen.device.type == "cuda"
