"""The generated stubs of the method modules (``tools/signature_stubs.py``) are what the code
generates, and a static type checker reading them sees every option of every updater."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("signature_stubs", REPO / "tools" / "signature_stubs.py")
assert spec is not None and spec.loader is not None
signature_stubs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(signature_stubs)


@pytest.mark.parametrize("module", signature_stubs.MODULES)
def test_the_committed_stub_is_what_the_code_generates(module: str) -> None:
    path = signature_stubs.stub_path(module)
    assert path.read_text() == signature_stubs.stub_text(module), (
        f"{path.name} is stale: run python tools/signature_stubs.py"
    )


def test_the_stub_lists_every_option_of_an_updater_with_its_default() -> None:
    tree = ast.parse(signature_stubs.stub_path("retain.methods.er").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DarkExperienceReplayModelUpdater")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    positional = [a.arg for a in init.args.args]
    assert positional == ["self", "model", "loss_fn", "optimizer", "memory_size", "batch_memory_frac", "loss_weight",
                          "ema_memory_update_gamma", "loss_normalization", "alpha", "beta"]  # fmt: skip
    keyword = {a.arg: ast.literal_eval(d) for a, d in zip(init.args.kwonlyargs, init.args.kw_defaults, strict=True)}
    assert keyword["memory_batch_size"] is None and keyword["batch_size"] == 32 and keyword["patience"] == 3
    assert keyword["validation_data"] == "all" and init.args.kwarg is None  # no **kwargs: a typo is an error
    defaults = dict(zip(positional[-len(init.args.defaults) :], init.args.defaults, strict=True))
    assert ast.literal_eval(defaults["beta"]) == 1.0 and ast.literal_eval(defaults["memory_size"]) == 500


def test_a_stale_stub_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in signature_stubs.MODULES:
        target = tmp_path.joinpath(*module.split(".")).with_suffix(".pyi")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(signature_stubs.stub_text(module))
    stale = tmp_path / "retain" / "methods" / "er.pyi"
    stale.write_text(stale.read_text().replace("beta: float = 1.0", "beta: float = 2.0"))
    monkeypatch.setattr(signature_stubs, "SRC", tmp_path)
    monkeypatch.setattr(sys, "argv", ["signature_stubs.py", "--check"])
    assert signature_stubs.main() == 1


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mypy") is None and importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed (the test extra installs it)")  # fmt: skip
def test_mypy_reads_the_generated_signatures(tmp_path: Path) -> None:
    """A static checker (mypy, reading the stubs) refuses a misspelled option and a positional
    argument too many, and accepts a correct call: what an IDE shows is the real signature."""
    use = tmp_path / "use.py"
    use.write_text(
        "import functools\nimport torch\n"
        "from retain.methods import DarkExperienceReplayModelUpdater\n"
        "from retain.models import MultiLayerPerceptron\n"
        "model = MultiLayerPerceptron(8, 4, [16])\n"
        "ok = DarkExperienceReplayModelUpdater(model, optimizer=functools.partial(torch.optim.SGD, lr=0.1), "
        "alpha=0.3, beta=0.2, batch_size=8)\n"
        "bad = DarkExperienceReplayModelUpdater(model, alpah=0.3)\n"
        "bad2 = DarkExperienceReplayModelUpdater(model, None, None, 500, 0.5, 1.0, 1.0, 1, 0.3, 0.2, None)\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports", "--no-incremental",
         str(use)],
        capture_output=True, text=True, cwd=tmp_path, env={"MYPYPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
        timeout=600,
    )  # fmt: skip
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 2, result.stdout + result.stderr
    assert 'use.py:7: error: Unexpected keyword argument "alpah"' in errors[0]
    assert "use.py:8: error: Too many positional arguments" in errors[1]
