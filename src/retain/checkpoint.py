"""Resumable updates: an in-progress checkpoint next to the output state folder.

With ``checkpoint_every_n_epochs=N > 0`` an update writes, after every N-th completed epoch, a
checkpoint folder ``.<output-name>.resume`` beside its output state folder. It is a complete
state folder (same manifest, written atomically by ``retain.state.write_state``, JSON and
safetensors only) plus:

- ``resume.json``: the update's fingerprint, the number of epochs done and the per-epoch history;
- ``optimizer.json`` + ``optimizer.safetensors``: optimizer and LR-scheduler state dicts,
  flattened into JSON with tensors referenced by name (see ``flatten_tree``);
- ``rng.json`` + ``rng.safetensors``: the global torch (CPU and CUDA), NumPy and ``random`` states.

When an update starts and finds a checkpoint whose fingerprint matches (same state before the
update, same training and validation data as ``data_digest`` identifies them, same options,
optimizer, loss, method and task id),
it restores everything and continues with the next epoch; otherwise it ignores the checkpoint
with a warning and starts over. The checkpoint is removed once the output state is written.
On CPU with a fixed seed a resumed update ends with the same bytes as an uninterrupted one.
Not restored: a ``16-mixed`` GradScaler's scale (it restarts), and state held by user callables.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

import retain.nested as nested
from retain.batching import dataset_labels, dataset_tensors, is_iterable, split_batch, unwrap_loader
from retain.state import StateError, StateFolder, remove_stale_temporaries, write_state
from retain.version import __version__

if TYPE_CHECKING:
    from retain.updaters.loop import FitResult


class ModelUpdater(Protocol):
    """What the checkpointer needs of an updater (``retain.updaters.base.ModelUpdater`` has it);
    a protocol, so that this module, which the updater imports, does not import the updater."""

    options: Any
    learner: Any
    device: torch.device
    output_state_folder: Path | None

    @property
    def method_name(self) -> str: ...

    def method_options(self) -> dict[str, Any]: ...

    def state_payload(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Tensor]]]: ...

    def load_resume_state(self, state: StateFolder) -> None: ...

logger = logging.getLogger("retain")

RESUME_FORMAT_VERSION = 1
RESUME_JSON = "resume.json"
OPTIMIZER_JSON = "optimizer.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
RNG_JSON = "rng.json"
RNG_TENSORS = "rng.safetensors"
# Options that change neither the data, the arithmetic nor the random draws of an update.
_NEUTRAL_OPTIONS = (
    "checkpoint_every_n_epochs", "progress_bar", "log_every_n_steps", "logger",
    "num_workers", "pin_memory", "persistent_workers",
)  # fmt: skip
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def without_addresses(text: str) -> str:
    """``text`` with the `` at 0x7f...`` of default reprs removed, so that it is the same in every process."""
    return _ADDRESS.sub("", text)


def stable_repr(value: Any) -> str:
    """``repr`` without memory addresses."""
    return without_addresses(repr(value))


def callable_digest(value: Any) -> str:
    """What identifies a callable input of an update beyond its repr, which hides most settings: a
    module's public scalar attributes (a loss's ``reduction``, ``label_smoothing``) and tensors (class
    weights), a ``functools.partial``'s function, and a function's code, constants and defaults (an
    ``optimizer_fn`` whose learning rate was edited). Closure variables are not seen."""
    parts = [stable_repr(value)]
    if isinstance(value, functools.partial):
        parts.append(callable_digest(value.func))
    if isinstance(value, torch.nn.Module):
        scalars = sorted(
            (k, v) for k, v in vars(value).items()
            if not k.startswith("_") and (v is None or isinstance(v, bool | int | float | str))
        )  # fmt: skip
        parts.append(stable_repr(scalars))
        parts.append(tensors_digest(dict(value.state_dict())))
    code = getattr(value, "__code__", None)
    if code is not None:
        parts.append(hashlib.sha256(code.co_code).hexdigest())
        parts.append(stable_repr((code.co_consts, code.co_names, getattr(value, "__defaults__", None))))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def resume_folder(output_state_folder: str | Path) -> Path:
    """Where the in-progress checkpoint of an update writing ``output_state_folder`` lives."""
    output = Path(output_state_folder).absolute()
    return output.parent / f".{output.name}.resume"


# ---------------------------------------------------------------------------------------------
# Nested python values + tensors <-> JSON + named tensors (no pickle)
# ---------------------------------------------------------------------------------------------
_MARKERS = ("__tensor__", "__tuple__", "__dict__", "__float__")


def flatten_tree(tree: Any) -> tuple[Any, dict[str, Tensor]]:
    """Splits a nested value (dicts with scalar keys, lists, tuples, scalars, tensors) into JSON
    and a dict of tensors. Dicts, tuples, tensors and non-finite floats become one-key marker
    objects, so int dict keys and tuples survive the round trip exactly."""
    tensors: dict[str, Tensor] = {}

    def encode(value: Any) -> Any:
        if value is None or isinstance(value, bool | str):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if isinstance(value, Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = value.detach().cpu().clone().contiguous()
            return {"__tensor__": name}
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v) for v in value]}
        if isinstance(value, list):
            return [encode(v) for v in value]
        if isinstance(value, dict):
            for key in value:
                if not (key is None or isinstance(key, bool | int | float | str)):
                    raise TypeError(f"cannot store a dict key of type {type(key).__name__} without pickle")
            return {"__dict__": [[encode(k), encode(v)] for k, v in value.items()]}
        raise TypeError(f"cannot store a value of type {type(value).__name__} in a checkpoint without pickle")

    return encode(tree), tensors


def unflatten_tree(data: Any, tensors: dict[str, Tensor], where: str = "checkpoint") -> Any:
    """Inverse of ``flatten_tree``; raises ``StateError`` naming ``where`` on anything malformed."""
    used: set[str] = set()

    def fail(problem: str) -> StateError:
        return StateError(f"{where}: {problem}")

    def decode(value: Any) -> Any:
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in _MARKERS:
            raise fail(f"unexpected JSON object {str(value)[:80]!r} (expected one of the keys {_MARKERS})")
        ((marker, inner),) = value.items()
        if marker == "__tensor__":
            if not isinstance(inner, str) or inner not in tensors:
                raise fail(f"reference to a missing tensor {inner!r}")
            if inner in used:
                raise fail(f"tensor {inner!r} is referenced twice")
            used.add(inner)
            return tensors[inner]
        if marker == "__float__":
            if inner not in ("inf", "-inf", "nan"):
                raise fail(f"invalid float {inner!r}")
            return float(inner)
        if not isinstance(inner, list):
            raise fail(f"{marker} must hold a list")
        if marker == "__tuple__":
            return tuple(decode(v) for v in inner)
        out = {}
        for pair in inner:
            if not isinstance(pair, list) or len(pair) != 2:
                raise fail("a dict entry must be a [key, value] pair")
            key = decode(pair[0])
            if not (key is None or isinstance(key, bool | int | float | str)):
                raise fail(f"invalid dict key {key!r}")
            if key in out:
                raise fail(f"duplicate dict key {key!r}")
            out[key] = decode(pair[1])
        return out

    tree = decode(data)
    if used != set(tensors):
        raise fail(f"unreferenced tensors {sorted(set(tensors) - used)}")
    return tree


# ---------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------
def _hash_tensor(h: Any, name: str, tensor: Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``tensors``."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        _hash_tensor(h, name, tensors[name])
    return h.hexdigest()


FINGERPRINT_SAMPLE = 32  # items of a non-tensor dataset whose inputs enter the fingerprint


def data_digest(
    dataset: Dataset | DataLoader | None, collate_fn: Callable | None = None, sample: int = FINGERPRINT_SAMPLE
) -> dict[str, Any] | None:
    """What identifies an update's data, not its augmented values.

    A tensor-backed dataset (no augmentation possible) is hashed whole: every input leaf and the
    targets. Any other dataset (a map-style or iterable dataset, or a DataLoader's dataset) by:
    its class name, its number of items, all its labels (read batch by batch, inputs dropped, or
    from a ``targets`` attribute), and the inputs of a seeded subset of ``sample`` items
    (the first ones of a stream), each read twice: a leaf that reads back identically is hashed,
    one that differs between the reads (random per-item augmentation) is left out, so such a
    dataset still resumes. Changes to the inputs of items outside the subset are not seen.
    """
    if dataset is None:
        return None
    dataset, collate_fn, _ = unwrap_loader(dataset, collate_fn)
    h = hashlib.sha256()
    tensors = dataset_tensors(dataset) if collate_fn is None else None
    if tensors is not None:
        for path, leaf in nested.leaves(tensors[0]):
            _hash_tensor(h, f"inputs{'.' + path if path else ''}", leaf)
        _hash_tensor(h, "targets", tensors[1])
        return {"items": int(tensors[1].shape[0]), "sha256": h.hexdigest()}
    labels = dataset_labels(dataset, collate_fn)
    _hash_tensor(h, "labels", labels)
    h.update(type(dataset).__qualname__.encode())
    first = _sampled_inputs(dataset, collate_fn, sample, labels.shape[0])
    second = _sampled_inputs(dataset, collate_fn, sample, labels.shape[0])
    stable = []
    for (path, a), (path_b, b) in zip(nested.leaves(first), nested.leaves(second), strict=True):
        if path == path_b and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b):
            _hash_tensor(h, f"inputs{'.' + path if path else ''}", a)
            stable.append(path)
    return {"items": int(labels.shape[0]), "sha256": h.hexdigest(), "stable_leaves": stable}


def _sampled_inputs(dataset: Dataset, collate_fn: Callable | None, sample: int, n: int) -> Any:
    """The inputs of a fixed, seeded subset of items (the first ``sample`` of a stream), collated."""
    if is_iterable(dataset):
        loader = DataLoader(dataset, batch_size=sample, collate_fn=collate_fn)
        return split_batch(next(iter(loader)), "dataset")[0]
    picks = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:sample].sort().values.tolist()
    collate = collate_fn if collate_fn is not None else default_collate
    return split_batch(collate([dataset[i] for i in picks]), "dataset")[0]


def state_digest(updater: ModelUpdater) -> str:
    """sha256 of the full state the updater would save now (call before the update changes it)."""
    manifest, json_files, tensor_files = updater.state_payload()
    manifest = {k: v for k, v in manifest.items() if k != "options"}
    h = hashlib.sha256(json.dumps([manifest, json_files], sort_keys=True).encode())
    for name in sorted(tensor_files):
        h.update(f"{name}:{tensors_digest(tensor_files[name])}".encode())
    return h.hexdigest()


def update_fingerprint(
    updater: ModelUpdater,
    state_sha: str,
    train_dataset: Dataset,
    val_dataset: Dataset | None,
    train_collate_fn: Callable | None,
    val_collate_fn: Callable | None,
    task_id: str | None,
) -> str:
    """What makes two runs of an update the same run: a resume checkpoint is used only on a match.
    Callables (transforms, optimizer factory, loss) are compared by their address-free repr."""
    options = {k: v for k, v in updater.options.describe().items() if k not in _NEUTRAL_OPTIONS}
    parts = {
        "retain_version": __version__,
        "method": updater.method_name,
        "state": state_sha,
        "options": {k: without_addresses(v) if isinstance(v, str) else v for k, v in options.items()},
        "method_options": updater.method_options(),
        "optimizer": callable_digest(updater.learner.optimizer_factory),
        "loss_fn": callable_digest(updater.learner.loss_fn),
        "callable_options": {
            k: callable_digest(v) for k, v in vars(updater.options).items() if callable(v) and k not in _NEUTRAL_OPTIONS
        },
        "train": data_digest(train_dataset, train_collate_fn),
        "val": data_digest(val_dataset, val_collate_fn),
        "task_id": task_id,
        "device": updater.device.type,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Global random generators
# ---------------------------------------------------------------------------------------------
def global_rng_state() -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The global torch (CPU, every CUDA device), NumPy and ``random`` generator states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0
    for i, state in enumerate(torch.cuda.get_rng_state_all() if cuda_devices else []):
        tensors[f"torch_cuda_{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {
        "cuda_devices": cuda_devices,
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    return meta, tensors


def set_global_rng_state(meta: dict[str, Any], tensors: dict[str, Tensor], where: str) -> None:
    try:
        torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8))
        if meta["cuda_devices"] and torch.cuda.is_available():
            if meta["cuda_devices"] != torch.cuda.device_count():
                raise ValueError(f"saved on {meta['cuda_devices']} CUDA devices, {torch.cuda.device_count()} now")
            torch.cuda.set_rng_state_all([tensors[f"torch_cuda_{i}"] for i in range(meta["cuda_devices"])])
        n = meta["numpy"]
        keys = tensors["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
        p = meta["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise StateError(f"{where}: invalid random generator state: {err!r}") from None


# ---------------------------------------------------------------------------------------------
# The checkpointer
# ---------------------------------------------------------------------------------------------
def _epoch_stops_early(options: Any, history: list[dict[str, float]]) -> bool:
    """True when the loop's early-stopping rule ends training after the last epoch of ``history``."""
    from retain.updaters.loop import stops_early  # the loop's own rule (patience), defined once

    return stops_early(options, history)


class ResumeCheckpointer:
    """Writes and restores the in-progress checkpoint of one update (under the output lock)."""

    def __init__(self, updater: ModelUpdater, fingerprint: str) -> None:
        assert updater.output_state_folder is not None
        self.updater = updater
        self.fingerprint = fingerprint
        self.every = updater.options.checkpoint_every_n_epochs
        self.folder = resume_folder(updater.output_state_folder)
        self.resumed_from_epoch = 0

    def restore(self) -> dict[str, Any]:
        """Loads a matching checkpoint into the updater; returns the keyword arguments for ``fit``."""
        remove_stale_temporaries(self.folder)
        kwargs: dict[str, Any] = {"on_epoch_end": self.on_epoch_end}
        if not self.folder.exists():
            return kwargs
        try:
            state = StateFolder(self.folder)
            resume = state.json(RESUME_JSON)
            if not isinstance(resume, dict) or set(resume) != {
                "format_version",
                "fingerprint",
                "epochs_done",
                "history",
            }:
                raise StateError(f"{self.folder / RESUME_JSON}: keys must be format_version, fingerprint, ...")
        except StateError as err:
            warnings.warn(f"ignoring an unreadable resume checkpoint (starting the update over): {err}")
            self.discard()
            return kwargs
        if resume["format_version"] != RESUME_FORMAT_VERSION or resume["fingerprint"] != self.fingerprint:
            warnings.warn(
                f"ignoring the resume checkpoint {self.folder}: it belongs to a different update "
                "(other input state, data or options); starting the update over"
            )
            self.discard()
            return kwargs
        epochs_done = resume["epochs_done"]
        where = str(self.folder / RESUME_JSON)
        if isinstance(epochs_done, bool) or not isinstance(epochs_done, int) or epochs_done < 1:
            raise StateError(f"{where}: epochs_done must be a positive integer, got {epochs_done!r}")
        history = unflatten_tree(resume["history"], {}, where)
        if not isinstance(history, list) or len(history) != epochs_done:
            raise StateError(f"{where}: history must list the {epochs_done} epochs done")
        try:
            self.updater.load_resume_state(state)
            optimizer_state = unflatten_tree(
                state.json(OPTIMIZER_JSON), state.tensors(OPTIMIZER_TENSORS), str(self.folder / OPTIMIZER_JSON)
            )
            if not isinstance(optimizer_state, dict) or set(optimizer_state) != {"optimizer", "scheduler"}:
                raise StateError(f"{self.folder / OPTIMIZER_JSON}: must hold the optimizer and scheduler states")
            rng_json = state.json(RNG_JSON)
            if not isinstance(rng_json, dict):
                raise StateError(f"{self.folder / RNG_JSON}: must be a JSON object")
            set_global_rng_state(rng_json, state.tensors(RNG_TENSORS), str(self.folder / RNG_JSON))
        except StateError as err:  # checksums fine, fingerprint matching, content wrong: edited by hand
            raise StateError(f"{err} (delete the resume checkpoint {self.folder} to start the update over)") from None
        self.resumed_from_epoch = epochs_done
        logger.info("resuming the update from its checkpoint after epoch %d (%s)", epochs_done, self.folder)
        kwargs.update(start_epoch=epochs_done, optimizer_state=optimizer_state, history=history)
        return kwargs

    def on_epoch_end(self, epoch: int, result: FitResult) -> None:
        """Writes the checkpoint after every ``every``-th epoch (not after the last one, which the
        final state covers, nor after an epoch that stops training early)."""
        learner = self.updater.learner
        epochs_done = epoch + 1
        if epochs_done % self.every or epochs_done >= learner.options.max_epochs:
            return
        if _epoch_stops_early(learner.options, result.history):
            return
        manifest, json_files, tensor_files = self.updater.state_payload()
        json_files[RESUME_JSON] = {
            "format_version": RESUME_FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "epochs_done": epochs_done,
            "history": flatten_tree(list(result.history))[0],
        }
        assert result.optimization is not None
        opt_json, opt_tensors = flatten_tree(result.optimization.state_dict())
        json_files[OPTIMIZER_JSON], tensor_files[OPTIMIZER_TENSORS] = opt_json, opt_tensors
        json_files[RNG_JSON], tensor_files[RNG_TENSORS] = global_rng_state()
        write_state(self.folder, manifest, json_files, tensor_files)

    def discard(self) -> None:
        """Removes the checkpoint: renamed to a temporary name first, so a kill mid-way leaves
        a folder that the next update deletes rather than a half-deleted checkpoint."""
        if not self.folder.exists():
            return
        doomed = self.folder.parent / f".{self.folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(self.folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
