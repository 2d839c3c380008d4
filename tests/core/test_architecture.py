"""The architecture rule runs in CI: imports point one way (entry points -> methods -> updaters ->
learners -> parts), no circle, no import of the package root (``tools/import_graph.py``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("import_graph", REPO / "tools" / "import_graph.py")
assert spec is not None and spec.loader is not None
import_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_graph)


def test_the_package_keeps_the_import_rules() -> None:
    assert import_graph.problems() == []


def test_the_rule_catches_circles_upward_imports_and_root_imports(tmp_path: Path) -> None:
    package = tmp_path / "retain"
    (package / "updaters").mkdir(parents=True)
    (package / "__init__.py").write_text("from retain.cli import main\n")
    (package / "cli.py").write_text("from retain.memory import ReservoirMemory\n")
    (package / "memory.py").write_text("def f():\n    from retain.updaters.base import ModelUpdater\n")
    (package / "updaters" / "__init__.py").write_text("")
    (package / "updaters" / "base.py").write_text("import retain\nfrom retain.memory import f\n")
    found = import_graph.problems(tmp_path)
    assert "imports the package root: retain.updaters.base" in found
    assert "circle: retain.memory <-> retain.updaters.base" in found
    assert "imports a higher floor: retain.memory (parts) -> retain.updaters.base (updaters)" in found
    assert not any("retain.cli" in line for line in found)  # entry points may import anything below


def test_the_script_passes_on_the_package() -> None:
    ok = subprocess.run([sys.executable, str(REPO / "tools" / "import_graph.py")], capture_output=True, text=True)
    assert ok.returncode == 0 and "no circle" in ok.stdout, ok.stdout + ok.stderr


stats_spec = importlib.util.spec_from_file_location("architecture_stats", REPO / "tools" / "architecture_stats.py")
assert stats_spec is not None and stats_spec.loader is not None
architecture_stats = importlib.util.module_from_spec(stats_spec)
stats_spec.loader.exec_module(architecture_stats)


def test_every_er_method_option_is_written_once() -> None:
    """Each option of each ER-family method is a parameter of exactly one function of its learner
    and updater (its ``components``): a second copy (a builder restating it, an updater listing it
    again) is what lets two copies drift apart."""
    import retain.methods.er as er

    module = REPO / "src" / "retain" / "methods" / "er.py"
    for name in architecture_stats.ER_LEARNERS:
        own = [p for p in er.method_option_parameters(getattr(er, name))]
        assert own, name
        names = {p.name for p in own}
        counts = architecture_stats.parameter_counts(module, name, names) + architecture_stats.parameter_counts(
            module, name.replace("Learner", "ModelUpdater"), names
        )
        assert {option: counts[option] for option in names} == dict.fromkeys(names, 1), name


def test_the_option_count_sees_a_restated_option(tmp_path: Path) -> None:
    module = tmp_path / "er.py"
    module.write_text(
        "class DarkExperienceReplayLearner:\n"
        "    def __init__(self, alpha=1.0, **kwargs): ...\n"
        "    def components(self, loss_fn=None, alpha=1.0, beta=1.0): ...\n"
    )
    counts = architecture_stats.parameter_counts(module, "DarkExperienceReplayLearner", {"alpha", "beta"})
    assert counts == {"alpha": 2, "beta": 1}
