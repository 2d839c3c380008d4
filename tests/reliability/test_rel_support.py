"""Shared machinery of the reliability tests (this module holds no tests itself).

- ``ForkServer``: a Python process that imports torch and retain once, then forks one child per
  job, so that a real update can start in milliseconds and be SIGKILLed at any moment. The
  server (the children's parent) sends the SIGKILL and reaps the child, so a kill can never hit
  a recycled pid. Children report their progress as JSON lines ("phase markers") on the
  server's stdout: ``build``, ``train``, ``fit``, ``epoch_end``, ``write``/``rename`` (of the
  state or the resume checkpoint; optionally slowed down to widen that window), ``done``.
- ``run_job``: the update a child runs: a tiny MLP on seeded synthetic blobs.
- ``snapshot``: sha256 of every file below a folder.

Run as a script: ``serve`` (the fork server) or ``job '<json>'`` (one job in a fresh process).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO_ROOT = HERE.parents[2]
SERVER_START_TIMEOUT = 180.0

JOB_DEFAULTS: dict[str, Any] = {
    "method": "der",
    "epochs": 4,
    "checkpoint_every": 0,
    "seed": 3,
    "init_seed": 5,
    "data_seed": 11,
    "items": 160,
    "task_id": "t1",
    "input": None,
    "output": None,
    "slow_write": 0.0,  # seconds slept before and after writing each file of the output state
    "slow_checkpoint_write": 0.0,  # the same for the resume checkpoint
    "transform": True,
}


# ------------------------------------------------------------------------------ the child's update
def scale_inputs(x: Any) -> Any:
    """The train transform of the jobs (a module-level function: its repr holds a memory address)."""
    return x * 0.5


def synthetic_data(seed: int, items: int = 160, features: int = 16, classes: int = 4) -> Any:
    """Seeded Gaussian blobs, one per class, as a TensorDataset."""
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=g) * 2.0
    targets = (torch.arange(items) % classes)[torch.randperm(items, generator=g)]
    inputs = centers[targets] + torch.randn(items, features, generator=g)
    return TensorDataset(inputs, targets)


def build_updater(job: dict[str, Any]) -> Any:
    """The updater of ``job`` (merged with ``JOB_DEFAULTS``): Adam + StepLR on a 16-32-4 MLP."""
    import functools

    import torch

    from retain import MultiLayerPerceptron
    from retain.methods import (
        CLSExperienceReplayModelUpdater,
        DarkExperienceReplayModelUpdater,
        ExperienceReplayModelUpdater,
        FineTuningModelUpdater,
        JointModelUpdater,
        SuperExperienceReplayModelUpdater,
    )

    job = {**JOB_DEFAULTS, **job}
    methods: dict[str, tuple[Any, dict[str, Any]]] = {
        "ft": (FineTuningModelUpdater, {}),
        "joint": (JointModelUpdater, {}),
        "er": (ExperienceReplayModelUpdater, {"memory_size": 40}),
        "der": (DarkExperienceReplayModelUpdater, {"memory_size": 40, "alpha": 0.5, "beta": 0.5}),
        "cls": (CLSExperienceReplayModelUpdater, {"memory_size": 40}),
        "super": (SuperExperienceReplayModelUpdater, {"memory_size": 40}),
    }
    cls, method_kwargs = methods[job["method"]]
    options: dict[str, Any] = {
        "batch_size": 16,
        "max_epochs": job["epochs"],
        "seed": job["seed"],
        "accelerator": "cpu",
        "checkpoint_every_n_epochs": job["checkpoint_every"],
        "learning_rate_scheduler": functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5),
    }
    if job["transform"]:
        options["train_transform"] = scale_inputs
    options.update(job.get("options", {}))
    torch.manual_seed(job["init_seed"])  # the initial weights (overwritten when there is an input state)
    model = MultiLayerPerceptron(num_inputs=16, num_outputs=4, hidden_sizes=(32,))
    return cls(
        model,
        optimizer=functools.partial(torch.optim.Adam, lr=0.01),
        input_state_folder=job["input"],
        output_state_folder=job["output"],
        **method_kwargs,
        **options,
    )


_HOOKS: dict[str, Any] = {}


def _install_hooks() -> None:
    """Patches phase markers (and optional slow writes) into retain, once per process; the
    current job and marker sink live in ``_HOOKS``."""
    import retain.state
    import retain.updaters.base

    if _HOOKS.get("installed"):
        return
    real_write, real_rename, real_fit = retain.state.write_file, os.rename, retain.updaters.base.fit

    def emit(event: str, **fields: Any) -> None:
        _HOOKS["emit"](event, **fields)

    def delay(kind: str) -> float:
        return float(_HOOKS["job"]["slow_write" if kind == "state" else "slow_checkpoint_write"])

    def write_file(path: Path, chunks: Any) -> Any:
        kind = "checkpoint" if ".resume" in path.parent.name else "state"
        emit("write", kind=kind, file=path.name)
        time.sleep(delay(kind))
        entry = real_write(path, chunks)
        time.sleep(delay(kind))
        return entry

    def rename(src: Any, dst: Any) -> None:
        kind = "checkpoint" if ".resume" in Path(src).name + Path(dst).name else "state"
        emit("rename", kind=kind, src=Path(src).name, dst=Path(dst).name)
        time.sleep(delay(kind))
        real_rename(src, dst)

    def fit(learner: Any, **kwargs: Any) -> Any:
        emit("fit", start_epoch=kwargs.get("start_epoch", 0))
        inner = kwargs.get("on_epoch_end")

        def on_epoch_end(epoch: int, result: Any) -> None:
            if inner is not None:
                inner(epoch, result)
            emit("epoch_end", epoch=epoch)

        kwargs["on_epoch_end"] = on_epoch_end
        return real_fit(learner, **kwargs)

    retain.state.write_file = write_file
    os.rename = rename
    retain.updaters.base.fit = fit
    _HOOKS["installed"] = True


def run_job(job: dict[str, Any], emit: Callable[..., None]) -> None:
    """Runs one update, reporting phase markers through ``emit``."""
    job = {**JOB_DEFAULTS, **job}
    _HOOKS.update(job=job, emit=emit)
    _install_hooks()
    emit("build")
    updater = build_updater(job)
    data = synthetic_data(job["data_seed"], job["items"])
    emit("train")
    updater.update(data, task_id=job["task_id"])
    fit_result = updater.last_fit
    emit("done", resumed_from_epoch=updater.resumed_from_epoch, epochs=fit_result.epochs, steps=fit_result.steps)


# ------------------------------------------------------------------------------ the server process
def serve() -> None:
    import torch

    torch.set_num_threads(1)
    import torch._dynamo  # imported lazily by the first optimizer: ~2-5 s in every child otherwise

    import retain.methods  # noqa: F401

    out = sys.stdout.fileno()

    def send(event: str, **fields: Any) -> None:
        os.write(out, (json.dumps({"event": event, "t": time.time(), **fields}) + "\n").encode())

    send("ready")
    child: int | None = None
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "run":
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                    run_job(cmd["job"], send)
                    code = 0
                except BaseException as err:
                    send("error", message=f"{type(err).__name__}: {err}")
                    traceback.print_exc()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
            child = pid
            send("started", pid=pid)
        elif cmd["op"] in ("kill", "wait") and child is not None:
            if cmd["op"] == "kill":
                os.kill(child, signal.SIGKILL)  # not reaped yet: the pid cannot have been reused
            _, status = os.waitpid(child, 0)
            child = None
            send("exited", code=os.waitstatus_to_exitcode(status))
        elif cmd["op"] == "quit":
            break


class JobRun:
    """One job in a forked child: its phase markers, and a way to kill or await it."""

    def __init__(self, server: ForkServer, job: dict[str, Any]) -> None:
        self.server = server
        self.job = job
        self.events: list[dict[str, Any]] = []
        self.finished = False
        self.exit_code: int | None = None
        server.send({"op": "run", "job": job})
        started = None
        while started is None:  # the child's first markers may come before the server's reply
            event = server.next_event(timeout=60)
            if event["event"] == "started":
                started = event
            else:
                self._record(event)
        self.pid = started["pid"]
        self.started_at = started["t"]

    def _record(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if event["event"] in ("done", "error"):
            self.finished = True

    def _take(self, timeout: float) -> dict[str, Any] | None:
        try:
            event = self.server.next_event(timeout)
        except queue.Empty:
            return None
        self._record(event)
        return event

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0) -> dict[str, Any] | None:
        """The first marker satisfying ``predicate``; None when the child finished (or timed out) first."""
        for event in self.events:
            if predicate(event):
                return event
        deadline = time.monotonic() + timeout
        while not self.finished and time.monotonic() < deadline:
            event = self._take(max(0.0, deadline - time.monotonic()))
            if event is not None and predicate(event):
                return event
        return None

    def _reap(self, op: str, timeout: float) -> int:
        self.server.send({"op": op})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = self._take(max(0.0, deadline - time.monotonic()))
            if event is not None and event["event"] == "exited":
                self.exit_code = int(event["code"])
                return self.exit_code
        raise TimeoutError(f"job {self.job} did not exit; server stderr:\n{self.server.stderr_tail()}")

    def kill(self) -> int:
        """SIGKILLs the child now (a no-op if it already finished) and reaps it."""
        return self._reap("kill", timeout=60)

    def wait(self, timeout: float = 120.0) -> int:
        """Waits for the child to finish; kills it after ``timeout`` seconds."""
        self.wait_for(lambda e: False, timeout)
        return self._reap("wait" if self.finished else "kill", timeout=60)

    def last_marker(self) -> dict[str, Any] | None:
        markers = [e for e in self.events if e["event"] not in ("exited", "started")]
        return markers[-1] if markers else None

    def markers(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]


class ForkServer:
    """The test side of the fork server (one per test session, started on first use)."""

    def __init__(self) -> None:
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server)
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            cwd=REPO_ROOT,
        )
        self.queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.next_event(SERVER_START_TIMEOUT)
        assert ready["event"] == "ready", ready

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.queue.put(json.loads(line))

    def next_event(self, timeout: float) -> dict[str, Any]:
        if self.proc.poll() is not None and self.queue.empty():
            raise RuntimeError(f"the fork server died; stderr:\n{self.stderr_tail()}")
        return self.queue.get(timeout=timeout)

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def run(self, **job: Any) -> JobRun:
        with self.lock:
            return JobRun(self, job)

    def stderr_tail(self, chars: int = 4000) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-chars:]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"op": "quit"})
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


_SERVER: ForkServer | None = None


def fork_server() -> ForkServer:
    """The session's fork server (started on first use, stopped at exit)."""
    global _SERVER
    if _SERVER is None or _SERVER.proc.poll() is not None:
        _SERVER = ForkServer()
        atexit.register(_SERVER.close)
    return _SERVER


def run_fresh_process(job: dict[str, Any], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Starts ``job`` in a brand-new interpreter (not forked); its markers go to its stdout."""
    return subprocess.Popen(
        [sys.executable, str(HERE), "job", json.dumps(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
    )


# ------------------------------------------------------------------------------ folder helpers
def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` by relative path ({} when it does not exist)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def siblings(folder: Path) -> list[str]:
    """Names in ``folder``'s parent that belong to it (the folder, its lock, temporaries, resume)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name == folder.name or f".{folder.name}." in p.name)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    elif sys.argv[1] == "job":

        def _print(event: str, **fields: Any) -> None:
            print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)

        import torch

        torch.set_num_threads(1)
        spec = json.loads(sys.argv[2])
        for one in spec.get("jobs", [spec]):
            run_job(one, _print)
