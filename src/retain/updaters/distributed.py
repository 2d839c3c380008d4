"""Multi-process (DDP) updates: ``devices > 1`` with ``strategy`` 'ddp', 'ddp_spawn' or 'auto'.

An update then runs on ``W`` processes through ``torch.distributed`` and
``DistributedDataParallel`` (gloo on CPU, nccl on CUDA, one GPU per process):

* **Launched job** (``torchrun``: ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` set): every process
  builds its updater as usual and calls ``update``; the process group is initialised here when
  it is not yet, ``W`` is its world size and CUDA rank ``r`` uses ``cuda:LOCAL_RANK``.
* **Otherwise** ``update`` starts ``W = devices`` workers itself (``torch.multiprocessing``, from a
  forkserver that has imported torch and retain once, or by spawn where there is no forkserver)
  with a picklable payload: the updater's current state written to a temporary state folder
  (model description + weights, learner, memory), the datasets, the loss, the optimizer factory,
  the learner class and options (so these must pickle: no lambdas). The parent holds the output
  lock; rank 0 writes the output folder (a temporary one without ``output_state_folder``), and the
  parent reloads model, learner and memory from it and returns the served model.

**Data.** Rank ``r`` trains on ``perm[r::W]`` of a permutation of the training data seeded from
``(seed, updates_done)``, padded by wrapping around to a multiple of ``W`` (as
``DistributedSampler``), so every rank runs the same number of steps. ``batch_size`` and the
memory batch are *global*: each rank takes ``ceil(b / W)`` of each per step and DDP averages the
gradients, so a step is the step one device takes on the union batch (exactly so when ``W``
divides the batch sizes and the model has no BatchNorm): results match one device up to batch
order. The forward passes of the learner (and of components that do extra forwards, through
``learner.forward_model``) go through the DDP module. Validation runs on every rank on the whole
validation set with identical weights, so early stopping decides the same everywhere.

**The memory under DDP.** Rank ``r`` keeps its own reservoir over the items *it* sees, with
``M_r = M // W + (r < M % W)`` of the ``memory_size`` ``M`` slots. The saved state holds ONE
memory, independent of ``W``: the items of all ranks (rank 0's, then rank 1's, ...), gathered
with ``all_gather`` of padded tensors, with ``memory_size = M`` and ``seen`` = the sum of the
ranks' ``seen``. Loading it on ``W'`` ranks re-shares it: items are dealt round-robin (item ``i``
to rank ``i % W'``) and rank ``r`` gets ``seen_r = S // W' + (r < S % W')``, so each rank's
reservoir keeps its next item with probability ``M_r / (seen_r + 1) ~ M / (S + 1)``, as the
single reservoir would. The approximation: the union of per-rank reservoirs is a uniform sample
*within each rank's stream* (each item of the whole stream is kept with probability ~``M / S``),
not one uniform sample of the whole stream, and after a re-share the items dealt to a rank are
treated as a uniform sample of its share of the stream. Because ``seen`` and the slots are shared
by the same rule, the merged memory always holds exactly ``min(seen, M)`` items. Padded
duplicates (at most ``W - 1`` per update) are offered to the reservoir like any item.

**Generators.** Only rank 0's generator states are saved (learner and memory). Rank ``r > 0``
derives its own from the saved state: it draws one integer ``s`` in ``[0, 2**62)`` from a copy of
rank 0's generator and seeds ``s + r`` (see ``derive_generator_state``); after the update every
rank takes rank 0's learner generator back. Generators that change the weights (shrink and
perturb's noise, CLS-ER's EMA draws) and the global seed stay identical on all ranks, so the
replicas stay identical.

**Writing and failures.** Only rank 0 writes the state folder, after a barrier that follows the
last step and the memory gather; the write is atomic (``retain.state.write_state``) and the output
lock is held by rank 0 (launched job) or the parent (spawn). If a worker dies or raises, the update
fails on all ranks (spawn: the parent stops the other workers and raises
``DistributedUpdateError``; torchrun: the launcher stops the job), nothing is written and the
input folder is untouched. ``checkpoint_every_n_epochs`` is not supported with ``devices > 1``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import math
import os
import pickle
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from retain.memory import ReservoirMemory
from retain.models.adapter import PlainModuleAdapter, unwrap
from retain.models.base import ContinualModel, rebuild_model
from retain.options import TrainingOptions, update_seed
from retain.state import StateFolder
from retain.updaters.base import DDP_STRATEGIES, ModelUpdater, deterministic, seed_update, wants_ddp
from retain.updaters.loop import FitResult


class DistributedUpdateError(RuntimeError):
    """A DDP update failed on some rank; no state was written."""


def in_launched_job() -> bool:
    """True inside a job started by ``torchrun`` (or with an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return True
    return all(name in os.environ for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))


# ------------------------------------------------------------------------------------ pure helpers
def share(total: int, world_size: int, rank: int) -> int:
    """Rank ``rank``'s share of ``total`` when dealt as evenly as possible (lower ranks first)."""
    return total // world_size + (1 if rank < total % world_size else 0)


def shard_indices(n: int, rank: int, world_size: int, seed: int) -> torch.Tensor:
    """Rank ``rank``'s items of ``n``: ``perm[rank::W]`` of a seeded permutation padded by wrapping
    around to a multiple of ``W``, so every rank gets ``ceil(n / W)`` items."""
    if n <= 0:
        raise ValueError("the dataset is empty: an update needs at least one item")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    per_rank = -(-n // world_size)
    padded = order.repeat(-(-per_rank * world_size // n))[: per_rank * world_size]
    return padded[rank::world_size]


def derive_generator_state(state: torch.Tensor, rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rank ``rank``'s generator state from rank 0's ``state``: itself for rank 0; otherwise a
    generator seeded ``s + rank``, with ``s`` the first draw in ``[0, 2**62)`` of a copy of ``state``."""
    if rank == 0:
        return state.clone()
    device = torch.device(device)
    source = torch.Generator(device=device)
    source.set_state(state.to(torch.uint8).cpu())
    draw = int(torch.randint(0, 2**62, (1,), generator=source, device=device))
    return torch.Generator(device=device).manual_seed(draw + rank).get_state()


def _empty_like(memory: ReservoirMemory, memory_size: int) -> ReservoirMemory:
    return memory.empty_like(memory_size)


def _pad_value(meta: dict[str, Any], key: str) -> float:
    """The fill of tensor ``key`` of a memory state when rows are padded to a longer item shape."""
    if key == "inputs" or key.startswith("inputs."):
        return meta.get("pad_values", {}).get(key[len("inputs.") :] if key != "inputs" else "", 0)
    return 0


def _padded(tensor: torch.Tensor, shape: tuple[int, ...], value: float) -> torch.Tensor:
    """``tensor`` (rows, ...) padded at the end of its per-item dims to ``shape``."""
    if tuple(tensor.shape[1:]) == tuple(shape):
        return tensor
    out = tensor.new_full((tensor.shape[0], *shape), value)
    out[(slice(None), *(slice(0, s) for s in tensor.shape[1:]))] = tensor
    return out


def _with_leaf_shapes(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``meta`` with its ``input_leaves`` shapes set to those of ``tensors`` (after padding)."""
    leaves = meta.get("input_leaves")
    if not isinstance(leaves, dict):
        return meta
    fixed = {}
    for path, leaf in leaves.items():
        key = f"inputs.{path}" if path else "inputs"
        fixed[path] = {**leaf, "shape": list(tensors[key].shape[1:])} if key in tensors else leaf
    return {**meta, "input_leaves": fixed}


def _item_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in tensors if k != "generator_state"]


def shard_memory(memory: ReservoirMemory, rank: int, world_size: int) -> ReservoirMemory:
    """Rank ``rank``'s part of a whole memory: items ``rank::W``, ``share(M)`` slots, ``share(seen)``
    seen, and a generator derived from the memory's (see the module docstring)."""
    meta, tensors = memory.state_dict()
    part = _empty_like(memory, share(memory.memory_size, world_size, rank))
    seen = share(memory.seen, world_size, rank)
    filled = min(seen, part.memory_size)
    part_tensors = {"generator_state": derive_generator_state(tensors["generator_state"], rank, memory.device)}
    if filled:
        for key in _item_keys(tensors):
            part_tensors[key] = tensors[key][rank::world_size]
    names = meta["metadata_names"] if filled else []
    part_meta = {**meta, "memory_size": part.memory_size, "seen": seen, "metadata_names": names}
    part.load_state_dict(part_meta, part_tensors)
    return part


def merge_memories(
    parts: list[tuple[dict[str, Any], dict[str, torch.Tensor]]], template: ReservoirMemory, memory_size: int
) -> ReservoirMemory:
    """One memory of ``memory_size`` slots from the ranks' ``state_dict()``s, in rank order:
    their items concatenated, ``seen`` summed, rank 0's generator state."""
    seen = sum(int(meta["seen"]) for meta, _ in parts)
    with_items = [(meta, tensors) for meta, tensors in parts if "targets" in tensors and len(tensors["targets"])]
    names = list(with_items[0][0]["metadata_names"]) if with_items else []
    merged_tensors = {"generator_state": parts[0][1]["generator_state"]}
    base_meta = with_items[0][0] if with_items else parts[0][0]
    if with_items:
        for key in _item_keys(with_items[0][1]):
            rows = [tensors[key] for _, tensors in with_items]
            shape = tuple(max(r.shape[d] for r in rows) for d in range(1, rows[0].dim()))  # longest item per dim
            merged_tensors[key] = torch.cat([_padded(r, shape, _pad_value(base_meta, key)) for r in rows])
    merged = _empty_like(template, memory_size)
    merged_meta = {**base_meta, "memory_size": memory_size, "seen": seen, "metadata_names": names}
    merged.load_state_dict(_with_leaf_shapes(merged_meta, merged_tensors), merged_tensors)
    return merged


# ------------------------------------------------------------------------------------ collectives
def _comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_gather_object(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _agree(error: str | None) -> None:
    """Raises on every rank if any rank reports an error (keeps the ranks in step)."""
    errors = [e for e in _all_gather_object(error) if e]
    if errors:
        raise DistributedUpdateError(errors[0])


def gather_memory(local: ReservoirMemory, memory_size: int) -> ReservoirMemory:
    """Every rank's memory gathered into one (on every rank): ``all_gather`` of the items, padded
    to the largest rank's count and sent as bytes, so that any dtype goes through gloo and nccl."""
    meta, tensors = local.state_dict()
    rows = len(tensors["targets"]) if "targets" in tensors else 0  # one row per item (inputs may be nested)
    spec = {k: (tuple(v.shape[1:]), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()}
    infos = _all_gather_object({"meta": meta, "rows": rows, "spec": spec})
    max_rows = max(info["rows"] for info in infos)
    reference = next((dict(info["spec"]) for info in infos if info["rows"]), None)
    if reference is not None:  # variable-length leaves: every rank sends rows padded to the longest item
        for key, (shape, dtype_name) in list(reference.items()):
            shapes = [info["spec"][key][0] for info in infos if info["rows"]]
            reference[key] = (tuple(max(s[d] for s in shapes) for d in range(len(shape))), dtype_name)
        if rows:
            tensors = {k: _padded(v, reference[k][0], _pad_value(meta, k)) if k in reference and k != "generator_state"
                       else v for k, v in tensors.items()}  # fmt: skip
        for info in infos:
            info["meta"] = _with_leaf_shapes(info["meta"], {k: torch.empty((0, *s)) for k, (s, _) in reference.items()})
    device = _comm_device(local.device)
    gathered: list[dict[str, torch.Tensor]] = [{} for _ in infos]
    if reference is not None:
        for key in _item_keys(reference):
            shape, dtype_name = reference[key]
            dtype = getattr(torch, dtype_name)
            row_bytes = math.prod(shape) * dtype.itemsize
            padded = torch.zeros((max_rows, row_bytes), dtype=torch.uint8, device=device)
            if rows:
                padded[:rows] = tensors[key].reshape(rows, -1).contiguous().view(torch.uint8).to(device)
            buffers = [torch.empty_like(padded) for _ in infos]
            dist.all_gather(buffers, padded)
            for r, info in enumerate(infos):
                if info["rows"]:
                    raw = buffers[r][: info["rows"]].cpu().contiguous()
                    gathered[r][key] = raw.view(dtype).reshape(info["rows"], *shape)
    state0 = [tensors["generator_state"] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(state0, src=0)
    gathered[0]["generator_state"] = state0[0]
    return merge_memories([(info["meta"], g) for info, g in zip(infos, gathered, strict=True)], local, memory_size)


def ensure_process_group(device: torch.device) -> None:
    """Initialises the default process group from the environment (``env://``) if needed."""
    if not dist.is_available():
        raise RuntimeError("devices > 1 needs torch.distributed, which this PyTorch build lacks")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
        # torch aborts a process that exits with a live process group once a peer has gone: the group
        # created here is destroyed at exit (a launched job's script need not know about it).
        atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shutdown_process_group(timeout_s: float = 60.0) -> bool:
    """Ends a launched job's process group cleanly; True when there was one.

    A barrier (no rank leaves while another is still in a collective), ``destroy_process_group``,
    then a count on the job's store until every rank has destroyed its group (no rank's exit tears
    down connections another rank is still closing). Without this, a rank exiting with a live gloo
    group was seen to abort at exit ("terminate called without an active exception", SIGABRT)
    after its work was done, which a scheduler counts as a failure. ``retain update`` calls this,
    then leaves with ``os._exit`` (see ``exit_launched_job``); a script running several updates in
    one job calls it once at the end.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    world = dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
    try:
        store.add("retain_group_destroyed", 1)
        deadline = time.monotonic() + timeout_s
        while store.add("retain_group_destroyed", 0) < world and time.monotonic() < deadline:
            time.sleep(0.01)
    except Exception:  # the store's host already left: every rank had destroyed its group
        pass
    return True


def exit_launched_job(code: int = 0) -> None:
    """Leaves a torchrun worker after ``shutdown_process_group``: flushes the output and logs and
    exits with ``os._exit(code)``, skipping the C++ static destructors of torch.distributed that
    can abort a worker whose work is complete. Everything the update wrote is already on disk
    (state folders are written and fsynced before the update returns)."""
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# ------------------------------------------------------------------------------------ one rank
def run_rank(
    updater: ModelUpdater,
    train_dataset: Dataset,
    val_dataset: Dataset | None,
    train_dataset_collate_fn: Callable | None,
    val_dataset_collate_fn: Callable | None,
    task_id: str | None,
    take_lock: bool,
) -> ContinualModel:
    """The update as one rank of an initialised process group runs it (see the module docstring)."""
    from torch.nn.parallel import DistributedDataParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    learner = updater.learner
    out = updater.output_state_folder
    with contextlib.ExitStack() as stack:
        error = None
        if take_lock and rank == 0 and updater.output_lock is not None:
            try:
                stack.enter_context(updater.output_lock)
            except Exception as err:  # reported to every rank, raised everywhere
                error = f"{type(err).__name__}: {err}"
        _agree(error)
        stack.enter_context(deterministic(updater.options.deterministic_trainer))
        seed_update(learner.seed, learner.updates_done)
        learner.on_model_update_start(
            train_dataset, val_dataset, train_dataset_collate_fn, val_dataset_collate_fn, task_id
        )
        full_memory = learner.memory_for_state()
        memory_batch_size = getattr(learner, "memory_batch_size", None)
        new_batch_size = learner.train_batch_size
        if rank > 0:
            learner.generator.set_state(derive_generator_state(learner.generator.get_state(), rank))
        if getattr(learner.train_dataloader(), "is_stream", False):
            raise ValueError("train_dataset: an IterableDataset cannot be sharded over devices; use devices=1")
        indices = shard_indices(
            len(learner.train_dataloader().dataset), rank, world, update_seed(learner.seed, learner.updates_done)
        )
        learner.use_train_shard(indices, -(-new_batch_size // world))
        if full_memory is not None:
            learner.memory = shard_memory(full_memory, rank, world)
            learner.memory_batch_size = -(-memory_batch_size // world) if memory_batch_size else memory_batch_size
        device = learner.device
        learner.forward_model = DistributedDataParallel(
            learner.model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=len(getattr(learner.model, "heads", ())) > 1,
        )
        try:
            updater.last_fit = updater.train()
        finally:
            learner.forward_model = learner.model
        learner.on_model_update_end()
        if full_memory is not None:
            learner.memory = gather_memory(learner.memory, full_memory.memory_size)
            learner.memory_batch_size = memory_batch_size
        generator_state = [learner.generator.get_state()]
        dist.broadcast_object_list(generator_state, src=0)
        learner.generator.set_state(generator_state[0])
        dist.barrier()
        error = None
        if rank == 0 and out is not None:
            try:
                updater.save_state(out)
            except Exception as err:
                error = f"rank 0 could not write {out}: {type(err).__name__}: {err}"
        _agree(error)
    return learner.inference_model()


# ------------------------------------------------------------------------------------ spawn
@dataclasses.dataclass
class _Payload:
    """What a spawned worker needs; pickled once per worker."""

    updater_class: type[ModelUpdater]
    learner_class: type
    learner_kwargs: dict[str, Any]
    loss_fn: Any
    optimizer: Any
    options: dict[str, Any]
    source_state: str
    output_state: str
    work_dir: str  # fit.json (rank 0's FitResult) and rankR.error (a rank's exception) are written here
    train_dataset: Dataset
    val_dataset: Dataset | None
    train_dataset_collate_fn: Callable | None
    val_dataset_collate_fn: Callable | None
    task_id: str | None
    port: int
    plain_module: torch.nn.Module | None = None  # a plain nn.Module's architecture (weights from source_state)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _options_kwargs(options: TrainingOptions) -> dict[str, Any]:
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name != "extra"}


def _check_picklable(payload: _Payload) -> None:
    """Fails before starting workers, naming the part of the update that cannot be sent to them."""
    for name in ("loss_fn", "optimizer", "options", "learner_kwargs", "train_dataset_collate_fn",
                 "val_dataset_collate_fn", "updater_class", "learner_class", "plain_module"):  # fmt: skip
        try:
            pickle.dumps(getattr(payload, name))
        except Exception as err:
            raise TypeError(
                f"devices > 1 runs the update in worker processes, which need a picklable {name}: {err}. "
                "Use module-level functions and classes (e.g. functools.partial(torch.optim.SGD, lr=0.1), "
                "not a lambda), or start one process per device with torchrun (e.g. `torchrun --nproc_per_node 2 "
                "--no-python retain update ...`)."
            ) from None


def _start_method() -> str:
    """'forkserver' where available: a server process imports torch and retain once, and every
    worker of every later update forks from it (seconds saved per update); 'spawn' elsewhere."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["__main__", "torch", "torch._dynamo", "retain", "retain.updaters.distributed"]
    )
    return "forkserver"


def _spawned_worker(rank: int, world_size: int, payload: _Payload) -> None:
    """Entry point of a spawned rank; records its exception for the parent's message."""
    try:
        _run_spawned_rank(rank, world_size, payload)
    except BaseException as err:
        (Path(payload.work_dir) / f"rank{rank}.error").write_text(f"{type(err).__name__}: {err}")
        raise


def _run_spawned_rank(rank: int, world_size: int, payload: _Payload) -> None:
    """Rebuilds the updater from the temporary state folder and runs this rank of the update."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(payload.port), RETAIN_SPAWNED_RANK="1",  # the parent holds the output lock
    )  # fmt: skip
    options = dict(payload.options)
    if rank > 0:
        options["progress_bar"] = False
    if payload.plain_module is not None:
        model = payload.plain_module
    else:
        model = rebuild_model(StateFolder(payload.source_state).manifest["model"])
    updater = payload.updater_class(  # built as the user built it: the method's options by name
        model, payload.loss_fn, payload.optimizer, **payload.learner_kwargs, input_state_folder=payload.source_state,
        output_state_folder=payload.output_state, **options,
    )  # fmt: skip
    if updater.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    ensure_process_group(updater.device)
    try:
        run_rank(
            updater, payload.train_dataset, payload.val_dataset, payload.train_dataset_collate_fn,
            payload.val_dataset_collate_fn, payload.task_id, take_lock=False,
        )  # fmt: skip
        if rank == 0 and updater.last_fit is not None:
            (Path(payload.work_dir) / "fit.json").write_text(json.dumps(updater.last_fit.summary()))
    finally:
        dist.destroy_process_group()


def _spawn_update(
    updater: ModelUpdater,
    train_dataset: Dataset,
    val_dataset: Dataset | None,
    train_dataset_collate_fn: Callable | None,
    val_dataset_collate_fn: Callable | None,
    task_id: str | None,
) -> ContinualModel:
    import torch.multiprocessing as mp

    world = int(updater.options.devices or 1)
    if updater.device.type == "cuda" and world > torch.cuda.device_count():
        raise ValueError(f"devices={world} but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    out = updater.output_state_folder
    lock = updater.output_lock if updater.output_lock is not None else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix="retain-ddp-") as tmp, lock:
        source = updater.save_state(Path(tmp) / "input")
        target = Path(out) if out is not None else Path(tmp) / "output"
        payload = _Payload(
            updater_class=type(updater), learner_class=type(updater.learner), learner_kwargs=updater.learner_kwargs,
            loss_fn=updater.learner.loss_fn, optimizer=updater.learner.optimizer_factory,
            options=_options_kwargs(updater.options), source_state=str(source), output_state=str(target),
            work_dir=tmp, train_dataset=train_dataset, val_dataset=val_dataset,
            train_dataset_collate_fn=train_dataset_collate_fn, val_dataset_collate_fn=val_dataset_collate_fn,
            task_id=task_id, port=_free_port(),
            plain_module=unwrap(updater.model) if isinstance(updater.model, PlainModuleAdapter) else None,
        )  # fmt: skip
        _check_picklable(payload)
        try:
            mp.start_processes(_spawned_worker, args=(world, payload), nprocs=world, start_method=_start_method())
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
            # Once a rank fails its peers fail too (connection reset): report what every rank saw.
            errors = [f"rank {r}: {(Path(tmp) / f'rank{r}.error').read_text()}" for r in range(world)
                      if (Path(tmp) / f"rank{r}.error").exists()]  # fmt: skip
            where = f"; nothing was written to {out}" if out is not None else ""
            detail = " | ".join(errors) if errors else str(err).strip()
            raise DistributedUpdateError(f"the DDP update on {world} processes failed{where}: {detail}") from err
        state = StateFolder(target)
        # The parent continues from what rank 0 wrote, exactly as a new updater on that folder would.
        updater.load_state(state)
        fit_file = Path(tmp) / "fit.json"
        updater.last_fit = FitResult(**json.loads(fit_file.read_text())) if fit_file.exists() else None
    return updater.learner.inference_model()


def distributed_update(
    updater: ModelUpdater,
    train_dataset: Dataset,
    val_dataset: Dataset | None = None,
    train_dataset_collate_fn: Callable | None = None,
    val_dataset_collate_fn: Callable | None = None,
    task_id: str | None = None,
) -> ContinualModel:
    """``ModelUpdater.update`` with ``devices > 1``: in a launched job, this process's rank;
    otherwise spawns ``devices`` workers. Returns the model to predict with."""
    if updater.options.checkpoint_every_n_epochs:
        raise ValueError("checkpoint_every_n_epochs is not supported with devices > 1 (set it to 0)")
    if updater.device.type not in ("cpu", "cuda"):
        raise ValueError(f"devices > 1 runs on CPU (gloo) or CUDA GPUs (nccl), not on {updater.device.type!r}")
    if in_launched_job():
        ensure_process_group(updater.device)
        return run_rank(
            updater, train_dataset, val_dataset, train_dataset_collate_fn, val_dataset_collate_fn, task_id,
            take_lock=True,
        )  # fmt: skip
    return _spawn_update(
        updater, train_dataset, val_dataset, train_dataset_collate_fn, val_dataset_collate_fn, task_id
    )


__all__ = [
    "DDP_STRATEGIES",
    "DistributedUpdateError",
    "derive_generator_state",
    "distributed_update",
    "ensure_process_group",
    "exit_launched_job",
    "gather_memory",
    "in_launched_job",
    "merge_memories",
    "run_rank",
    "shard_indices",
    "shard_memory",
    "share",
    "shutdown_process_group",
    "wants_ddp",
]
