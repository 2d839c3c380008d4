"""Model updaters: one call of ``update`` = one continual-learning update, state folder in and out.

``ModelUpdater(model, ..., input_state_folder=A, output_state_folder=B).update(train, val)``
restores the model, the learner (counters, random generators, component state) and the memory
from A, trains, and writes the whole state to B atomically. Each update can thus run in its own
process or job, and continues exactly where the previous one stopped.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from retain.checkpoint import ResumeCheckpointer, state_digest, update_fingerprint, without_addresses
from retain.learners.base import Learner, model_device, new_checkpoint, use_float64
from retain.models.adapter import as_continual_model, is_plain_description, unwrap
from retain.models.base import ContinualModel
from retain.options import TrainingOptions, update_seed
from retain.state import (
    MANIFEST,
    LinkedFile,
    OutputLock,
    StateError,
    StateFolder,
    check_finite,
    check_json_like,
    check_output_path,
    check_tensor_specs,
    check_tensors_roundtrip,
    parse_json,
    printable,
    resolved,
    tensor_specs,
    write_state,
)
from retain.updaters.loop import FitResult, fit
from retain.val_history import with_history_keys
from retain.version import __version__


def resolve_device(accelerator: str, devices: int | None) -> torch.device:
    """The training device for the spec's ``accelerator`` ('auto', 'cpu', 'gpu'/'cuda', 'mps')."""
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"accelerator={accelerator!r} was asked for, but no CUDA GPU is available")
        return _cuda_device(devices)
    if accelerator == "mps":
        if not torch.backends.mps.is_available():
            raise RuntimeError("accelerator='mps' was asked for, but MPS is not available")
        return torch.device("mps")
    if accelerator == "auto" and torch.cuda.is_available():
        return _cuda_device(devices)
    return torch.device("cpu")


def _cuda_device(devices: int | None) -> torch.device:
    """``cuda:LOCAL_RANK`` for a rank of a multi-process update (torchrun or spawned), else ``cuda``."""
    local_rank = os.environ.get("LOCAL_RANK")
    if devices is not None and devices > 1 and local_rank is not None:
        return torch.device("cuda", int(local_rank))
    return torch.device("cuda")


DDP_STRATEGIES = ("ddp", "ddp_spawn", "auto")


def wants_ddp(options: TrainingOptions) -> bool:
    """True when ``options`` ask for a multi-process update."""
    return (options.devices or 1) > 1 and options.strategy in DDP_STRATEGIES


def seed_update(seed: int, updates_done: int) -> None:
    """Seeds the global generators (dropout, initialisation) for update number ``updates_done``."""
    torch.manual_seed(update_seed(seed, updates_done))


class ModelUpdater:
    """Base updater: restores state, runs ``train`` between the learner's update hooks, saves state.

    ``learner_kwargs`` holds the method's own options (memory size, alpha, ...); the common
    training options are keyword arguments (see ``TrainingOptions``).
    """

    supports_resume = False  # True where ``train`` passes ``self._fit_kwargs`` to its one ``fit``
    # The multi-process runner (``retain.updaters.distributed.distributed_update``), set by the
    # ``retain.updaters`` package: distributed builds on this module, so this module cannot import it.
    run_distributed: Callable[..., Any] | None = None

    def __init__(
        self,
        model: ContinualModel | nn.Module,
        loss_fn: nn.Module | Callable | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        learner_class: type[Learner] = Learner,
        learner_kwargs: dict[str, Any] | None = None,
        input_state_folder: str | Path | None = None,
        output_state_folder: str | Path | None = None,
        **options: Any,
    ) -> None:
        model = as_continual_model(model)  # a plain nn.Module is wrapped (see retain.models.adapter)
        self.options = TrainingOptions.from_kwargs(type(self).__name__, **options)
        self.input_state_folder = Path(input_state_folder) if input_state_folder is not None else None
        self.output_state_folder = (
            check_output_path(output_state_folder, input_state_folder) if output_state_folder is not None else None
        )
        if self.options.checkpoint_every_n_epochs:
            if not self.supports_resume:
                raise ValueError(f"{type(self).__name__} does not support checkpoint_every_n_epochs (set it to 0)")
            if self.output_state_folder is None:
                raise ValueError(
                    "checkpoint_every_n_epochs needs an output_state_folder (the checkpoint sits beside it)"
                )
        self._fit_kwargs: dict[str, Any] = {}
        self._loading_resume = False  # load_resume_state: the learner keeps the data it holds
        self.resumed_from_epoch = 0
        self.learner_kwargs = dict(learner_kwargs or {})
        self.device = resolve_device(self.options.accelerator, self.options.devices)
        # The lock is taken before the input is read: two writers of one folder cannot both
        # proceed from the same input. Ranks of a multi-process update other than the first
        # leave it to the process that writes.
        self.output_lock: OutputLock | None = None
        if self.output_state_folder is not None and not secondary_rank():
            self.output_lock = OutputLock(self.output_state_folder).acquire()
        try:
            self.model = model.to(self.device)
            if self.options.float64:  # before the weights are loaded: a float64 state holds float64 tensors
                use_float64(self.model)
            state = None
            if self.input_state_folder is not None:
                state = StateFolder(self.input_state_folder, defer_mapped=self._defer_mapped_verification())
            if state is not None:
                self._check_state_matches(state)
                self._load_model_weights(state)
            self.learner = learner_class(
                model=self.model, loss_fn=loss_fn, optimizer=optimizer, options=self.options, **self.learner_kwargs
            )
            if state is not None:
                self._load_learner_state(state)
        except BaseException:
            self.release_output_lock()
            raise
        self.last_fit: FitResult | None = None

    def _hold_output_lock(self) -> None:
        """Takes the output lock again after an earlier update released it, or takes the lock of a
        new ``output_state_folder`` set on this updater (its path checked by the same rules)."""
        if self.output_state_folder is None or secondary_rank():
            return
        if self.output_lock is None or self.output_lock.folder != resolved(self.output_state_folder):
            self.release_output_lock()
            self.output_state_folder = check_output_path(self.output_state_folder, self.input_state_folder)
            self.output_lock = OutputLock(self.output_state_folder)
        self.output_lock.acquire()

    def release_output_lock(self) -> None:
        """Releases (and removes) the output folder's lock; ``update`` takes it again if called again."""
        while self.output_lock is not None and self.output_lock.held:
            self.output_lock.release()

    # ------------------------------------------------------------------ state in
    @property
    def method_name(self) -> str:
        return type(self).__name__

    def _defer_mapped_verification(self) -> bool:
        """Whether the input state's mapped files are hashed in the background instead of at load
        (``StateFolder(defer_mapped=True)``); an updater that says yes joins the verification
        before it writes or returns anything (see ``JointModelUpdater``)."""
        return False

    def _check_state_matches(self, state: StateFolder) -> None:
        m = state.manifest
        if m["method"] != self.method_name:
            raise StateError(
                f"{state.path / MANIFEST}: the state was written by {printable(m['method'])}, not "
                f"{self.method_name}: continue it with the same method"
            )
        saved, mine = m["model"], self.model.describe()
        if saved["class"] != mine["class"] or saved["hyperparameters"] != mine["hyperparameters"]:
            raise StateError(
                f"{state.path / MANIFEST}: the state holds a {printable(saved['class'])} with hyperparameters "
                f"{printable(saved['hyperparameters'])[:200]}, but the model given is a {mine['class']} with "
                f"{printable(mine['hyperparameters'])[:200]}"
            )

    def _load_model_weights(self, state: StateFolder) -> None:
        """Checks the weights file's header against the model (its task heads added) before reading it."""
        header = model_header(state)
        for task_id in state.manifest["model"]["task_ids"]:
            self.model.add_task_params(task_id)
        load_weights(state, self.model, header)

    def _load_learner_state(self, state: StateFolder) -> None:
        """Restores learner and memory, refusing (StateError naming the file) any JSON whose keys or
        value types differ from what this learner writes, and tensors it would not write back."""
        template = new_checkpoint()
        self.learner.on_save_checkpoint(template)
        learner_json, learner_path = with_history_keys(state.json("learner.json")), state.path / "learner.json"
        check_json_like(learner_json, template["json"], learner_path)
        for key in ("global_step", "updates_done"):
            if learner_json[key] < 0:
                raise StateError(f"{learner_path}: {key} must be >= 0, got {learner_json[key]}")
        for key in ("updates_done", "task_ids_seen"):
            if learner_json[key] != state.manifest[key]:
                raise StateError(f"{learner_path}: {key} {learner_json[key]!r} differs from the manifest's")
        tensors = state.tensors("learner.safetensors")
        try:
            self.learner.on_load_checkpoint({"json": learner_json, "tensors": tensors})
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise StateError(
                f"{state.path / 'learner.safetensors'}: learner state does not fit {self.method_name}: {err!r}"
            ) from None
        resaved = new_checkpoint()
        self.learner.on_save_checkpoint(resaved)
        check_tensors_roundtrip(tensors, resaved["tensors"], state.path / "learner.safetensors")
        self._load_validation_history(state)
        memory = self.learner.memory_for_state()
        if memory is None:
            return
        # The memory validates its own format (fields, dtypes, shapes, counters, columns, finiteness).
        meta = state.json("memory.json")
        buffers = memory.load_buffers(meta, state.tensor_header("memory.safetensors"))
        memory_tensors = state.tensors("memory.safetensors", into=buffers)  # read into the columns: held once
        num_classes = int(getattr(self.model, "num_outputs", 0)) or None
        required = self.learner.required_memory_metadata()
        try:
            memory.load_state_dict(meta, memory_tensors, num_classes=num_classes, required_metadata=required)
        except ValueError as err:
            name = "memory.json" if getattr(err, "in_json", False) else "memory.safetensors"
            raise StateError(f"{state.path / name}: {err}") from None

    def _load_validation_history(self, state: StateFolder) -> None:
        """Maps the stored val chunks (``validation_data='all'``) that ``learner.json`` lists; a
        resumed update keeps the chunks it holds, which must be the ones its checkpoint lists."""
        history = self.learner.val_history
        if self._loading_resume:
            if not history.holds_loaded():
                raise StateError(
                    f"{state.path / 'learner.json'}: val_chunks {printable(history.loaded['val_chunks'][:10])} "
                    f"differ from the update's {history.names[:10]}"
                )
            return
        num_classes = int(getattr(self.model, "num_outputs", 0)) or None
        history.attach(state, self.learner.updates_done, num_classes, self.learner.task_ids_seen)

    def load_state(self, state: StateFolder) -> None:
        """Loads a verified state folder's model, learner and memory into this updater (as a new
        updater on that folder would hold them)."""
        self._check_state_matches(state)
        self._load_model_weights(state)
        self._load_learner_state(state)

    def load_resume_state(self, state: StateFolder) -> None:
        """Loads an in-progress checkpoint's model, learner and memory (after ``on_model_update_start``)."""
        self._check_state_matches(state)
        self._load_model_weights(state)
        self._loading_resume = True
        try:
            self._load_learner_state(state)
        finally:
            self._loading_resume = False

    # ------------------------------------------------------------------ the update
    def update(
        self,
        train_dataset: Dataset,
        val_dataset: Dataset | None = None,
        train_dataset_collate_fn: Callable | None = None,
        val_dataset_collate_fn: Callable | None = None,
        task_id: str | None = None,
    ) -> ContinualModel:
        """Trains on ``train_dataset`` and returns the model to predict with (for a plain
        ``nn.Module``, the module itself). The datasets may be map-style or iterable, or DataLoaders.

        With ``checkpoint_every_n_epochs`` it resumes from a matching in-progress checkpoint
        beside the output folder (see ``retain.checkpoint``) and removes it once the state is written.
        """
        self._hold_output_lock()
        try:
            if wants_ddp(self.options):
                if ModelUpdater.run_distributed is None:
                    raise RuntimeError("import retain.updaters to run multi-process updates")
                return unwrap(ModelUpdater.run_distributed(
                    self, train_dataset, val_dataset, train_dataset_collate_fn, val_dataset_collate_fn, task_id
                ))  # fmt: skip
            return self._update_in_process(
                train_dataset, val_dataset, train_dataset_collate_fn, val_dataset_collate_fn, task_id
            )
        finally:
            self.release_output_lock()

    def _update_in_process(
        self,
        train_dataset: Dataset,
        val_dataset: Dataset | None,
        train_dataset_collate_fn: Callable | None,
        val_dataset_collate_fn: Callable | None,
        task_id: str | None,
    ) -> ContinualModel:
        with deterministic(self.options.deterministic_trainer):
            seed_update(self.learner.seed, self.learner.updates_done)
            checkpointing = bool(self.options.checkpoint_every_n_epochs)
            state_sha = state_digest(self) if checkpointing else ""
            self.learner.on_model_update_start(
                train_dataset, val_dataset, train_dataset_collate_fn, val_dataset_collate_fn, task_id
            )
            checkpointer = None
            if checkpointing:
                fingerprint = update_fingerprint(
                    self, state_sha, train_dataset, val_dataset, train_dataset_collate_fn, val_dataset_collate_fn,
                    task_id,
                )  # fmt: skip
                checkpointer = ResumeCheckpointer(self, fingerprint)
                self._fit_kwargs = checkpointer.restore()
                self.resumed_from_epoch = checkpointer.resumed_from_epoch
            try:
                self.last_fit = self.train()
            finally:
                self._fit_kwargs = {}
            self.learner.on_model_update_end()
            if self.output_state_folder is not None:
                self.save_state(self.output_state_folder)
            if checkpointer is not None:
                checkpointer.discard()
        return unwrap(self.learner.inference_model())  # a plain nn.Module comes back as the user's module

    def train(self) -> FitResult:
        """Trains the learner on this update's data, between its update hooks (``update`` calls it,
        and so does each rank of a multi-process update); a method with two phases overrides it."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state out
    def method_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.learner_kwargs.items() if v is None or isinstance(v, bool | int | float | str)}

    def save_state(self, folder: str | Path) -> Path:
        """Writes the full continual state to ``folder`` (atomically): the mapped files
        (``mapped_state_files``) read from an earlier state are hard-linked, not rewritten."""
        manifest, json_files, tensor_files = self.state_payload()
        mapped, linked = self.mapped_state_files()
        written = write_state(folder, manifest, json_files, {**tensor_files, **mapped}, linked_files=linked)
        if mapped:
            self.mapped_files_written(written, parse_json((written / MANIFEST).read_bytes(), written / MANIFEST))
        return written

    def mapped_state_files(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, LinkedFile]]:
        """The state's mapped files (``retain.state.is_mapped_file``): new ones as tensors to write,
        those read from a verified state as linked files. Here: the stored validation chunks."""
        return self.learner.val_history.files()

    def mapped_files_written(self, folder: Path, manifest: dict[str, Any]) -> None:
        """Records the mapped files just written into ``folder`` (so that later states link them)."""
        self.learner.val_history.written(folder, manifest)

    def state_payload(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
        """(manifest, JSON files, tensor files) of the full state as it is now. Callables in the
        options are recorded by their repr without memory addresses (same bytes in every process)."""
        checkpoint = new_checkpoint()
        self.learner.on_save_checkpoint(checkpoint)
        served = self.learner.inference_model()
        manifest = {
            "retain_version": __version__,
            "method": self.method_name,
            "model": served.describe(),
            "method_options": self.method_options(),
            "options": {
                k: without_addresses(v) if isinstance(v, str) else v for k, v in self.options.describe().items()
            },
            "updates_done": self.learner.updates_done,
            "task_ids_seen": list(self.learner.task_ids_seen),
        }
        json_files: dict[str, Any] = {"learner.json": checkpoint["json"]}
        tensor_files = {  # copies: the payload may outlive the next optimizer step (checkpoints, DDP)
            "model.safetensors": {k: v.detach().clone() for k, v in served.state_dict().items()},
            "learner.safetensors": {k: v.detach().clone() for k, v in checkpoint["tensors"].items()},
        }
        memory = self.learner.memory_for_state()
        if memory is not None:
            json_files["memory.json"], tensor_files["memory.safetensors"] = memory.state_dict()
        return manifest, json_files, tensor_files


class SingleTrainingLoopUpdater(ModelUpdater):
    """An updater whose update is one training loop of ``max_epochs`` epochs (resumable)."""

    supports_resume = True

    def train(self) -> FitResult:
        return fit(self.learner, description=f"{self.method_name} task {self.learner.task_id}", **self._fit_kwargs)


@contextlib.contextmanager
def deterministic(enabled: bool):
    """``deterministic_trainer=True``: ``torch.use_deterministic_algorithms(True)`` during the update.

    On CPU, updates are bit-identical for the same seed, data and options in any case. On a GPU
    they are bit-identical only with this switch on, on the same GPU model, driver, CUDA/cuDNN and
    PyTorch versions (older CUDA/PyTorch also need ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` set before
    CUDA starts); an op without a deterministic kernel then raises instead of varying. Without it,
    cuBLAS/cuDNN kernel choice and atomic adds (e.g. in index backward passes) can change the last
    bits from run to run. GPU results never match CPU results bit for bit, and mixed precision
    (``16-mixed``, ``bf16-mixed``) differs from 32-bit.
    """
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def secondary_rank() -> bool:
    """True in a process of a multi-process update that does not write the state (rank > 0 of a
    torchrun job, or any worker spawned by ``devices=N``, whose parent holds the output lock)."""
    if os.environ.get("RETAIN_SPAWNED_RANK") == "1" or os.environ.get("RANK", "0") not in ("", "0"):
        return True
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() > 0


def load_model(state_folder: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The model to predict with from a state folder, rebuilt from its registry entry (no pickle).

    ``model``: a freshly built module to load the weights into, required for a state of a plain
    ``nn.Module`` (which records no constructor): its class name and every weight's name, shape
    and dtype must match the state, else a ``StateError`` says what differs. Returns ``model``
    itself (in eval mode) when given.

    Without ``model``, the recorded model is first built on the ``meta`` device (no memory) and
    its tensor names, dtypes and shapes compared with the weights file's header; only a model that
    fits is built. A read that races an update replacing the folder is retried on the new folder
    (a reader gets the old or the new complete state, never a mix)."""
    for attempt in range(4):
        identity = _folder_identity(state_folder)
        try:
            return _load_model_once(state_folder, model)
        except (StateError, OSError):
            if attempt == 3 or identity is None or _folder_identity(state_folder) == identity:
                raise
            time.sleep(0.02 * (attempt + 1))  # the folder was replaced while we read it: read the new one
    raise AssertionError("unreachable")


def _folder_identity(folder: str | Path) -> tuple[int, int] | None:
    try:
        info = os.lstat(folder)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _load_model_once(state_folder: str | Path, model: nn.Module | None) -> nn.Module:
    from retain.models.base import rebuild_model

    state = StateFolder(state_folder)
    where = state.path / "model.safetensors"
    header = model_header(state)
    description = state.manifest["model"]
    float64 = any(dtype == torch.float64 for dtype, _ in header.values())  # written by a precision='64' update
    if model is not None:
        target = as_continual_model(model)
        mine = target.describe()
        if mine["class"] != description["class"] or mine["hyperparameters"] != description["hyperparameters"]:
            raise StateError(
                f"{state.path / MANIFEST}: the state holds a {printable(description['class'])} with hyperparameters "
                f"{printable(description['hyperparameters'])[:200]}, but the model given is a {mine['class']} "
                f"with {printable(mine['hyperparameters'])[:200]}"
            )
        for task_id in description["task_ids"]:
            target.add_task_params(task_id)
    elif is_plain_description(description):
        name = printable(description["class"])
        raise StateError(
            f"{state.path / MANIFEST}: the state holds a plain nn.Module ({name}), which records no constructor: "
            f"rebuild it with retain.load_model(folder, model={name}(...))"
        )
    else:
        try:
            with torch.device("meta"):
                skeleton = rebuild_model(description)
            if float64:
                skeleton.to(torch.float64)
            check_tensor_specs(header, tensor_specs(skeleton.state_dict()), where, "the recorded model needs")
            del skeleton
            target = rebuild_model(description)
        except (TypeError, ValueError, OverflowError, RuntimeError) as err:
            raise StateError(f"{state.path / MANIFEST}: cannot rebuild the recorded model: {printable(err)}") from None
    if float64:
        use_float64(target)
    load_weights(state, target, header)
    return unwrap(target).eval()


def model_header(state: StateFolder) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The weights file's header, refused when it cannot hold the task heads the manifest lists
    (checked before any head is built: a manifest of 300,000 task ids costs nothing)."""
    header = state.tensor_header("model.safetensors")
    heads = len(state.manifest["model"]["task_ids"])
    if heads > len(header):
        where = state.path / "model.safetensors"
        raise StateError(f"{where} holds {len(header)} tensors, too few for the {heads} task heads listed")
    return header


def load_weights(state: StateFolder, model: nn.Module, header: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
    """Loads ``model.safetensors`` into ``model`` after its names, dtypes and shapes were checked
    against ``header`` (nothing is read before that); NaN/Inf weights are refused."""
    where = state.path / "model.safetensors"
    check_tensor_specs(header, tensor_specs(model.state_dict()), where, "the model needs")
    weights = state.tensors("model.safetensors")
    check_finite(weights, where)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise StateError(f"{where} does not fit the model: {err}") from None


__all__ = ["ModelUpdater", "SingleTrainingLoopUpdater", "load_model", "model_device", "resolve_device"]
