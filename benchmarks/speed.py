"""How much time a retain replay learner spends outside its forward/backward passes.

For ER, DER++, CLS-ER, Super-ER (and Repeated Distillation when ``retain.methods.repeated_distill``
exists) this measures, in one process and one run:

1. the library's time per training step (``FitResult.train_seconds / steps`` of the loop) and per
   update (wall time of ``ModelUpdater.update`` on a ``TensorDataset``), driven through the public API;
2. a minimal hand-written PyTorch loop doing the same arithmetic (same model and initial weights,
   same batch composition, a preallocated tensor buffer with vectorised reservoir writes, the
   method's extra forwards and EMA updates): the floor;
3. library/floor ratios, peak memory, and the time to write and to read a state folder.

Protocols: ``mnist`` = the DER paper's Split-MNIST setting (MLP 784-100-100-10, batch 10 new +
10 memory, memory 500, one epoch per task of 12,000 items, random uint8 MNIST-shaped data made
float by ``ToFloat`` on the fly); ``resnet`` = the DER paper's reduced ResNet-18 (width 20) on
random uint8 3x32x32 inputs, batch 32 new + 32 memory, memory 500, a fixed number of steps per update.

Library and floor updates are interleaved (lib, floor, lib, floor, ...) after one warm-up update
each, so that load from other processes hits both alike; medians over the repetitions are reported.

    .venv/bin/python benchmarks/speed.py [--device cpu|cuda] [--quick] [--json results.json]
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import retain
from retain.data.transforms import ToFloat
from retain.methods import (
    CLSExperienceReplayModelUpdater,
    DarkExperienceReplayModelUpdater,
    ExperienceReplayModelUpdater,
    SuperExperienceReplayModelUpdater,
)
from retain.models import MultiLayerPerceptron, ResNet18
from retain.models.base import ContinualModel
from retain.state import StateFolder
from retain.updaters.base import ModelUpdater

# ---------------------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class Protocol:
    """A model, batch composition and update size."""

    name: str
    title: str
    make_model: Callable[[], ContinualModel]
    input_shape: tuple[int, ...]
    batch_size: int  # new items per step
    memory_batch_size: int
    memory_size: int
    items_per_update: int
    lr: float


def protocols(device: torch.device, quick: bool) -> dict[str, Protocol]:
    gpu = device.type == "cuda"
    resnet_steps = (20 if quick else 200) if gpu else (8 if quick else 30)
    return {
        "mnist": Protocol(
            name="mnist",
            title="Split-MNIST protocol: MLP 784-100-100-10, batch 10 new + 10 memory, memory 500",
            make_model=lambda: MultiLayerPerceptron(784, 10, (100, 100)),
            input_shape=(1, 28, 28),
            batch_size=10,
            memory_batch_size=10,
            memory_size=500,
            items_per_update=2_000 if quick else 12_000,
            lr=0.03,
        ),
        "resnet": Protocol(
            name="resnet",
            title="Reduced ResNet-18 (width 20, DER paper) on 3x32x32 inputs, batch 32 new + 32 memory, memory 500",
            make_model=lambda: ResNet18(num_outputs=10, width=20, in_channels=3),
            input_shape=(3, 32, 32),
            batch_size=32,
            memory_batch_size=32,
            memory_size=500,
            items_per_update=32 * resnet_steps,
            lr=0.03,
        ),
    }


@dataclass(frozen=True)
class Method:
    """A library updater class, its method options, and the floor step that mirrors it."""

    name: str
    updater: type[ModelUpdater]
    options: dict[str, float]
    floor_step: str


METHODS = {
    "ER": Method("ER", ExperienceReplayModelUpdater, {"alpha": 1.0}, "er"),
    "DER++": Method("DER++", DarkExperienceReplayModelUpdater, {"alpha": 0.2, "beta": 1.0}, "derpp"),
    "CLS-ER": Method(
        "CLS-ER",
        CLSExperienceReplayModelUpdater,
        {
            "alpha": 0.5,
            "beta": 0.1,
            "stable_model_update_weight": 0.999,
            "plastic_model_update_weight": 0.999,
            "stable_model_update_probability": 0.7,
            "plastic_model_update_probability": 0.9,
        },
        "cls",
    ),
    "Super-ER": Method(
        "Super-ER",
        SuperExperienceReplayModelUpdater,
        {
            "der_alpha": 1.0,
            "der_beta": 1.0,
            "sp_shrink_factor": 0.95,
            "sp_sigma": 0.001,
            "cls_alpha": 0.1,
            "cls_stable_model_update_weight": 0.999,
            "cls_plastic_model_update_weight": 0.999,
            "cls_stable_model_update_probability": 0.7,
            "cls_plastic_model_update_probability": 0.9,
            "pod_alpha": 1.0,
        },
        "super",
    ),
}
RD_MODULE = "retain.methods.repeated_distill"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_tasks(protocol: Protocol, count: int, seed: int) -> list[TensorDataset]:
    """``count`` class-incremental-looking tasks of random uint8 inputs (two classes each)."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for i in range(count):
        n = protocol.items_per_update
        x = torch.randint(0, 256, (n, *protocol.input_shape), generator=g, dtype=torch.uint8)
        y = (2 * (i % 5) + torch.randint(0, 2, (n,), generator=g)).long()
        tasks.append(TensorDataset(x, y))
    return tasks


# ---------------------------------------------------------------------------------------- memory


def _hwm_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block: CUDA ``max_memory_allocated``; CPU the process's peak resident set
    (VmHWM, reset through /proc/self/clear_refs before the block; ``ru_maxrss`` if that is refused)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_reset = device.type != "cuda" and _hwm_supported()
        self.kind = (
            "torch.cuda.max_memory_allocated"
            if device.type == "cuda"
            else ("VmHWM (reset per update)" if self.cpu_reset else "ru_maxrss (process peak, not reset)")
        )

    def start(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        if self.cpu_reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return _status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.cpu_reset:
            return _status_kib("VmHWM") * 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{key}:\s+(\d+)", f.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


# ---------------------------------------------------------------------------------------- the floor


def _ema_(target: nn.Module, source: nn.Module, decay: float) -> None:
    """EMA of parameters and float buffers, integer buffers copied (as CLS-ER's copies)."""
    tp, sp = list(target.parameters()), list(source.parameters())
    torch._foreach_mul_(tp, decay)
    torch._foreach_add_(tp, sp, alpha=1.0 - decay)
    for t, s in zip(target.buffers(), source.buffers(), strict=True):
        if t.dtype.is_floating_point:
            t.mul_(decay).add_(s, alpha=1.0 - decay)
        else:
            t.copy_(s)


def _pod_spatial(current: list[Tensor], stored: list[Tensor]) -> Tensor:
    total = current[0].new_zeros(())
    for h, s in zip(current, stored, strict=True):
        pooled = []
        for a in (h, s):
            a = a[:, :, None, None] if a.dim() == 2 else a
            a = a.float().pow(2)
            pooled.append(F.normalize(torch.cat([a.sum(2).flatten(1), a.sum(3).flatten(1)], 1), dim=1))
        total = total + torch.linalg.vector_norm(pooled[0] - pooled[1], dim=1).mean()
    return total / len(current)


class Floor:
    """A hand-written replay loop with the library method's arithmetic and nothing else."""

    def __init__(self, method: Method, protocol: Protocol, model: ContinualModel, device: torch.device) -> None:
        self.method, self.protocol, self.device = method, protocol, device
        self.model = model.to(device).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=protocol.lr)
        self.to_float = ToFloat()
        self.M = protocol.memory_size
        self.k = protocol.memory_batch_size
        self.seen = 0
        self.g = torch.Generator(device=device).manual_seed(1)
        self.loader_g = torch.Generator().manual_seed(0)
        self.cpu_g = torch.Generator().manual_seed(2)
        self.o = method.options
        self.bx: Tensor | None = None  # raw inputs, one spare row for rejected items
        self.by: Tensor | None = None
        self.blogits: Tensor | None = None
        self.bfeat: list[Tensor] = []
        self.ema_step = 0
        self.copies: tuple[nn.Module, nn.Module] | None = None
        if method.floor_step in ("cls", "super"):
            self.copies = (
                copy.deepcopy(self.model).eval().requires_grad_(False),  # plastic
                copy.deepcopy(self.model).eval().requires_grad_(False),  # stable
            )
        self.step = {"er": self.step_er, "derpp": self.step_derpp, "cls": self.step_cls, "super": self.step_super}[
            method.floor_step
        ]

    def buffer_bytes(self) -> int:
        tensors = [t for t in (self.bx, self.by, self.blogits, *self.bfeat) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- buffer
    def _sample(self) -> Tensor | None:
        filled = min(self.seen, self.M)
        if filled == 0:
            return None
        return torch.randperm(filled, generator=self.g, device=self.device)[: min(self.k, filled)]

    def _write(self, x: Tensor, y: Tensor, logits: Tensor | None = None, feats: list[Tensor] | None = None) -> None:
        n, M, s = x.shape[0], self.M, self.seen
        if self.bx is None:
            self.bx = torch.zeros((M + 1, *x.shape[1:]), dtype=x.dtype, device=self.device)
            self.by = torch.zeros((M + 1,), dtype=y.dtype, device=self.device)
            if logits is not None:
                self.blogits = torch.zeros((M + 1, logits.shape[1]), device=self.device)
            self.bfeat = [torch.zeros((M + 1, *f.shape[1:]), device=self.device) for f in feats or []]
        if s + n <= M:
            slots = torch.arange(s, s + n, device=self.device)
        else:
            t = torch.arange(s + 1, s + n + 1, device=self.device, dtype=torch.float64)
            slots = (torch.rand(n, dtype=torch.float64, device=self.device, generator=self.g) * t).long()
            if s < M:
                slots = torch.where(t <= M, t.long() - 1, slots)
            slots.clamp_(max=M)  # row M takes the rejected items
        self.seen += n
        self.bx[slots] = x
        self.by[slots] = y
        if logits is not None:
            self.blogits[slots] = logits
        for buf, f in zip(self.bfeat, feats or [], strict=True):
            buf[slots] = f

    def _ema_copies(self) -> None:
        assert self.copies is not None
        self.ema_step += 1
        o, p = self.o, "cls_" if self.method.floor_step == "super" else ""
        draws = torch.rand(2, generator=self.cpu_g).tolist()
        d = 1.0 - 1.0 / (self.ema_step + 1)
        if draws[0] < o[f"{p}plastic_model_update_probability"]:
            _ema_(self.copies[0], self.model, min(d, o[f"{p}plastic_model_update_weight"]))
        if draws[1] < o[f"{p}stable_model_update_probability"]:
            _ema_(self.copies[1], self.model, min(d, o[f"{p}stable_model_update_weight"]))

    def _teacher(self, xm: Tensor, ym: Tensor) -> Tensor:
        assert self.copies is not None
        with torch.no_grad():
            plastic, stable = self.copies[0](xm), self.copies[1](xm)
            y = ym.unsqueeze(1)
            better = stable.softmax(1).gather(1, y) > plastic.softmax(1).gather(1, y)
            return torch.where(better, stable, plastic)

    def _optimize(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    # ---- steps
    def step_er(self, x: Tensor, y: Tensor) -> None:
        n, a = x.shape[0], self.o["alpha"]
        xf, idx = self.to_float(x), self._sample()
        if idx is None:
            loss = F.cross_entropy(self.model(xf), y)
        else:
            out = self.model(torch.cat([xf, self.to_float(self.bx[idx])]))
            loss = (F.cross_entropy(out[:n], y) + a * F.cross_entropy(out[n:], self.by[idx])) / (1 + a)
        self._optimize(loss)
        self._write(x, y)

    def step_derpp(self, x: Tensor, y: Tensor) -> None:
        n, a, b = x.shape[0], self.o["alpha"], self.o["beta"]
        xf, idx = self.to_float(x), self._sample()
        if idx is None:
            out = self.model(xf)
            loss = F.cross_entropy(out, y)
        else:
            out = self.model(torch.cat([xf, self.to_float(self.bx[idx])]))
            loss = F.cross_entropy(out[:n], y) + a * F.mse_loss(out[n:], self.blogits[idx])
            idx2 = self._sample()
            loss = loss + b * F.cross_entropy(self.model(self.to_float(self.bx[idx2])), self.by[idx2])
            loss = loss / (1 + a + b)
        self._optimize(loss)
        self._write(x, y, logits=out[:n].detach())

    def step_cls(self, x: Tensor, y: Tensor) -> None:
        n, a, b = x.shape[0], self.o["alpha"], self.o["beta"]
        xf, idx = self.to_float(x), self._sample()
        if idx is None:
            loss = F.cross_entropy(self.model(xf), y)
        else:
            xm, ym = self.to_float(self.bx[idx]), self.by[idx]
            out = self.model(torch.cat([xf, xm]))
            loss = F.cross_entropy(out[:n], y) + a * F.cross_entropy(out[n:], ym)
            loss = (loss + b * F.mse_loss(out[n:], self._teacher(xm, ym))) / (1 + a + b)
        self._optimize(loss)
        self._write(x, y)
        self._ema_copies()

    def step_super(self, x: Tensor, y: Tensor) -> None:
        o = self.o
        n = x.shape[0]
        xf, idx = self.to_float(x), self._sample()
        if idx is None:
            out = self.model(xf)
            feats = self.model.get_intermediate_representation()
            loss = F.cross_entropy(out, y)
        else:
            out = self.model(torch.cat([xf, self.to_float(self.bx[idx])]))
            feats = self.model.get_intermediate_representation()
            loss = F.cross_entropy(out[:n], y) + o["der_alpha"] * F.mse_loss(out[n:], self.blogits[idx])
            idx2 = self._sample()
            xm2, ym2 = self.to_float(self.bx[idx2]), self.by[idx2]
            out2 = self.model(xm2)
            loss = loss + o["der_beta"] * F.cross_entropy(out2, ym2)
            loss = loss + o["cls_alpha"] * F.mse_loss(out2, self._teacher(xm2, ym2))
            idx3 = self._sample()
            self.model(self.to_float(self.bx[idx3]))
            stored = [buf[idx3] for buf in self.bfeat]
            loss = loss + o["pod_alpha"] * _pod_spatial(self.model.get_intermediate_representation(), stored)
            loss = loss / (1 + o["der_alpha"] + o["der_beta"] + o["cls_alpha"] + o["pod_alpha"])
        self._optimize(loss)
        self._write(x, y, logits=out[:n].detach(), feats=[f[:n].detach() for f in feats])
        self._ema_copies()

    @torch.no_grad()
    def _shrink_perturb(self) -> None:
        for p in self.model.parameters():
            noise = torch.randn(p.shape, generator=self.cpu_g, dtype=p.dtype).to(p.device)
            p.mul_(self.o["sp_shrink_factor"]).add_(noise, alpha=self.o["sp_sigma"])

    def update(self, dataset: TensorDataset) -> dict[str, float]:
        """One epoch over ``dataset``: the loop's seconds and steps."""
        inputs, targets = (t.to(self.device) for t in dataset.tensors)
        sync(self.device)
        started = time.perf_counter()
        if self.method.floor_step == "super":
            self._shrink_perturb()
        order = torch.randperm(inputs.shape[0], generator=self.loader_g).to(self.device)
        steps = 0
        for start in range(0, inputs.shape[0], self.protocol.batch_size):
            idx = order[start : start + self.protocol.batch_size]
            self.step(inputs[idx], targets[idx])
            steps += 1
        sync(self.device)
        return {"loop_s": time.perf_counter() - started, "steps": steps}


def _double_distillation(outputs: Tensor, target_logits: Tensor) -> Tensor:
    targets = target_logits - target_logits.mean(dim=1, keepdim=True)
    return 0.5 * (outputs - targets).pow(2).mean(dim=1)


class RDFloor:
    """Repeated Distillation by hand: a fresh expert trained on the new data, its logits written to
    a reservoir buffer, a fresh model trained on the buffer with the double distillation loss, and
    the buffer's logits refreshed by it."""

    def __init__(self, protocol: Protocol, model: ContinualModel, device: torch.device) -> None:
        self.protocol, self.device = protocol, device
        self.model = model.to(device)
        self.to_float = ToFloat()
        self.M = protocol.memory_size
        self.seen = 0
        self.g = torch.Generator(device=device).manual_seed(1)
        self.loader_g = torch.Generator().manual_seed(0)
        self.bx: Tensor | None = None
        self.by: Tensor | None = None
        self.blogits: Tensor | None = None

    def buffer_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.bx, self.by, self.blogits) if t is not None)

    def _fresh(self) -> ContinualModel:
        return self.protocol.make_model().to(self.device)

    @torch.no_grad()
    def _logits(self, model: nn.Module, inputs: Tensor) -> Tensor:
        model.eval()
        out = torch.cat([model(self.to_float(chunk)) for chunk in inputs.split(256)])
        model.train()
        return out

    def _write(self, x: Tensor, y: Tensor, logits: Tensor) -> None:
        n, M, s = x.shape[0], self.M, self.seen
        if self.bx is None:
            self.bx = torch.zeros((M + 1, *x.shape[1:]), dtype=x.dtype, device=self.device)
            self.by = torch.zeros((M + 1,), dtype=y.dtype, device=self.device)
            self.blogits = torch.zeros((M + 1, logits.shape[1]), device=self.device)
        t = torch.arange(s + 1, s + n + 1, device=self.device, dtype=torch.float64)
        slots = (torch.rand(n, dtype=torch.float64, device=self.device, generator=self.g) * t).long()
        slots = torch.where(t <= M, t.long() - 1, slots).clamp_(max=M)
        self.seen += n
        self.bx[slots] = x
        self.by[slots] = y
        self.blogits[slots] = logits

    def _epoch(self, model: nn.Module, n: int, batch: Callable[[Tensor], Tensor]) -> dict[str, float]:
        optimizer = torch.optim.SGD(model.parameters(), lr=self.protocol.lr)
        order = torch.randperm(n, generator=self.loader_g).to(self.device)
        sync(self.device)
        started = time.perf_counter()
        steps = 0
        for start in range(0, n, self.protocol.batch_size):
            loss = batch(order[start : start + self.protocol.batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        sync(self.device)
        return {"loop_s": time.perf_counter() - started, "steps": steps}

    def update(self, dataset: TensorDataset) -> dict[str, float]:
        inputs, targets = (t.to(self.device) for t in dataset.tensors)
        expert = self._fresh().train()
        phase1 = self._epoch(
            expert, inputs.shape[0], lambda i: F.cross_entropy(expert(self.to_float(inputs[i])), targets[i])
        )
        self._write(inputs, targets, self._logits(expert, inputs))
        self.model.load_state_dict(self._fresh().state_dict())
        filled = min(self.seen, self.M)
        assert self.bx is not None and self.blogits is not None
        bx, blogits = self.bx, self.blogits
        phase2 = self._epoch(
            self.model,
            filled,
            lambda i: _double_distillation(self.model(self.to_float(bx[i])), blogits[i]).mean(),
        )
        blogits[:filled] = self._logits(self.model, bx[:filled])
        sync(self.device)
        return {
            "expert_loop_s": phase1["loop_s"],
            "expert_steps": phase1["steps"],
            "consolidation_loop_s": phase2["loop_s"],
            "consolidation_steps": phase2["steps"],
        }


# ---------------------------------------------------------------------------------------- the library


def make_updater(method: Method, protocol: Protocol, model: ContinualModel, device: torch.device, **kw: Any):
    return method.updater(
        model,
        optimizer=functools.partial(torch.optim.SGD, lr=protocol.lr),
        memory_size=protocol.memory_size,
        batch_size=protocol.batch_size,
        memory_batch_size=protocol.memory_batch_size,
        max_epochs=1,
        train_transform=ToFloat(),
        accelerator="cuda" if device.type == "cuda" else "cpu",
        seed=0,
        **method.options,
        **kw,
    )


def make_rd_updater(protocol: Protocol, model: ContinualModel, device: torch.device, **kw: Any):
    module = importlib.import_module(RD_MODULE)
    return module.RepeatedDistillationModelUpdater(
        model,
        optimizer=functools.partial(torch.optim.SGD, lr=protocol.lr),
        memory_size=protocol.memory_size,
        batch_size=protocol.batch_size,
        max_epochs=1,
        train_transform=ToFloat(),
        accelerator="cuda" if device.type == "cuda" else "cpu",
        seed=0,
        **kw,
    )


def library_buffer_bytes(updater: ModelUpdater) -> int:
    memory = updater.learner.memory_for_state()
    if memory is None or memory.inputs is None:
        return 0
    tensors = [memory.inputs, memory.targets, *memory.metadata.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def run_library(updater: ModelUpdater, task: TensorDataset, device: torch.device) -> dict[str, float]:
    """One ``update``: wall and CPU seconds, and the loop's own seconds and steps (``FitResult``)."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    updater.update(task)
    sync(device)
    out = {"update_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    fit = updater.last_fit
    assert fit is not None
    expert = getattr(updater, "last_expert_fit", None)
    if expert is not None:  # Repeated Distillation: the expert's loop, then the consolidation's
        out.update(expert_loop_s=expert.train_seconds, expert_steps=expert.steps)
        out.update(consolidation_loop_s=fit.train_seconds, consolidation_steps=fit.steps)
    else:
        out.update(loop_s=fit.train_seconds, steps=fit.steps)
    return out


def run_floor(floor: Floor | RDFloor, task: TensorDataset, device: torch.device) -> dict[str, float]:
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = floor.update(task)
    sync(device)
    return {"update_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, **out}


def interleave(
    runs: dict[str, Callable[[TensorDataset], dict[str, float]]], tasks: list[TensorDataset], peak: PeakMemory
) -> dict[str, list[dict[str, float]]]:
    """Runs every contender on each task in turn (task 0 = warm-up, not recorded), so that load from
    other processes falls on all of them alike; records each update's peak memory increase too."""
    records: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for i, task in enumerate(tasks):
        for name, run in runs.items():
            start = peak.start()
            out = run(task)
            out["peak_increase"] = peak.peak() - start
            if i:
                records[name].append(out)
    return records


def _median(values: list[float]) -> float:
    return statistics.median(values)


def compare(lib: list[dict[str, float]], flo: list[dict[str, float]], phase: str = "") -> dict[str, Any]:
    """Medians of library and floor, and the median of the per-repetition library/floor ratios."""
    loop, steps = f"{phase}loop_s", f"{phase}steps"
    lib_step = [r[loop] / r[steps] for r in lib]
    flo_step = [r[loop] / r[steps] for r in flo]
    return {
        "steps_per_update": int(lib[0][steps]),
        "library_step_ms": 1e3 * _median(lib_step),
        "floor_step_ms": 1e3 * _median(flo_step),
        "ratio_step": _median([a / b for a, b in zip(lib_step, flo_step, strict=True)]),
        "library_update_s": _median([r["update_s"] for r in lib]),
        "floor_update_s": _median([r["update_s"] for r in flo]),
        "ratio_update": _median([a["update_s"] / b["update_s"] for a, b in zip(lib, flo, strict=True)]),
        "ratio_cpu_update": _median([a["cpu_s"] / b["cpu_s"] for a, b in zip(lib, flo, strict=True)]),
        "library_peak_increase_mib": max(r["peak_increase"] for r in lib) / 2**20,
        "floor_peak_increase_mib": max(r["peak_increase"] for r in flo) / 2**20,
        "library_step_ms_all": [round(1e3 * v, 4) for v in lib_step],
        "floor_step_ms_all": [round(1e3 * v, 4) for v in flo_step],
    }


def time_state_folder(
    make: Callable[..., ModelUpdater], updater: ModelUpdater, device: torch.device, root: Path, reps: int = 3
) -> dict[str, float]:
    """Median seconds to write the state folder (``save_state``), to verify it (``StateFolder``) and
    to load it into a new updater (``input_state_folder``: verification and restore), and its size."""
    writes, verifies, loads = [], [], []
    size = 0
    for r in range(reps):
        folder = root / f"state-{r}"
        sync(device)
        t0 = time.perf_counter()
        updater.save_state(folder)
        writes.append(time.perf_counter() - t0)
        size = sum(p.stat().st_size for p in folder.iterdir())
        t0 = time.perf_counter()
        StateFolder(folder)
        verifies.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        make(input_state_folder=folder)
        sync(device)
        loads.append(time.perf_counter() - t0)
        shutil.rmtree(folder)
    return {
        "write_s": _median(writes),
        "verify_s": _median(verifies),
        "load_s": _median(loads),
        "size_mib": size / 2**20,
    }


def bench_method(
    method: Method, protocol: Protocol, device: torch.device, reps: int, peak: PeakMemory, state_root: Path
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = protocol.make_model()
    floor = Floor(method, protocol, copy.deepcopy(model), device)
    updater = make_updater(method, protocol, model, device)
    records = interleave(
        {"library": lambda t: run_library(updater, t, device), "floor": lambda t: run_floor(floor, t, device)},
        make_tasks(protocol, reps + 1, seed=123),
        peak,
    )
    row = compare(records["library"], records["floor"])
    row["library_buffer_mib"] = library_buffer_bytes(updater) / 2**20
    row["floor_buffer_mib"] = floor.buffer_bytes() / 2**20
    make = functools.partial(make_updater, method, protocol, protocol.make_model(), device)
    return {"rows": {method.name: row}, "state": time_state_folder(make, updater, device, state_root)}


def bench_rd(protocol: Protocol, device: torch.device, reps: int, peak: PeakMemory, state_root: Path) -> dict[str, Any]:
    """Repeated Distillation: the expert's steps and the consolidation's steps, each against the floor."""
    torch.manual_seed(0)
    model = protocol.make_model()
    floor = RDFloor(protocol, copy.deepcopy(model), device)
    updater = make_rd_updater(protocol, model, device)
    records = interleave(
        {"library": lambda t: run_library(updater, t, device), "floor": lambda t: run_floor(floor, t, device)},
        make_tasks(protocol, reps + 1, seed=123),
        peak,
    )
    rows = {}
    for phase in ("expert", "consolidation"):
        row = compare(records["library"], records["floor"], phase=f"{phase}_")
        row["library_buffer_mib"] = library_buffer_bytes(updater) / 2**20
        row["floor_buffer_mib"] = floor.buffer_bytes() / 2**20
        rows[f"RD {phase}"] = row
    make = functools.partial(make_rd_updater, protocol, protocol.make_model(), device)
    return {"rows": rows, "state": time_state_folder(make, updater, device, state_root)}


# ---------------------------------------------------------------------------------------- report


def machine_description(device: torch.device) -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        match = re.search(r"Model name:\s+(.+)", text)
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    out = {
        "cpu": cpu,
        "cpus_available": str(len(os.sched_getaffinity(0))),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "retain": retain.__version__,
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = []
    for pres in results["protocols"].values():
        lines += [
            f"### {pres['title']}",
            "",
            f"Medians over {pres['reps']} updates after one warm-up update; ratios are medians of the "
            "per-update library/floor ratios (library and floor updates alternate).",
            "",
            "| method | steps/update | library ms/step | floor ms/step | **ratio step** | library s/update "
            "| floor s/update | ratio update | ratio CPU s/update | peak +MiB lib / floor | buffer MiB lib / floor |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in pres["rows"].items():
            lines.append(
                f"| {name} | {r['steps_per_update']} | {r['library_step_ms']:.3f} | {r['floor_step_ms']:.3f} "
                f"| **{r['ratio_step']:.2f}** | {r['library_update_s']:.3f} | {r['floor_update_s']:.3f} "
                f"| {r['ratio_update']:.2f} | {r['ratio_cpu_update']:.2f} "
                f"| {r['library_peak_increase_mib']:.1f} / {r['floor_peak_increase_mib']:.1f} "
                f"| {r['library_buffer_mib']:.2f} / {r['floor_buffer_mib']:.2f} |"
            )
        for name, note in pres["pending"].items():
            lines.append(f"| {name} | {note} | | | | | | | | | |")
        lines += [
            "",
            "State folder (median of 3): write = `save_state`, verify = `StateFolder(folder)`, "
            "load = a new updater from `input_state_folder` (verification and restore).",
            "",
            "| method | write s | verify s | load s | size MiB |",
            "|---|---|---|---|---|",
        ]
        for name, st in pres["state"].items():
            lines.append(
                f"| {name} | {st['write_s']:.4f} | {st['verify_s']:.4f} | {st['load_s']:.4f} | {st['size_mib']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="smaller updates and fewer repetitions")
    parser.add_argument("--reps", type=int, default=None, help="timed updates per method (default 5, quick 3)")
    parser.add_argument("--threads", type=int, default=min(2, len(os.sched_getaffinity(0))), help="torch threads")
    parser.add_argument("--methods", nargs="+", default=[*METHODS, "RD"], choices=[*METHODS, "RD"])
    parser.add_argument("--protocols", nargs="+", default=["mnist", "resnet"], choices=["mnist", "resnet"])
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 5)
    peak = PeakMemory(device)
    shown = argv if argv is not None else sys.argv[1:]
    results: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "benchmarks/speed.py", *shown]),
        "device": str(device),
        "machine": machine_description(device),
        "peak_memory": peak.kind,
        "protocols": {},
    }
    all_protocols = protocols(device, args.quick)
    with tempfile.TemporaryDirectory(prefix="retain-speed-") as tmp:
        for pname in args.protocols:
            protocol = all_protocols[pname]
            pres: dict[str, Any] = {"title": protocol.title, "reps": reps, "rows": {}, "state": {}, "pending": {}}
            results["protocols"][pname] = pres
            for mname in args.methods:
                t0 = time.perf_counter()
                root = Path(tmp) / f"{pname}-{mname}"
                root.mkdir()
                if mname != "RD":
                    out = bench_method(METHODS[mname], protocol, device, reps, peak, root)
                elif importlib.util.find_spec(RD_MODULE) is None:
                    pres["pending"]["RD"] = f"pending: {RD_MODULE} does not exist yet"
                    continue
                else:
                    out = bench_rd(protocol, device, reps, peak, root)
                pres["rows"].update(out["rows"])
                pres["state"][mname] = out["state"]
                for name, r in out["rows"].items():
                    print(
                        f"[{pname}] {name}: library {r['library_step_ms']:.3f} ms/step, floor "
                        f"{r['floor_step_ms']:.3f} ms/step, ratio {r['ratio_step']:.2f} "
                        f"({time.perf_counter() - t0:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
    print(f"command: `{results['command']}`\n")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in results["machine"].items()))
    print(f"peak memory: {results['peak_memory']}\n")
    print(markdown(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
