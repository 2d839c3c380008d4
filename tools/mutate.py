"""A small mutation tester for retain: one single-node mutation of a module at a time, then its tests.

Each mutant is a copy of ``src/`` (in a temporary folder, never the worktree's ``src/``) where one
AST node of one module is changed: a comparison flipped (``<`` -> ``>=``, ``==`` -> ``!=``, ``<`` ->
``<=``, ``in`` -> ``not in``, ``is`` -> ``is not``), ``+`` <-> ``-``, ``*`` <-> ``/``, ``and`` <->
``or``, ``not x`` -> ``x``, ``True`` <-> ``False``, a number changed (``n`` -> ``n + 1``, ``x`` ->
``2 * x``), ``return x`` -> ``return None``, a call statement dropped (``os.fsync(fd)``,
``model.eval()``, ...), an assignment or augmented assignment dropped, two keyword (or positional)
arguments of a call swapped, a keyword argument dropped. The mutant's tests then run in a fresh interpreter
(``pytest -x``) with a timeout; a failing run kills the mutant, a passing run lets it survive, a run past the
timeout counts as killed (``timeout``).

Which tests: by default the module's test files (``TEST_MAP``; ``--tests`` to name others). With a coverage map
(``--coverage-map``), the tests anywhere in the suite that executed a line of the mutated node in one
coverage run of the non-slow suite, test files in order of their selected tests' seconds (fastest first): a
score "killed by the suite", in less time than whole files. Code that runs at import time (module and class
bodies, decorators) and lines no test executed in-process (code that only runs in a CLI, torchrun or spawn
subprocess, which records nothing in the map) fall back to the test files. ``mutation.json`` and
``mutation.md`` record each mutant's selection (``coverage: N tests`` or ``test map (...)``). The map is built
by ``--build-coverage-map`` (needs the ``mutation`` extra: coverage, pytest-cov) at one commit; a map from
another commit than HEAD, or from an edited module, is refused unless ``--allow-stale-map``.

Usage (from the repository root; a full run is slow on 2 cores, so sample)::

    python tools/mutate.py --module retain/memory.py --max-mutants 40
    python tools/mutate.py --module retain/state.py --module retain/methods/er.py --max-mutants 30 \
        --report runs/mutation
    python tools/mutate.py --module retain/memory.py --list          # the mutants, nothing run
    python tools/mutate.py --build-coverage-map runs/covmap.json    # once per commit: the suite under coverage
    python tools/mutate.py --module retain/memory.py --max-mutants 8 --seed 190 --coverage-map runs/covmap.json
    python tools/mutate.py --module retain/memory.py --list --coverage-map runs/covmap.json  # + each selection

The report (``--report`` folder) gets ``mutation.json`` (every mutant: line, kind, original and
mutated code, outcome, seconds) and ``mutation.md`` (score per module, survivors). Survivors
judged equivalent (no observable behaviour changes) or accepted are listed with the reason in
``tools/mutants_accepted.json`` (key ``module:line:kind:mutated code``); they are reported apart and
do not count against the score.
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCEPTED_FILE = ROOT / "tools" / "mutants_accepted.json"

# The test files that exercise each module (the ones a developer would run after editing it).
TEST_MAP: dict[str, list[str]] = {
    "retain/memory.py": ["tests/core/test_core_memory.py", "tests/core/test_core_memory_join.py",
                         "tests/core/test_core_hot_path.py", "tests/memory/test_memory_sampler.py",
                         "tests/memory/test_memory_storage.py", "tests/memory/test_memory_state.py",
                         "tests/memory/test_memory_api.py", "tests/distributed/test_dist_memory.py"],
    "retain/state.py": ["tests/wiring/test_wiring_state.py", "tests/core/test_core_state_safety.py",
                        "tests/reliability/test_rel_corrupt.py", "tests/safety/test_safe_paths.py",
                        "tests/safety/test_bounded_loading.py", "tests/safety/test_cli_errors.py",
                        "tests/joint/test_joint_state_files.py", "tests/safety/test_state_format_checks.py",
                        "tests/core/test_core_state_io.py"],
    "retain/learners/base.py": ["tests/wiring/test_wiring_methods.py", "tests/wiring/test_wiring_losses.py",
                                "tests/wiring/test_wiring_loop.py",
                                "tests/wiring/test_wiring_baselines.py", "tests/core/test_core_validation.py",
                                "tests/er/test_er_learners.py", "tests/er/test_er_spec_semantics.py",
                                "tests/er/test_er_learner_base.py", "tests/er/test_er_replay_step.py",
                                "tests/safety/test_data_checks.py", "tests/core/test_validation_history.py"],
    "retain/learners/components.py": ["tests/wiring/test_wiring_methods.py", "tests/wiring/test_wiring_losses.py",
                                      "tests/er/test_er_components.py",
                                      "tests/er/test_er_cls.py", "tests/er/test_er_component_edges.py",
                                      "tests/er/test_er_replay_step.py"],
    "retain/methods/er.py": ["tests/wiring/test_wiring_methods.py", "tests/er/test_er_learners.py",
                             "tests/safety/test_bounded_loading.py",
                             "tests/er/test_er_updaters.py", "tests/er/test_er_cls.py",
                             "tests/er/test_er_spec_semantics.py",
                             "tests/er/test_er_replay_step.py", "tests/er/test_er_learner_base.py"],
    "retain/methods/baselines.py": ["tests/wiring/test_wiring_baselines.py", "tests/wiring/test_wiring_loop.py",
                                    "tests/core/test_core_validation.py",
                                    "tests/joint/test_joint_learner_checks.py", "tests/joint/test_joint_nested.py",
                                    "tests/joint/test_joint_verify_background.py",
                                    "tests/joint/test_joint_state_files.py", "tests/joint/test_joint_chunks.py"],
    "retain/methods/repeated_distill.py": ["tests/wiring/test_wiring_losses.py", "tests/wiring/test_wiring_loop.py",
                                           "tests/rd/test_rd_loss.py",
                                           "tests/rd/test_rd_extract.py", "tests/rd/test_rd_updater.py",
                                           "tests/rd/test_rd_wiring.py"],
    "retain/updaters/base.py": ["tests/wiring/test_wiring_state.py", "tests/wiring/test_wiring_fingerprint.py",
                                "tests/wiring/test_wiring_loop.py",
                                "tests/core/test_core_validation.py", "tests/core/test_core_state_safety.py",
                                "tests/er/test_er_cls.py", "tests/reliability/test_rel_resume.py",
                                "tests/distributed/test_dist_ddp.py"],
    "retain/updaters/loop.py": ["tests/wiring/test_wiring_loop.py", "tests/wiring/test_wiring_methods.py",
                                "tests/wiring/test_wiring_losses.py",
                                "tests/core/test_core_validation.py", "tests/speed/test_speed_hot_path.py",
                                "tests/er/test_er_learners.py", "tests/reliability/test_rel_resume.py",
                                "tests/er/test_er_spec_semantics.py",
                                "tests/wiring/test_wiring_loop_steps.py"],
    "retain/updaters/distributed.py": ["tests/distributed/test_dist_memory.py",
                                       "tests/workloads/test_workload_ddp_memory.py",
                                       "tests/distributed/test_dist_ddp.py", "tests/workloads/test_workload_ddp.py",
                                       "tests/distributed/test_dist_one_rank.py"],
    "retain/chunks.py": ["tests/joint/test_joint_chunks.py", "tests/joint/test_joint_state_files.py",
                         "tests/joint/test_joint_nested.py", "tests/wiring/test_wiring_baselines.py",
                         "tests/joint/test_joint_chunk_units.py"],
    "retain/checkpoint.py": ["tests/wiring/test_wiring_fingerprint.py", "tests/reliability/test_rel_resume.py"],
    "retain/cli.py": ["tests/wiring/test_wiring_cli.py", "tests/cli/test_cli_paths.py",
                      "tests/safety/test_cli_errors.py"],
}

_COMPARE_SWAPS: dict[type, list[type]] = {
    ast.Lt: [ast.GtE, ast.LtE],
    ast.LtE: [ast.Gt, ast.Lt],
    ast.Gt: [ast.LtE, ast.GtE],
    ast.GtE: [ast.Lt, ast.Gt],
    ast.Eq: [ast.NotEq],
    ast.NotEq: [ast.Eq],
    ast.Is: [ast.IsNot],
    ast.IsNot: [ast.Is],
    ast.In: [ast.NotIn],
    ast.NotIn: [ast.In],
}
_BINOP_SWAPS: dict[type, type] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult,
}


# Swapping the arguments of these fails at once with a TypeError: trivially killed, not counted.
_BUILTINS = {"isinstance", "issubclass", "getattr", "setattr", "hasattr", "min", "max", "range", "zip",
             "divmod", "round", "enumerate", "open", "print", "sorted"}


@dataclass
class Mutant:
    """One single-node change of one module."""

    module: str
    index: int  # position of the node in the module's ast.walk order
    kind: str
    line: int
    original: str
    mutated: str
    variant: int = 0  # which of the node's mutations of this kind
    outcome: str = ""  # killed / survived / timeout / accepted
    seconds: float = 0.0
    reason: str = field(default="")
    selection: str = ""  # which tests ran: "coverage: N tests" or "test map ..."

    @property
    def key(self) -> str:
        return f"{self.module}:{self.line}:{self.kind}:{self.mutated}"


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first))
    return ids


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """Nodes never mutated: annotations, docstrings, raise statements' messages, ``__all__``, logging."""
    skip: set[int] = set()

    def drop(sub: ast.AST | None) -> None:
        if sub is not None:
            skip.update(id(n) for n in ast.walk(sub))

    for node in ast.walk(tree):
        if isinstance(node, ast.arg | ast.AnnAssign):
            drop(node.annotation)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            drop(node.returns)
            for d in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
                drop(d)  # default values: the options tests pass explicit values
        if isinstance(node, ast.Raise):
            drop(node.exc)
        if isinstance(node, ast.JoinedStr):
            drop(node)
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            drop(node)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(
            node.func.value, ast.Name
        ) and node.func.value.id in ("logger", "warnings", "logging"):
            drop(node)
        if isinstance(node, ast.Assert):
            drop(node)  # asserts only guard internal invariants
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            drop(node)
    skip |= _docstring_nodes(tree)
    return skip


def _mutations(node: ast.AST, parent: ast.AST | None) -> Iterator[tuple[str, int, ast.AST | None]]:
    """(kind, variant, replacement node) for every mutation of ``node``; None deletes a statement."""
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        for v, op in enumerate(_COMPARE_SWAPS.get(type(node.ops[0]), [])):
            new = copy.deepcopy(node)
            new.ops = [op()]
            yield "compare", v, new
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAPS:
        new = copy.deepcopy(node)
        new.op = _BINOP_SWAPS[type(node.op)]()
        yield "binop", 0, new
    elif isinstance(node, ast.AugAssign) and type(node.op) in _BINOP_SWAPS:
        new = copy.deepcopy(node)
        new.op = _BINOP_SWAPS[type(node.op)]()
        yield "augop", 0, new
    elif isinstance(node, ast.BoolOp):
        new = copy.deepcopy(node)
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        yield "boolop", 0, new
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield "not", 0, copy.deepcopy(node.operand)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        yield "negate", 0, copy.deepcopy(node.operand)
    elif isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool):
            yield "bool", 0, ast.Constant(not value)
        elif isinstance(value, int):
            yield "number", 0, ast.Constant(value + 1)
        elif isinstance(value, float):
            yield "number", 0, ast.Constant(value * 2 if value else 1.0)
    elif isinstance(node, ast.Return) and node.value is not None and not (
        isinstance(node.value, ast.Constant) and node.value.value is None
    ):
        yield "return", 0, ast.Return(ast.Constant(None))
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        yield "drop_call", 0, None
    elif isinstance(node, ast.Assign | ast.AugAssign) and not isinstance(parent, ast.ClassDef):
        yield "drop_assign", 0, None
    if isinstance(node, ast.Call):
        if len(node.keywords) >= 2:
            v = 0
            for i in range(len(node.keywords)):
                for j in range(i + 1, len(node.keywords)):
                    a, b = node.keywords[i], node.keywords[j]
                    if a.arg is None or b.arg is None or ast.dump(a.value) == ast.dump(b.value):
                        continue
                    new = copy.deepcopy(node)
                    new.keywords[i].value, new.keywords[j].value = new.keywords[j].value, new.keywords[i].value
                    yield "swap_kwargs", v, new
                    v += 1
        for v, kw in enumerate(node.keywords):
            if kw.arg is not None:
                new = copy.deepcopy(node)
                del new.keywords[v]
                yield "drop_kwarg", v, new
        positional = [a for a in node.args if not isinstance(a, ast.Starred)]
        builtin = isinstance(node.func, ast.Name) and node.func.id in _BUILTINS
        if not builtin and len(positional) == len(node.args) and len(node.args) >= 2:
            v = 0
            for i in range(len(node.args) - 1):
                if ast.dump(node.args[i]) == ast.dump(node.args[i + 1]):
                    continue
                new = copy.deepcopy(node)
                new.args[i], new.args[i + 1] = new.args[i + 1], new.args[i]
                yield "swap_args", v, new
                v += 1


class _Replace(ast.NodeTransformer):
    """Replaces the node at ``index`` (ast.walk order of an identical tree) by ``replacement``."""

    def __init__(self, target: ast.AST, replacement: ast.AST | None) -> None:
        self.target, self.replacement = target, replacement

    def visit(self, node: ast.AST) -> ast.AST | None:
        if node is self.target:
            if self.replacement is None:
                return ast.Pass()
            return ast.copy_location(self.replacement, node)
        return self.generic_visit(node)


@functools.lru_cache(maxsize=4)
def _walked(source: str) -> tuple[list[ast.AST], dict[int, ast.AST]]:
    """The nodes of ``source`` in ``ast.walk`` order (what ``Mutant.index`` counts) and each node's parent,
    parsed once per module source for all of its mutants (the nodes stay alive with the cache entry)."""
    tree = ast.parse(source)
    return list(ast.walk(tree)), _parents(tree)


def _parents(tree: ast.AST) -> dict[int, ast.AST]:
    out = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            out[id(child)] = node
    return out


def _show(node: ast.AST | None) -> str:
    if node is None:
        return "pass"
    text = ast.unparse(node).strip().replace("\n", "; ")
    return text if len(text) <= 160 else text[:157] + "..."


def enumerate_mutants(module: str, src_root: Path) -> list[Mutant]:
    """Every mutant of ``module`` (path relative to ``src_root``), in source order."""
    source = (src_root / module).read_text()
    tree = ast.parse(source)
    skip = _skipped_nodes(tree)
    parents = _parents(tree)
    lines = source.splitlines()
    mutants = []
    baseline = ast.unparse(tree)
    for index, node in enumerate(ast.walk(tree)):
        if id(node) in skip or not hasattr(node, "lineno"):
            continue
        if "no mutate" in lines[node.lineno - 1]:
            continue
        for kind, variant, replacement in _mutations(node, parents.get(id(node))):
            mutated_tree = _apply(tree, index, replacement)
            if mutated_tree is None or ast.unparse(mutated_tree) == baseline:
                continue
            mutants.append(
                Mutant(module, index, kind, node.lineno, _show(node), _show(replacement), variant)
            )
    mutants.sort(key=lambda m: (m.line, m.index, m.kind, m.variant))
    return mutants


def _apply(tree: ast.AST, index: int, replacement: ast.AST | None) -> ast.AST | None:
    fresh = copy.deepcopy(tree)
    target = next(n for i, n in enumerate(ast.walk(fresh)) if i == index)
    new = _Replace(target, copy.deepcopy(replacement) if replacement is not None else None).visit(fresh)
    ast.fix_missing_locations(new)
    try:
        compile(new, "<mutant>", "exec")
    except SyntaxError:
        return None
    return new


def mutated_source(mutant: Mutant, src_root: Path) -> str:
    """The module's source with ``mutant`` applied (regenerated from the mutant's node index)."""
    tree = ast.parse((src_root / mutant.module).read_text())
    node = next(n for i, n in enumerate(ast.walk(tree)) if i == mutant.index)
    for kind, variant, replacement in _mutations(node, _parents(tree).get(id(node))):
        if kind == mutant.kind and variant == mutant.variant:
            new = _apply(tree, mutant.index, replacement)
            assert new is not None
            return ast.unparse(new) + "\n"
    raise LookupError(f"mutant {mutant.key} no longer applies")


def _test_env(src: Path, extra_path: Path | None = None) -> dict[str, str]:
    """The environment of every pytest the tool starts: ``src`` first on the path, one thread, fixed hashes."""
    path = str(src) if extra_path is None else os.pathsep.join([str(src), str(extra_path)])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
                PYTHONHASHSEED="0", RETAIN_TEST_DATA_DIR=os.environ.get("RETAIN_TEST_DATA_DIR",
                                                                       str(ROOT.parent / "shared" / "data")))


def run_tests(run_root: Path, tests: list[str], timeout: float) -> tuple[str, float]:
    """'passed', 'failed' or 'timeout' of ``pytest -x tests`` run in ``run_root`` (a copy of the
    repository's src/ and tests/) importing retain from its src/. ``tests`` are files or node ids;
    node ids go through an argument file (``pytest @file``), so hundreds of them fit."""
    env = _test_env(run_root / "src")
    selected = list(tests)
    if any("::" in t for t in tests):
        args_file = run_root / ".mutate-tests.txt"
        args_file.write_text("".join(f"{t}\n" for t in tests))
        selected = [f"@{args_file}"]
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           "--timeout", str(int(timeout)), *selected]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=run_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if proc.returncode == 0:
        return "passed", seconds
    if proc.returncode == 5:  # no tests collected: a mapping error, not a kill
        raise RuntimeError(f"no tests collected from {tests}")
    if proc.returncode == 4 and b"ERROR: not found:" in proc.stdout:  # a stale test id, not a kill
        missing = [ln for ln in proc.stdout.decode(errors="replace").splitlines() if "not found:" in ln]
        raise RuntimeError(f"pytest did not find {missing[0].split('not found:')[-1].strip()}: rebuild the map")
    return "failed", seconds


# --- Coverage-based test selection -------------------------------------------------------------------------------
# `--build-coverage-map` runs the non-slow suite once under coverage with one context per test and keeps, for each
# line of src/retain, the tests that executed it; `--coverage-map` then runs, for each mutant, only the tests that
# executed a line of the mutated node, from anywhere in the suite (the TEST_MAP files when there are none).

COVMAP_VERSION = 1
_RECORDER_ENV = "RETAIN_MUTATE_TEST_RECORD"  # set by the map build: where the plugin below writes its record


class StaleMapError(Exception):
    """The coverage map does not describe the source being mutated (another commit, or an edited module)."""


@dataclass
class Selection:
    """The tests one mutant runs and why those: from the coverage map or the module's TEST_MAP files."""

    tests: list[str]
    label: str  # "coverage: N tests", "test map (import-time code)", "test map (no test ran these lines)"
    expected_seconds: float | None = None  # the selected tests' files' seconds in the map build (None: test map)

    @property
    def from_coverage(self) -> bool:
        return self.expected_seconds is not None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def git_head(root: Path = ROOT) -> str:
    """The commit checked out in ``root`` (what a coverage map must have been built at)."""
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"cannot read the git commit of {root}: {proc.stderr.strip()}")
    return proc.stdout.strip()


@dataclass
class CoverageMap:
    """For each line of each module under src/retain, the tests (node ids) that executed it in one run of the
    non-slow suite, each test's seconds, and the commit the map was built at.

    Stored as JSON: ``tests`` is ``[[node id, seconds], ...]`` in run order; each module has ``sha256`` (its
    source), ``lines`` (``{line: index into sets}``, ``sets`` being the distinct lists of test indices, so the
    lines of one block share one list) and ``import_only`` (lines run only at import time, outside any test).
    Tests that ran code in a subprocess (CLI, torchrun, spawn) did not record those lines there."""

    commit: str
    tests: list[str]
    seconds: list[float]
    sets: list[list[int]]
    lines: dict[str, dict[int, int]]
    import_only: dict[str, list[int]]
    sources: dict[str, str]
    build_seconds: float = 0.0
    failed: list[str] = field(default_factory=list)  # tests that failed in the build: never selected

    @classmethod
    def load(cls, path: Path) -> CoverageMap:
        """Read a map written by ``save`` (a one-line error for a file that is not one)."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"cannot read the coverage map {path}: {exc}") from None
        if not isinstance(raw, dict) or raw.get("version") != COVMAP_VERSION:
            raise SystemExit(f"{path} is not a version-{COVMAP_VERSION} coverage map of tools/mutate.py: rebuild it")
        modules = raw["modules"]
        return cls(
            commit=raw["commit"], tests=[t for t, _ in raw["tests"]], seconds=[s for _, s in raw["tests"]],
            sets=raw["sets"], lines={m: {int(k): v for k, v in d["lines"].items()} for m, d in modules.items()},
            import_only={m: d["import_only"] for m, d in modules.items()},
            sources={m: d["sha256"] for m, d in modules.items()}, build_seconds=raw.get("build_seconds", 0.0),
            failed=raw.get("failed", []),
        )

    def save(self, path: Path) -> None:
        modules = {m: {"sha256": self.sources[m], "import_only": self.import_only.get(m, []),
                       "lines": {str(k): v for k, v in sorted(self.lines.get(m, {}).items())}}
                   for m in sorted(self.sources)}
        data = {"version": COVMAP_VERSION, "commit": self.commit, "build_seconds": round(self.build_seconds, 1),
                "tests": [[t, round(s, 4)] for t, s in zip(self.tests, self.seconds, strict=True)],
                "failed": self.failed, "sets": self.sets, "modules": modules}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, separators=(",", ":")) + "\n")

    def check_current(self, head: str, src_root: Path, modules: Iterable[str], allow_stale: bool = False) -> None:
        """Raise ``StaleMapError`` unless the map was built at ``head`` and each of ``modules`` is the source
        it was built from (an uncommitted edit shifts its lines); ``allow_stale`` skips both checks."""
        if allow_stale:
            return
        if self.commit != head:
            raise StaleMapError(f"the coverage map was built at commit {self.commit[:12]}, the working tree is at "
                                f"{head[:12]}: rebuild it (--build-coverage-map) or pass --allow-stale-map")
        for module in modules:
            if module in self.sources and self.sources[module] != _sha256(src_root / module):
                raise StaleMapError(f"{module} changed since the coverage map was built: rebuild it "
                                    f"(--build-coverage-map) or pass --allow-stale-map")

    def tests_for(self, module: str, lines: Iterable[int]) -> list[str]:
        """The tests that executed any of ``lines`` of ``module``, fastest first: test files in order of the
        selected tests' total seconds, each file's tests in run order (so a file's module-scoped fixtures are set
        up once, not once per interleaved test)."""
        by_line = self.lines.get(module, {})
        chosen = sorted({i for line in lines if line in by_line for i in self.sets[by_line[line]]})
        files: dict[str, list[int]] = {}
        for i in chosen:
            files.setdefault(self.tests[i].split("::")[0], []).append(i)
        order = sorted(files, key=lambda f: (sum(self.seconds[i] for i in files[f]), f))
        return [self.tests[i] for f in order for i in files[f]]

    def expected_seconds(self, tests: Iterable[str]) -> float:
        """The seconds the files of ``tests`` took in the map build, all their tests: the bound a mutant's timeout
        is built on (a module-scoped fixture's cost may have been timed on a test that is not selected)."""
        files = {t.split("::")[0] for t in tests}
        return sum(s for t, s in zip(self.tests, self.seconds, strict=True) if t.split("::")[0] in files)


def mutant_lines(mutant: Mutant, src_root: Path) -> tuple[set[int], bool]:
    """The lines of the mutated node (``lineno..end_lineno``) plus the first line of its statement (tracers may
    report a multi-line statement on its first line only), and whether the node runs only at import time
    (outside any function or lambda body: module and class bodies, decorators, default values)."""
    nodes, parents = _walked((src_root / mutant.module).read_text())
    node = nodes[mutant.index]
    lines = set(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    import_time, child, up = True, node, parents.get(id(node))
    statement = node if isinstance(node, ast.stmt) else None
    while up is not None:
        if statement is None and isinstance(up, ast.stmt):
            statement = up
        if isinstance(up, ast.FunctionDef | ast.AsyncFunctionDef) and any(child is b for b in up.body):
            import_time = False
        if isinstance(up, ast.Lambda) and child is up.body:
            import_time = False
        child, up = up, parents.get(id(up))
    if statement is not None:
        lines.add(statement.lineno)
    return lines, import_time


def select_tests(mutant: Mutant, covmap: CoverageMap | None, src_root: Path,
                 test_map: dict[str, list[str]] | None = None) -> Selection:
    """The tests to run for ``mutant``: with a map, every test that executed a line of the mutated node; the
    module's TEST_MAP files without a map, for import-time code and for lines no test executed in-process."""
    fallback = list((TEST_MAP if test_map is None else test_map).get(mutant.module, []))
    if covmap is None:
        return Selection(fallback, "test map")
    lines, import_time = mutant_lines(mutant, src_root)
    if import_time:
        return Selection(fallback, "test map (import-time code)")
    tests = covmap.tests_for(mutant.module, lines)
    if not tests:
        return Selection(fallback, "test map (no test ran these lines)")
    return Selection(tests, f"coverage: {len(tests)} tests", covmap.expected_seconds(tests))


class TestRecorder:
    """pytest plugin of the map build (``-p mutate``): each test's seconds (setup + call + teardown) and outcome,
    written as JSON to ``$RETAIN_MUTATE_TEST_RECORD`` at the end of the session."""

    __test__ = False  # not a test class

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tests: dict[str, list] = {}  # node id -> [seconds, outcome], in run order

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self.tests.setdefault(report.nodeid, [0.0, "passed"])
        entry[0] += report.duration
        if report.failed:
            entry[1] = "failed"
        elif report.skipped and entry[1] == "passed":
            entry[1] = "skipped"

    def pytest_sessionfinish(self) -> None:
        self.path.write_text(json.dumps(self.tests))


def pytest_configure(config: pytest.Config) -> None:
    """Registers the recorder when the map build runs this module as a plugin (``-p mutate``)."""
    path = os.environ.get(_RECORDER_ENV)
    if path:
        config.pluginmanager.register(TestRecorder(Path(path)), "retain-mutate-recorder")


def map_from_coverage(data_file: Path, record: dict[str, list], src_root: Path, commit: str) -> CoverageMap:
    """A ``CoverageMap`` from a coverage data file with pytest-cov's test contexts (``node id|setup``, ``|run``,
    ``|teardown``; the empty context is import time) and the recorder's ``{node id: [seconds, outcome]}``.
    Only passed tests are kept: a failing or skipped one would kill, or could not kill, every mutant."""
    from coverage import CoverageData

    data = CoverageData(basename=str(data_file))
    data.read()
    tests = [t for t, (_, outcome) in record.items() if outcome == "passed"]
    index = {t: i for i, t in enumerate(tests)}
    sets: list[list[int]] = []
    set_index: dict[tuple[int, ...], int] = {}
    lines: dict[str, dict[int, int]] = {}
    import_only: dict[str, list[int]] = {}
    package = (src_root / "retain").resolve()
    sources = {p.relative_to(src_root).as_posix(): _sha256(p) for p in sorted(package.rglob("*.py"))}
    for filename in data.measured_files():
        path = Path(filename).resolve()
        if not path.is_relative_to(package):
            continue
        module = path.relative_to(src_root.resolve()).as_posix()
        for line, contexts in sorted(data.contexts_by_lineno(filename).items()):
            ids = tuple(sorted({index[c.rsplit("|", 1)[0]] for c in contexts if c and c.rsplit("|", 1)[0] in index}))
            if ids:
                if ids not in set_index:
                    set_index[ids] = len(sets)
                    sets.append(list(ids))
                lines.setdefault(module, {})[line] = set_index[ids]
            elif "" in contexts:
                import_only.setdefault(module, []).append(line)
    failed = [t for t, (_, outcome) in record.items() if outcome == "failed"]
    return CoverageMap(commit, tests, [record[t][0] for t in tests], sets, lines, import_only, sources,
                       failed=failed)


def build_coverage_map(out: Path, pytest_args: list[str] | None = None) -> CoverageMap:
    """Run the non-slow suite once (one thread) under coverage with per-test contexts and write the map to
    ``out``. The suite runs on the worktree's src/ and tests/ as they are; the map records HEAD's commit."""
    try:
        import coverage  # noqa: F401
        import pytest_cov  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"the coverage map needs coverage and pytest-cov (pip install '.[mutation]'): {exc}") from None
    commit = git_head()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "tests"], cwd=ROOT, capture_output=True,
                           text=True, check=False).stdout.strip()
    if dirty:
        print(f"warning: src/ or tests/ have uncommitted changes; the map describes them, not commit {commit[:12]}",
              flush=True)
    with tempfile.TemporaryDirectory(prefix="retain-covmap-") as tmp:
        data_file, record_file = Path(tmp) / ".coverage", Path(tmp) / "tests.json"
        env = dict(_test_env(ROOT / "src", ROOT / "tools"), COVERAGE_FILE=str(data_file),
                   **{_RECORDER_ENV: str(record_file)})
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-p", "mutate",
               "--cov=src/retain", "--cov-context=test", "--cov-report=", *(pytest_args or ["-m", "not slow", "tests"])]
        print("building the coverage map:", " ".join(cmd), flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
        seconds = time.perf_counter() - start
        if proc.returncode not in (0, 1) or not record_file.exists() or not data_file.exists():
            raise SystemExit(f"the map build's pytest ended with status {proc.returncode}: no map written")
        covmap = map_from_coverage(data_file, json.loads(record_file.read_text()), ROOT / "src", commit)
    covmap.build_seconds = seconds
    covmap.save(out)
    print(f"coverage map {out}: {len(covmap.tests)} tests, {sum(len(v) for v in covmap.lines.values())} lines "
          f"with tests, built in {seconds:.0f} s at {commit[:12]}", flush=True)
    if covmap.failed:
        print(f"warning: {len(covmap.failed)} tests failed in the build and are never selected: "
              + ", ".join(covmap.failed[:10]), flush=True)
    return covmap


def load_accepted() -> dict[str, str]:
    if ACCEPTED_FILE.exists():
        return json.loads(ACCEPTED_FILE.read_text())
    return {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--module", action="append", default=None, help="module path under src/, e.g. retain/memory.py")
    p.add_argument("--max-mutants", type=int, default=None, help="per module: a seeded random sample of this many")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    p.add_argument("--kinds", default=None, help="comma-separated mutation kinds to keep (default: all)")
    p.add_argument("--tests", nargs="+", default=None, help="test files to run instead of the module's mapping")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per mutant (default: 3 x baseline + 30; with a map 3 x the selected tests' + 60)")
    p.add_argument("--report", default="runs/mutation", help="folder for mutation.json and mutation.md")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--rerun", default=None, help="a mutation.json: run only its survivors again (after new tests)")
    p.add_argument("--build-coverage-map", default=None, metavar="JSON",
                   help="run the non-slow suite once under coverage and write which tests run each line, then exit")
    p.add_argument("--coverage-map", default=None, metavar="JSON",
                   help="run each mutant against the tests that executed its lines (from --build-coverage-map)")
    p.add_argument("--allow-stale-map", action="store_true",
                   help="use a coverage map built at another commit or from another source of the module")
    args = p.parse_args(argv)
    if args.build_coverage_map:
        build_coverage_map(Path(args.build_coverage_map))
        return 0
    if not args.module:
        p.error("--module is required (or --build-coverage-map JSON)")
    if args.tests and args.coverage_map:
        p.error("--tests and --coverage-map choose the tests two ways: pass one")
    src_root = ROOT / "src"
    covmap = None
    if args.coverage_map:
        covmap = CoverageMap.load(Path(args.coverage_map))
        try:
            covmap.check_current(git_head(), src_root, args.module, allow_stale=args.allow_stale_map)
        except StaleMapError as exc:
            raise SystemExit(str(exc)) from None
    # A SIGTERM ends the run like Ctrl-C: the running pytest is killed and the temporary copy removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    accepted = load_accepted()
    report_dir = Path(args.report)
    report_dir.mkdir(parents=True, exist_ok=True)
    results: list[Mutant] = []
    summary: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="retain-mutate-") as tmp:
        # src/ and tests/ are copied once: edits in the worktree while the run goes on change nothing.
        run_root = Path(tmp)
        src_copy = run_root / "src"
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".hypothesis")
        shutil.copytree(src_root, src_copy, ignore=ignore)
        shutil.copytree(ROOT / "tests", run_root / "tests", ignore=ignore)
        for extra in ("examples", "tools", "benchmarks"):  # configs, scripts and documents that tests read or run
            shutil.copytree(ROOT / extra, run_root / extra, ignore=ignore)
        for name in ("pyproject.toml", "README.md", "Makefile"):  # the README's commands are tested
            shutil.copy2(ROOT / name, run_root / name)
        for module in args.module:
            mutants = enumerate_mutants(module, src_root)
            if args.kinds:
                kinds = set(args.kinds.split(","))
                mutants = [m for m in mutants if m.kind in kinds]
            total = len(mutants)
            if args.rerun:
                previous = json.loads(Path(args.rerun).read_text())["mutants"]
                keys = {(m["module"], m["index"], m["kind"], m["variant"]) for m in previous
                        if m["outcome"] == "survived"}  # fmt: skip
                mutants = [m for m in mutants if (m.module, m.index, m.kind, m.variant) in keys]
            elif args.max_mutants is not None and total > args.max_mutants:
                mutants = sorted(random.Random(f"{args.seed}:{module}").sample(mutants, args.max_mutants),
                                 key=lambda m: (m.line, m.index, m.kind, m.variant))
            test_map = {module: args.tests} if args.tests else TEST_MAP
            selections = {id(m): select_tests(m, covmap, src_root, test_map) for m in mutants}
            if args.list:
                for m in mutants:
                    shown = f"  [{selections[id(m)].label}]" if covmap is not None else ""
                    print(f"{m.module}:{m.line} {m.kind}: {m.original}  ->  {m.mutated}{shown}")
                print(f"{module}: {len(mutants)} of {total} mutants")
                continue
            # The unmutated baselines: the test files if any mutant falls back to them; with a map, also every
            # selected test together (a test that fails unmutated here would "kill" every mutant selecting it).
            tests = [t for t in test_map.get(module, []) if (ROOT / t).exists()]
            base_seconds = 0.0
            if any(not s.from_coverage for s in selections.values()):
                if not tests:
                    raise SystemExit(f"no test files mapped for {module}: pass --tests or --coverage-map")
                status, base_seconds = run_tests(run_root, tests, timeout=1800)
                if status != "passed":
                    raise SystemExit(f"{module}: the unmutated tests {tests} do not pass ({status})")
            covered = [s for s in selections.values() if s.from_coverage]
            if covered:
                assert covmap is not None
                union = covmap.tests_for(module, {n for m in mutants if selections[id(m)].from_coverage
                                                  for n in mutant_lines(m, src_root)[0]})
                status, union_seconds = run_tests(run_root, union, timeout=1800)
                if status != "passed":
                    raise SystemExit(f"{module}: the {len(union)} tests the map selects do not pass unmutated "
                                     f"({status}): rebuild the map")
                print(f"{module}: {len(covered)} mutants select their tests from the coverage map "
                      f"({len(union)} tests in all, {union_seconds:.0f} s unmutated)", flush=True)
            print(f"{module}: {len(mutants)} of {total} mutants"
                  + (f", tests {tests} ({base_seconds:.0f} s unmutated)" if len(covered) < len(mutants) else ""),
                  flush=True)
            target = src_copy / module
            original = target.read_text()
            counts = {"total": total, "tested": 0, "killed": 0, "timeout": 0, "survived": 0, "accepted": 0}
            try:
                for m in mutants:
                    selection = selections[id(m)]
                    m.selection = "--tests" if args.tests else selection.label
                    if args.timeout:
                        timeout = args.timeout
                    elif selection.expected_seconds is not None:
                        timeout = 3 * selection.expected_seconds + 60
                    else:
                        timeout = 3 * base_seconds + 30
                    target.write_text(mutated_source(m, src_root))
                    status, m.seconds = run_tests(run_root, selection.tests if selection.from_coverage else tests,
                                                  timeout)
                    target.write_text(original)
                    if status == "passed":
                        m.outcome = "accepted" if m.key in accepted else "survived"
                        m.reason = accepted.get(m.key, "")
                    else:
                        m.outcome = "killed" if status == "failed" else "timeout"
                    counts["tested"] += 1
                    counts[m.outcome] += 1
                    results.append(m)
                    summary[module] = counts
                    write_report(report_dir, summary, results, quiet=True)  # readable while the run goes on
                    print(f"  {m.outcome:8s} {m.module}:{m.line} {m.kind}: {m.original} -> {m.mutated} "
                          f"({m.seconds:.0f} s, {m.selection})", flush=True)
            finally:
                target.write_text(original)
            summary[module] = counts
    if args.list:
        return 0
    write_report(report_dir, summary, results)
    return 0


def score(counts: dict[str, int]) -> float:
    """Killed (failures and timeouts) over the non-equivalent mutants tested."""
    relevant = counts["tested"] - counts["accepted"]
    return (counts["killed"] + counts["timeout"]) / relevant if relevant else 1.0


def write_report(folder: Path, summary: dict[str, dict[str, int]], results: list[Mutant], quiet: bool = False) -> None:
    """``mutation.json`` and ``mutation.md`` (score per module and the survivors)."""
    (folder / "mutation.json").write_text(
        json.dumps({"summary": summary, "mutants": [asdict(m) for m in results]}, indent=2) + "\n"
    )
    rows = ["| module | mutants | tested | killed | timeout | survived | equivalent/accepted | score |",
            "|---|---|---|---|---|---|---|---|"]
    total = {"total": 0, "tested": 0, "killed": 0, "timeout": 0, "survived": 0, "accepted": 0}
    for module, c in summary.items():
        rows.append(f"| {module} | {c['total']} | {c['tested']} | {c['killed']} | {c['timeout']} | {c['survived']} "
                    f"| {c['accepted']} | {100 * score(c):.0f} % |")
        for k in total:
            total[k] += c[k]
    rows.append(f"| **all** | {total['total']} | {total['tested']} | {total['killed']} | {total['timeout']} "
                f"| {total['survived']} | {total['accepted']} | **{100 * score(total):.0f} %** |")
    lines = ["# Mutation score", "", *rows, ""]
    by_map = [m for m in results if m.selection.startswith("coverage")]
    if by_map:
        seconds = sum(m.seconds for m in results)
        others = len(results) - len(by_map)
        lines += [f"Tests per mutant: from the coverage map for {len(by_map)} of {len(results)} mutants"
                  + (f", the test files (TEST_MAP) for the other {others}" if others else "")
                  + f"; {seconds / len(results):.0f} s per mutant.", ""]
    lines += ["## Survivors", ""]
    lines += [f"- `{m.module}:{m.line}` {m.kind}: `{m.original}` -> `{m.mutated}`"
              + (f" ({m.selection})" if m.selection else "")
              for m in results if m.outcome == "survived"] or ["none"]
    lines += ["", "## Equivalent or accepted", ""]
    lines += [f"- `{m.module}:{m.line}` {m.kind}: `{m.original}` -> `{m.mutated}`: {m.reason}"
              for m in results if m.outcome == "accepted"] or ["none"]
    (folder / "mutation.md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(rows))


if __name__ == "__main__":
    raise SystemExit(main())
