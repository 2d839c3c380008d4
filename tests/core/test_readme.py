"""The README is true: every command in its code blocks (and every inline `retain ...` command)
parses as the CLI would parse it, and the quick start is deterministic across processes."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from retain.cli import parse_command

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _command_lines() -> list[str]:
    lines = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                lines.extend(part.strip() for part in line.split("&&"))
    for inline in re.findall(r"`((?:retain|torchrun|pip install|make) [^`]+)`", README):
        if inline.startswith(("retain", "torchrun")):
            if " -" not in inline:  # a command's name in the text ("`retain update` runs ..."), not a command
                continue
            inline = inline.replace("[", "").replace("]", "")  # [--workers 2]: optional flags, shown as such
        lines.append(inline)
    return lines


COMMANDS = _command_lines()


def _pyproject_extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def test_the_readme_has_commands_to_check() -> None:
    assert len(COMMANDS) >= 10 and any(c.startswith("torchrun") for c in COMMANDS)


@pytest.mark.parametrize("line", COMMANDS)
def test_every_readme_command_parses(line: str, capsys: pytest.CaptureFixture[str]) -> None:
    tokens = shlex.split(line)
    while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):  # environment assignments
        tokens = tokens[1:]
    program = Path(tokens[0]).name
    if program == "make":
        makefile = (ROOT / "Makefile").read_text()
        for target in tokens[1:]:
            assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"no make target {target}"
        return
    if program in ("python3", "python") and tokens[1:3] == ["-m", "venv"]:
        return
    if program == "pip":
        assert tokens[1] == "install", line
        for spec in tokens[2:]:
            if spec.startswith("-"):
                continue
            assert not re.match(r"retain\b(?!-)", spec), f"PyPI's `retain` is another project: {line}"
            extras = re.fullmatch(r"\.(?:\[([\w,]+)\])?", spec)
            if extras is not None:  # from the clone: '.' or '.[extra,...]'
                assert set((extras.group(1) or "").split(",")) - {""} <= _pyproject_extras(), line
        return
    if program == "torchrun":
        assert "--no-python" in tokens, line
        tokens = tokens[tokens.index("retain"):]
        program = "retain"
    assert program == "retain", f"a README command this test does not know how to check: {line}"
    argv = tokens[1:]
    if any(re.fullmatch(r"[A-Z]{1,4}", t) for t in argv):  # a placeholder such as X or NAME
        pytest.skip(f"placeholder in {line!r}")
    if "--help" in argv or "-h" in argv:
        with pytest.raises(SystemExit) as info:
            parse_command(argv)
        assert info.value.code == 0 and "usage:" in capsys.readouterr().out
        return
    args = parse_command(argv)
    assert args is not None


def _quick_start(tmp_path: Path) -> tuple[str, str]:
    (block,) = [b for b in _blocks("python") if "DarkExperienceReplayModelUpdater" in b]
    script = tmp_path / "quick_start.py"
    script.write_text(block)
    path = f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    digest = hashlib.sha256()
    for path in sorted((tmp_path / "state" / "v4").iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return proc.stdout, digest.hexdigest()


@pytest.mark.timeout(900)
def test_quick_start_is_deterministic_across_processes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    out_a, state_a = _quick_start(tmp_path / "a")
    out_b, state_b = _quick_start(tmp_path / "b")
    assert out_a == out_b and "tensor(0.9" in out_a
    assert state_a == state_b


def test_no_document_installs_the_unrelated_pypi_package() -> None:
    """`pip install retain...` would fetch an unrelated PyPI project: every install instruction in
    the documents, examples, benchmarks and the package names the clone (`-e .`) or `retain-cl`."""
    wrong = re.compile(r"pip install (?:-U )?['\"]?retain(?![-\w])")
    places = [ROOT / "README.md", *ROOT.glob("benchmarks/*.md"), *ROOT.glob("benchmarks/*.py"),
              *ROOT.glob("examples/*.py"), *ROOT.glob("tests/README.md"), *(ROOT / "src").rglob("*.py")]  # fmt: skip
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in places for m in wrong.finditer(p.read_text())]
    assert found == []
    assert wrong.search("pip install 'retain[hf]'") and not wrong.search("pip install -e '.[hf]'")
    assert not wrong.search("pip install retain-cl")
