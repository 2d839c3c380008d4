"""tools/mutate.py's coverage-based test selection: which tests a mutant runs from a coverage map, the fallback
to the module's test files, and the refusal of a map built from other source. A fake map; no mutation run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("mutate_tool", REPO / "tools" / "mutate.py")
assert _spec is not None and _spec.loader is not None
mutate = importlib.util.module_from_spec(_spec)
sys.modules["mutate_tool"] = mutate  # dataclasses look their module up while the class is built
_spec.loader.exec_module(mutate)

MODULE = "retain/fake.py"
SOURCE = '''LIMIT = 3


def scale(x, factor):
    total = helper(
        x,
        factor=factor * 2,
    )
    return total


def unused(x):
    return x + 1
'''
TEST_FILES = {MODULE: ["tests/test_fake_a.py"]}


@pytest.fixture()
def src_root(tmp_path: Path) -> Path:
    (tmp_path / "src" / "retain").mkdir(parents=True)
    (tmp_path / "src" / MODULE).write_text(SOURCE)
    return tmp_path / "src"


def _mutant(src_root: Path, line: int, kind: str) -> mutate.Mutant:
    (found,) = [m for m in mutate.enumerate_mutants(MODULE, src_root) if m.line == line and m.kind == kind]
    return found


def _fake_map(src_root: Path, commit: str = "a" * 40) -> mutate.CoverageMap:
    """Coverage recorded the multi-line assignment on its first line (5) only, as tracers may."""
    tests = ["tests/b.py::test_slow", "tests/a.py::test_one", "tests/a.py::test_two", "tests/b.py::test_other",
             "tests/c.py::test_c"]
    return mutate.CoverageMap(
        commit=commit, tests=tests, seconds=[5.0, 1.0, 1.5, 0.1, 0.2], sets=[[0, 1, 3], [4]],
        lines={MODULE: {5: 0, 9: 1, 1: 1}},  # line 1 (module level) as a lazy import would record it
        import_only={MODULE: [4, 12]}, sources={MODULE: mutate._sha256(src_root / MODULE)},
    )


def test_a_mutant_runs_every_test_that_executed_its_statement_fastest_file_first(src_root: Path) -> None:
    mutant = _mutant(src_root, 7, "binop")  # factor * 2 -> factor / 2, on a continuation line of line 5
    assert mutate.mutant_lines(mutant, src_root) == ({5, 7}, False)
    selection = mutate.select_tests(mutant, _fake_map(src_root), src_root, TEST_FILES)
    # a.py (1.0 s selected) before b.py (5.1 s), b.py's tests in run order; test_two and test_c never ran line 5
    assert selection.tests == ["tests/a.py::test_one", "tests/b.py::test_slow", "tests/b.py::test_other"]
    assert selection.label == "coverage: 3 tests"
    assert selection.expected_seconds == pytest.approx(2.5 + 5.1)  # the two files' tests, the timeout's base


def test_import_time_code_and_lines_no_test_ran_fall_back_to_the_test_files(src_root: Path) -> None:
    covmap = _fake_map(src_root)
    constant = _mutant(src_root, 1, "number")  # LIMIT = 3 -> 4: every user of LIMIT, not whoever imported first
    assert mutate.mutant_lines(constant, src_root) == ({1}, True)
    selection = mutate.select_tests(constant, covmap, src_root, TEST_FILES)
    assert (selection.tests, selection.label) == (TEST_FILES[MODULE], "test map (import-time code)")
    assert not selection.from_coverage
    unreached = _mutant(src_root, 13, "binop")  # x + 1 -> x - 1: no test ran unused() in-process
    selection = mutate.select_tests(unreached, covmap, src_root, TEST_FILES)
    assert (selection.tests, selection.label) == (TEST_FILES[MODULE], "test map (no test ran these lines)")
    no_map = mutate.select_tests(_mutant(src_root, 7, "binop"), None, src_root, TEST_FILES)
    assert (no_map.tests, no_map.label) == (TEST_FILES[MODULE], "test map")


def test_a_map_from_another_commit_or_source_is_refused_unless_allowed(src_root: Path) -> None:
    covmap = _fake_map(src_root, commit="a" * 40)
    covmap.check_current("a" * 40, src_root, [MODULE])  # same commit, same source: accepted
    with pytest.raises(mutate.StaleMapError, match="built at commit aaaaaaaaaaaa, the working tree is at bbbbbbbbbbbb"):
        covmap.check_current("b" * 40, src_root, [MODULE])
    (src_root / MODULE).write_text(SOURCE.replace("LIMIT = 3", "LIMIT = 30"))  # an uncommitted edit
    with pytest.raises(mutate.StaleMapError, match=r"retain/fake\.py changed since the coverage map was built"):
        covmap.check_current("a" * 40, src_root, [MODULE])
    covmap.check_current("b" * 40, src_root, [MODULE], allow_stale=True)


def test_the_command_line_refuses_a_stale_map_in_one_line(
    src_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "covmap.json"
    _fake_map(src_root, commit="0" * 40).save(path)
    monkeypatch.setattr(mutate, "git_head", lambda root=None: "1" * 40)
    with pytest.raises(SystemExit, match=r"^the coverage map was built at commit 000000000000, .*--allow-stale-map$"):
        mutate.main(["--module", "retain/memory.py", "--list", "--coverage-map", str(path)])
    with pytest.raises(SystemExit, match="2"):
        mutate.main(["--module", "retain/memory.py", "--coverage-map", str(path), "--tests", "tests/x.py"])
    assert "--tests and --coverage-map choose the tests two ways" in capsys.readouterr().err


def test_the_map_keeps_passed_tests_per_line_and_marks_import_time_lines(src_root: Path, tmp_path: Path) -> None:
    coverage = pytest.importorskip("coverage")  # the `mutation` extra, not the `test` one
    filename = str((src_root / MODULE).resolve())
    data = coverage.CoverageData(basename=str(tmp_path / ".coverage"))
    for context, lines in [("", [1, 4, 12]), ("tests/a.py::test_one|setup", [5]), ("tests/a.py::test_one|run", [9]),
                           ("tests/b.py::test_bad|run", [13]), ("tests/b.py::test_two|teardown", [5])]:
        data.set_context(context)
        data.add_lines({filename: lines})
    data.write()
    record = {"tests/a.py::test_one": [0.5, "passed"], "tests/b.py::test_bad": [0.25, "failed"],
              "tests/b.py::test_two": [0.75, "passed"]}
    covmap = mutate.map_from_coverage(tmp_path / ".coverage", record, src_root, "c" * 40)
    assert covmap.tests == ["tests/a.py::test_one", "tests/b.py::test_two"] and covmap.seconds == [0.5, 0.75]
    assert covmap.failed == ["tests/b.py::test_bad"]
    assert covmap.tests_for(MODULE, [5]) == ["tests/a.py::test_one", "tests/b.py::test_two"]
    assert covmap.tests_for(MODULE, [9]) == ["tests/a.py::test_one"]
    assert covmap.tests_for(MODULE, [13]) == []  # only a failed test ran it: never selected
    assert covmap.import_only == {MODULE: [1, 4, 12]}
    path = tmp_path / "covmap.json"
    covmap.save(path)
    assert mutate.CoverageMap.load(path) == covmap
