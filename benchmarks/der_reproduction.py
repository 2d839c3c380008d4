"""Reproduce the MNIST tables of the DER paper (Buzzega et al., NeurIPS 2020) with retain.

Every row runs through ``retain.benchmark.run_benchmark`` (the path of ``retain benchmark``: one
updater per task built from the previous state folder, report written under the row's folder)
with the hyperparameters Mammoth publishes (``utils/best_args.py`` of the Mammoth repository, the
DER authors' code), and is compared with the average accuracy the papers publish (the DER paper's
Table 2; CLS-ER's paper for CLS-ER), both copied into the tables of ``benchmarks/results_der.md``.

    .venv/bin/python benchmarks/der_reproduction.py --data-dir ../shared/data \
        --protocol all --seeds 0 1 2 --out runs/der_repro

prints and writes ``<out>/table_<protocol>.md``: method, memory, settings, our mean ± std over the
seeds, the paper's number, the difference, wall/CPU time, and the equivalent ``retain benchmark``
command of every row. ``--methods`` / ``--memories`` select rows; ``--resume`` reuses rows whose
folder already holds a finished run of the same configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import retain.benchmark as benchmark_module
from retain.benchmark import BenchmarkConfig, run_benchmark
from retain.models import MultiLayerPerceptron


@dataclass(frozen=True)
class Protocol:
    """A benchmark of the paper: scenario, number of tasks and new-data batch size."""

    name: str
    title: str
    scenario: str
    num_tasks: int
    batch_size: int


@dataclass(frozen=True)
class Row:
    """One table row: a retain method with the published settings and the published result."""

    label: str
    method: str
    memory: int | None
    learning_rate: float
    options: dict[str, Any] = field(default_factory=dict)
    paper: float | None = None
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.method}" if self.memory is None else f"{self.method}_m{self.memory}"


PROTOCOLS = {
    "seq-mnist": Protocol("seq-mnist", "Seq-MNIST, class-incremental (5 tasks, no task id at test)",
                          "class-incremental", 5, 10),
    "perm-mnist": Protocol("perm-mnist", "Perm-MNIST, domain-incremental (20 permutations)", "permuted", 20, 128),
}

SUM = {"loss_normalization": 0}  # the paper sums the loss terms (DER/DER++), as Mammoth does


def _cls(new: int, mem: int, reg: float, sf: float, s_alpha: float, pf: float, p_alpha: float) -> dict[str, Any]:
    """CLS-ER's published setting: CE over the joined new + memory batch = ``n/(n+m) CE(new) +
    m/(n+m) CE(memory)`` with the terms summed, plus ``reg_weight`` times the consistency term."""
    return {**SUM, "memory_batch_size": mem, "loss_weight": new / (new + mem), "alpha": mem / (new + mem),
            "beta": reg, "stable_model_update_probability": sf, "stable_model_update_weight": s_alpha,
            "plastic_model_update_probability": pf, "plastic_model_update_weight": p_alpha}


def _super(mem: int, der_alpha: float, der_beta: float, sf: float, s_alpha: float, pf: float,
           p_alpha: float) -> dict[str, Any]:
    """Super-ER: DER++'s published setting, cls_alpha 0.1, pod_alpha 1.0, terms summed; the EMA
    copies use CLS-ER's published MNIST update probabilities and decays."""
    return {**SUM, "memory_batch_size": mem, "der_alpha": der_alpha, "der_beta": der_beta, "cls_alpha": 0.1,
            "pod_alpha": 1.0, "cls_stable_model_update_probability": sf, "cls_stable_model_update_weight": s_alpha,
            "cls_plastic_model_update_probability": pf, "cls_plastic_model_update_weight": p_alpha}


def seq_mnist_rows() -> list[Row]:
    """Seq-MNIST rows: Mammoth's best_args (seq-mnist) and the published class-IL accuracies."""
    er = {"memory_batch_size": 10, "alpha": 1.0, "loss_normalization": 1}  # mean over the joined 10 + 10 batch
    return [
        Row("SGD (fine-tune)", "finetune", None, 0.03, paper=19.60),
        Row("Joint", "joint", None, 0.03, paper=95.57,
            note="retrains from scratch on all data seen, 1 epoch; lr 0.03 is our choice (no published setting)"),
        Row("ER", "er", 200, 0.01, er, paper=80.43),
        Row("ER", "er", 500, 0.1, er, paper=86.12),
        Row("DER", "der", 200, 0.03, {**SUM, "memory_batch_size": 10, "alpha": 0.2, "beta": 0.0}, paper=84.55),
        Row("DER", "der", 500, 0.03, {**SUM, "memory_batch_size": 128, "alpha": 1.0, "beta": 0.0}, paper=90.54),
        Row("DER++", "derpp", 200, 0.03, {**SUM, "memory_batch_size": 128, "alpha": 0.2, "beta": 1.0},
            paper=85.61),
        Row("DER++", "derpp", 500, 0.03, {**SUM, "memory_batch_size": 10, "alpha": 1.0, "beta": 0.5}, paper=91.00),
        Row("CLS-ER", "cls", 200, 0.03, _cls(10, 128, 2.0, 0.9, 0.99, 1.0, 0.99), paper=89.54,
            note="paper = CLS-ER's published result"),
        Row("CLS-ER", "cls", 500, 0.1, _cls(10, 32, 2.0, 0.9, 0.99, 1.0, 0.99), paper=92.05,
            note="paper = CLS-ER's published result"),
        Row("POD-ER", "pod", 200, 0.01, {**SUM, "memory_batch_size": 10, "alpha": 1.0},
            note="ER's lr and memory batch, pod alpha 1.0; no CE on memory items"),
        Row("POD-ER", "pod", 500, 0.1, {**SUM, "memory_batch_size": 10, "alpha": 1.0},
            note="ER's lr and memory batch, pod alpha 1.0; no CE on memory items"),
        Row("Super-ER", "super", 200, 0.03, _super(128, 0.2, 1.0, 0.9, 0.99, 1.0, 0.99),
            note="DER++'s setting + cls_alpha 0.1 + pod_alpha 1.0"),
        Row("Super-ER", "super", 500, 0.03, _super(10, 1.0, 0.5, 0.9, 0.99, 1.0, 0.99),
            note="DER++'s setting + cls_alpha 0.1 + pod_alpha 1.0"),
    ]


def perm_mnist_rows() -> list[Row]:
    """Perm-MNIST rows: Mammoth's best_args (perm-mnist) and the published domain-IL accuracies."""
    er = {"memory_batch_size": 128, "alpha": 1.0, "loss_normalization": 1}  # mean over the joined 128 + 128 batch
    return [
        Row("SGD (fine-tune)", "finetune", None, 0.2, paper=40.70),
        Row("Joint", "joint", None, 0.2, paper=94.33,
            note="at each update retrains from scratch on all data seen so far (1 epoch, lr 0.2, batch 128)"),
        Row("ER", "er", 200, 0.2, er, paper=72.37),
        Row("ER", "er", 500, 0.2, er, paper=80.60),
        Row("DER", "der", 200, 0.2, {**SUM, "memory_batch_size": 128, "alpha": 1.0, "beta": 0.0}, paper=81.74),
        Row("DER", "der", 500, 0.2, {**SUM, "memory_batch_size": 128, "alpha": 1.0, "beta": 0.0}, paper=87.29),
        Row("DER++", "derpp", 200, 0.1, {**SUM, "memory_batch_size": 128, "alpha": 1.0, "beta": 1.0},
            paper=83.58),
        Row("DER++", "derpp", 500, 0.2, {**SUM, "memory_batch_size": 128, "alpha": 1.0, "beta": 0.5},
            paper=88.21),
        Row("CLS-ER", "cls", 200, 0.2, _cls(128, 128, 1.0, 0.8, 0.99, 1.0, 0.99),
            note="CLS-ER's published perm-mnist setting; no published number in our references"),
        Row("CLS-ER", "cls", 500, 0.2, _cls(128, 128, 1.0, 0.8, 0.99, 1.0, 0.99),
            note="CLS-ER's published perm-mnist setting; no published number in our references"),
        Row("POD-ER", "pod", 200, 0.2, {**SUM, "memory_batch_size": 128, "alpha": 1.0},
            note="ER's lr and memory batch, pod alpha 1.0; no CE on memory items"),
        Row("POD-ER", "pod", 500, 0.2, {**SUM, "memory_batch_size": 128, "alpha": 1.0},
            note="ER's lr and memory batch, pod alpha 1.0; no CE on memory items"),
        Row("Super-ER", "super", 200, 0.1, _super(128, 1.0, 1.0, 0.8, 0.99, 1.0, 0.99),
            note="DER++'s setting + cls_alpha 0.1 + pod_alpha 1.0"),
        Row("Super-ER", "super", 500, 0.2, _super(128, 1.0, 0.5, 0.8, 0.99, 1.0, 0.99),
            note="DER++'s setting + cls_alpha 0.1 + pod_alpha 1.0"),
    ]


ROWS = {"seq-mnist": seq_mnist_rows, "perm-mnist": perm_mnist_rows}
EXTRA_METHODS = ("cls", "pod", "super")  # not in the DER paper


def use_torch_init() -> None:
    """Ablation only: makes ``run_benchmark`` build its MLPs with PyTorch's default ``nn.Linear``
    initialisation (``init='torch'``, retain's default before it adopted the DER paper's Xavier
    initialisation) instead of the default ``init='xavier'``."""

    def build(config: BenchmarkConfig, input_shape: tuple[int, ...], num_classes: int) -> Any:
        return MultiLayerPerceptron(math.prod(input_shape), num_classes, list(config.hidden_sizes), init="torch")

    benchmark_module.benchmark_model = build


def make_config(protocol: Protocol, row: Row, data_dir: str | None, seeds: Sequence[int], out: Path,
                threads: int = 1) -> BenchmarkConfig:
    """The ``BenchmarkConfig`` of one row (MLP 784-100-100-10, SGD without momentum, 1 epoch)."""
    method_options = dict(row.options)
    if row.memory is not None:
        method_options["memory_size"] = row.memory
    return BenchmarkConfig(
        method=row.method, dataset="mnist", scenario=protocol.scenario, num_tasks=protocol.num_tasks,
        data_dir=data_dir, model="mlp", hidden_sizes=(100, 100), optimizer="sgd",
        learning_rate=row.learning_rate, momentum=0.0, weight_decay=0.0, seeds=tuple(seeds),
        output=str(out / protocol.name / row.key), threads=threads, method_options=method_options,
        training_options={"batch_size": protocol.batch_size, "max_epochs": 1, "progress_bar": False},
    )


def _value(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)  # repr: the shortest text that reads back exactly


def cli_command(config: BenchmarkConfig) -> str:
    """The ``retain benchmark`` command line that runs ``config`` by hand (same numbers: the thread
    count is part of it, as it changes the float rounding)."""
    args = ["retain", "benchmark", "--method", config.method, "--dataset", config.dataset,
            "--scenario", config.scenario, "--num-tasks", str(config.num_tasks)]
    if config.data_dir:
        args += ["--data-dir", config.data_dir]
    args += ["--hidden-sizes", *map(str, config.hidden_sizes), "--optimizer", config.optimizer,
             "--learning-rate", _value(config.learning_rate)]
    for name in ("batch_size", "max_epochs"):
        args += ["--" + name.replace("_", "-"), str(config.training_options[name])]
    for name, value in config.method_options.items():
        args += ["--" + name.replace("_", "-"), _value(value)]
    if config.threads is not None:
        args += ["--threads", str(config.threads)]
    args += ["--seed", *map(str, config.seeds), "--output", config.output]
    if not config.training_options.get("progress_bar", True):
        args.append("--no-progress")
    return shlex.join(args)


def settings_text(row: Row) -> str:
    """A compact description of the row's hyperparameters for the table."""
    o = row.options
    parts = [f"lr {row.learning_rate:g}"]
    if "memory_batch_size" in o:
        parts.append(f"mb {o['memory_batch_size']}")
    if row.method == "cls":
        parts += [f"reg {o['beta']:g}", f"sf {o['stable_model_update_probability']:g}",
                  f"pf {o['plastic_model_update_probability']:g}", f"ema {o['stable_model_update_weight']:g}",
                  "CE on joined batch"]
        return ", ".join(parts)
    names = {"alpha": "alpha", "beta": "beta", "der_alpha": "alpha", "der_beta": "beta", "cls_alpha": "cls",
             "pod_alpha": "pod"}
    for name, short in names.items():
        if name in o:
            parts.append(f"{short} {o[name]:g}")
    if "loss_normalization" in o:
        parts.append("mean" if o["loss_normalization"] else "sum")
    return ", ".join(parts)


def _same(a: Any, b: Any) -> bool:
    return json.loads(json.dumps(a, default=str)) == json.loads(json.dumps(b, default=str))


def run_row(protocol: Protocol, row: Row, config: BenchmarkConfig, resume: bool,
            init: str = "xavier") -> dict[str, Any]:
    """Runs one row (or reuses a finished identical run with ``resume``) and returns its summary."""
    summary_path = Path(config.output) / "der_row.json"
    command = cli_command(config)
    if init != "xavier":
        command = f"# {init} init (ablation, not reproducible by the CLI): " + command
    if resume and summary_path.is_file():
        previous = json.loads(summary_path.read_text())
        if _same(previous.get("config"), config.describe()) and previous.get("init") == init:
            previous.update(command=command, settings=settings_text(row), note=row.note)
            print(f"[{protocol.name}] {row.label} m{row.memory}: reusing {summary_path}", flush=True)
            return previous
    print(f"\n[{protocol.name}] {row.label} memory {row.memory or '-'}: {command}", flush=True)
    wall, cpu = time.perf_counter(), time.process_time()
    result = run_benchmark(config, log=lambda msg: None)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if "runs" in result:
        per_seed = [r["average_accuracy"] for r in result["runs"]]
        mean, std = result["mean"]["average_accuracy"], result["std"]["average_accuracy"]
    else:
        per_seed = [result["average_accuracy"]]
        mean, std = per_seed[0], 0.0
    summary = {
        "config": config.describe(), "init": init, "command": command, "label": row.label, "memory": row.memory,
        "settings": settings_text(row), "note": row.note, "paper": row.paper,
        "seeds": list(config.seeds), "per_seed": [100 * a for a in per_seed], "mean": 100 * mean, "std": 100 * std,
        "wall_seconds": wall, "cpu_seconds": cpu,
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[{protocol.name}] {row.label} memory {row.memory or '-'}: {100 * mean:.2f} ± {100 * std:.2f} "
          f"(seeds {', '.join(f'{100 * a:.2f}' for a in per_seed)}; paper {row.paper}) "
          f"in {wall:.0f}s wall, {cpu:.0f}s CPU", flush=True)
    return summary


def format_markdown(protocol: Protocol, summaries: Sequence[dict[str, Any]]) -> str:
    """The results table of one protocol and the command of every row."""
    lines = [f"### {protocol.title}", "",
             "| method | memory | settings | ours (mean ± std) | seeds | paper | ours - paper | wall s | CPU s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        paper = "-" if s["paper"] is None else f"{s['paper']:.2f}"
        diff = "-" if s["paper"] is None else f"{s['mean'] - s['paper']:+.2f}"
        ours = f"{s['mean']:.2f} ± {s['std']:.2f}" if len(s["seeds"]) > 1 else f"{s['mean']:.2f}"
        lines.append(f"| {s['label']} | {s['memory'] or '-'} | {s['settings']} | {ours} | "
                     f"{len(s['seeds'])} | {paper} | {diff} | {s['wall_seconds']:.0f} | {s['cpu_seconds']:.0f} |")
    total_wall = sum(s["wall_seconds"] for s in summaries)
    total_cpu = sum(s["cpu_seconds"] for s in summaries)
    inits = sorted({str(s.get("init")) for s in summaries})
    threads = sorted({str(s["config"].get("threads")) for s in summaries})
    lines += ["", f"Total: {total_wall:.0f}s wall, {total_cpu:.0f}s CPU (torch threads: {', '.join(threads)}; "
              f"MLP initialisation: {', '.join(inits)}).",
              "", "Notes:", ""]
    lines += [f"- {s['label']} {s['memory'] or ''}: {s['note']}".replace("  ", " ") for s in summaries if s["note"]]
    lines += ["", "Commands (each row by hand):", "", "```"]
    lines += [s["command"] for s in summaries]
    lines += ["```", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder holding mnist/ (default: retain's default)")
    p.add_argument("--protocol", choices=[*PROTOCOLS, "all"], default="all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/der_repro", help="output folder (reports, tables)")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods (e.g. er der derpp)")
    p.add_argument("--memories", type=int, nargs="+", default=None, help="only these memory sizes (memory-free "
                   "rows are kept)")
    p.add_argument("--joint-seeds", type=int, nargs="+", default=None, help="seeds of the joint rows (default: "
                   "--seeds; joint on Perm-MNIST retrains on everything at every update)")
    p.add_argument("--extra-seeds", type=int, nargs="+", default=None, help="seeds of the rows the DER paper does "
                   "not have (CLS-ER, POD-ER, Super-ER; default: --seeds)")
    p.add_argument("--torch-init", action="store_true", help="ablation: PyTorch's default initialisation of the "
                   "MLP instead of retain's (Xavier, as Mammoth's MNISTMLP); the printed commands then do not "
                   "reproduce the rows")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, fastest for this MLP)")
    p.add_argument("--resume", action="store_true", help="reuse rows already finished with the same configuration")
    args = p.parse_args(argv)
    if args.torch_init:
        use_torch_init()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(PROTOCOLS) if args.protocol == "all" else [args.protocol]
    started = time.perf_counter()
    for name in names:
        protocol = PROTOCOLS[name]
        rows = [r for r in ROWS[name]()
                if (args.methods is None or r.method in args.methods)
                and (args.memories is None or r.memory is None or r.memory in args.memories)]
        summaries = []
        for row in rows:
            seeds = args.seeds
            if row.method == "joint" and args.joint_seeds:
                seeds = args.joint_seeds
            if row.method in EXTRA_METHODS and args.extra_seeds:
                seeds = args.extra_seeds
            config = make_config(protocol, row, args.data_dir, seeds, out, args.threads)
            summaries.append(run_row(protocol, row, config, args.resume, "torch" if args.torch_init else "xavier"))
            (out / f"table_{name}.md").write_text(format_markdown(protocol, summaries))
        print("\n" + format_markdown(protocol, summaries), flush=True)
        print(f"table written to {out / f'table_{name}.md'}", flush=True)
    print(f"total wall time {time.perf_counter() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
