"""Hand edits of a state folder for refusal tests: files rewritten with valid checksums, so what
is tested is the content check, not the checksum."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retain.state import StateFolder, write_state


def rewrite_state(folder: Path, manifest_edit: Any = None, **edits: Any) -> None:
    """Rewrites ``folder`` (a state or checkpoint folder) with JSON files (``learner_json=fn``),
    tensor files (``learner_safetensors=fn``) or the manifest (``manifest_edit=fn``) edited: each
    ``fn`` takes the parsed file and returns its new content."""
    state = StateFolder(folder)
    manifest = {k: v for k, v in state.manifest.items() if k not in ("format", "format_version", "files")}
    names = list(state.manifest["files"])
    json_files = {n: state.json(n) for n in names if n.endswith(".json")}
    tensor_files = {n: state.tensors(n) for n in names if n.endswith(".safetensors")}
    for key, edit in edits.items():
        name = key.replace("_", ".")
        files = json_files if name.endswith(".json") else tensor_files
        files[name] = edit(files[name])
    write_state(folder, manifest_edit(manifest) if manifest_edit else manifest, json_files, tensor_files)
