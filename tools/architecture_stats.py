"""Figures of the code's shape, for the architecture issue's before/after table.

    PYTHONPATH=src python tools/architecture_stats.py [--src src]

Prints, for the package under ``--src`` (so it can be pointed at an older checkout):

- the longest functions (lines from ``def`` to the last line, docstring included);
- the code a reader follows for DER++ end to end: every function of the package that runs while a
  ``DarkExperienceReplayModelUpdater`` is built and its ``update()`` trains one small chunk and
  writes its state folder (found by tracing calls, not by a hand-made list), with their lines and
  files; and the subset that runs inside one training step (``training_step``, ``on_train_batch_end``
  and what they call);
- for every option of every ER-family method, the number of places it is written as a parameter
  (``def f(..., option=...)``) in ``retain/methods``: 1 means the option is defined once and flows by
  name to its component (the components' own parameters, e.g. a loss's ``weight``, are not counted).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
import tempfile
from collections import Counter
from pathlib import Path

ER_LEARNERS = [
    "ExperienceReplayLearner",
    "DarkExperienceReplayLearner",
    "PooledOutputDistillationExperienceReplayLearner",
    "CLSExperienceReplayLearner",
    "SuperExperienceReplayLearner",
]

BASE_OPTIONS = ("loss_weight", "ema_memory_update_gamma", "loss_normalization")  # BaseExperienceReplayLearner's
STEP_HOOKS = ("training_step", "on_train_batch_end")  # one step: the loss, then the memory write and EMA


def function_lengths(package: Path) -> list[tuple[int, str]]:
    out = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rel = path.relative_to(package.parent)
                out.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


def parameter_counts(module: Path, owner: str, names: set[str]) -> Counter:
    """How many functions defined in class ``owner`` of ``module`` take each of ``names`` as a parameter."""
    counts: Counter = Counter()
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == owner:
            for item in ast.walk(node):
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    args = item.args
                    for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
                        if arg.arg in names:
                            counts[arg.arg] += 1
    return counts


def traced_der_update(package: Path) -> tuple[set, set]:
    """(code objects of the package run by a DER++ update, those run inside training_step)."""
    import functools

    import torch

    from retain.methods import DarkExperienceReplayModelUpdater
    from retain.models import MultiLayerPerceptron

    torch.manual_seed(0)
    x, y = torch.rand(64, 8), torch.randint(0, 4, (64,))
    dataset = torch.utils.data.TensorDataset(x, y)
    root = str(package.resolve())
    seen: set = set()
    in_step: set = set()
    depth = [0]

    def profile(frame, event, arg):
        code = frame.f_code
        if not code.co_filename.startswith(root):
            return
        if event == "call":
            seen.add(code)
            if code.co_name in STEP_HOOKS:
                depth[0] += 1
            if depth[0]:
                in_step.add(code)
        elif event == "return" and code.co_name in STEP_HOOKS:
            depth[0] -= 1

    with tempfile.TemporaryDirectory() as tmp:
        sys.setprofile(profile)
        try:
            model = MultiLayerPerceptron(num_inputs=8, num_outputs=4, hidden_sizes=[16])
            updater = DarkExperienceReplayModelUpdater(
                model,
                optimizer=functools.partial(torch.optim.SGD, lr=0.1),
                memory_size=32,
                batch_size=8,
                max_epochs=1,
                output_state_folder=f"{tmp}/state",
            )
            updater.update(dataset, task_id="t0")
        finally:
            sys.setprofile(None)
    return seen, in_step


def code_lines(codes: set) -> tuple[int, set[str]]:
    """Total source lines of the functions behind ``codes`` (each counted once), and their files."""
    lines, files = 0, set()
    for code in codes:
        try:
            source, _ = inspect.getsourcelines(code)
        except (OSError, TypeError):
            continue
        if code.co_name in ("<module>", "<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>", "<lambda>"):
            continue  # module bodies (imports) and comprehensions inside functions already counted
        lines += len(source)
        files.add(code.co_filename)
    return lines, files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src"))
    parser.add_argument("--list", action="store_true", help="list the functions of one training step")
    args = parser.parse_args()
    package = Path(args.src) / "retain"
    sys.path.insert(0, args.src)

    print("longest functions:")
    for length, where in function_lengths(package)[:5]:
        print(f"  {length:4d}  {where}")

    seen, in_step = traced_der_update(package)
    lines, files = code_lines(seen)
    step_lines, step_files = code_lines(in_step)
    print(f"DER++ update end to end: {len({c for c in seen})} functions, {lines} lines in {len(files)} files")
    print(f"  of which one training step: {len(in_step)} functions, {step_lines} lines in {len(step_files)} files")

    if args.list:
        for code in sorted(in_step, key=lambda c: (c.co_filename, c.co_firstlineno)):
            where = Path(code.co_filename).relative_to(package.parent)
            print(f"    {where}:{code.co_firstlineno} {code.co_qualname}")
    import retain.methods.er as er

    module = package / "methods" / "er.py"
    classes = {n.name: n for n in ast.parse(module.read_text()).body if isinstance(n, ast.ClassDef)}
    print("lines of each ER-family method's definition (its learner class + its updater class):")
    for name in ER_LEARNERS:
        updater = classes.get(name.replace("Learner", "ModelUpdater"))
        parts = [classes[name], *([updater] if updater else [])]
        print(f"  {name}: {sum(c.end_lineno - c.lineno + 1 for c in parts)}")
    step = [f for f in classes["BaseExperienceReplayLearner"].body if isinstance(f, ast.FunctionDef)]
    shared = sum(f.end_lineno - f.lineno + 1 for f in step if f.name in STEP_HOOKS)
    print(f"  the shared replay step (BaseExperienceReplayLearner.{' + '.join(STEP_HOOKS)}): {shared}")
    print("places each ER-family option is written as a parameter (its learner's and its updater's code):")
    for name in ER_LEARNERS:
        learner = getattr(er, name)
        skip = ("self", "kwargs", "components", *BASE_OPTIONS)
        own = [p for p in inspect.signature(learner.__init__).parameters if p not in skip]
        counts = parameter_counts(module, name, set(own)) + parameter_counts(
            module, name.replace("Learner", "ModelUpdater"), set(own)
        )
        by_count: dict[int, list[str]] = {}
        for option in own:
            by_count.setdefault(counts[option], []).append(option)
        print(f"  {name}: " + "; ".join(f"{c}x {', '.join(o)}" for c, o in sorted(by_count.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
