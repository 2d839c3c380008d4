"""The text example end to end: `retain update` (DER++) over two chunks of a HuggingFace BERT, then
`retain evaluate`, each a new process, as a scheduled job runs them (about 10 CPU seconds per update)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "examples" / "text_config.py"


def _retain(*args: str, tmp: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
                   "RETAIN_TRAIN_ITEMS": "150", "RETAIN_EPOCHS": "3", **env}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "retain.cli", *args], cwd=tmp, env=environment,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_text_example_updates_a_bert_classifier_with_derpp_and_evaluates_it(tmp_path: Path) -> None:
    _retain("update", "--config", str(CONFIG), "--output-state", "t0", tmp=tmp_path, RETAIN_CHUNK="0")
    _retain("update", "--config", str(CONFIG), "--input-state", "t0", "--output-state", "t1", tmp=tmp_path,
            RETAIN_CHUNK="1")  # fmt: skip
    manifest = json.loads((tmp_path / "t1" / "manifest.json").read_text())
    assert manifest["method"] == "DarkExperienceReplayModelUpdater" and manifest["updates_done"] == 2
    assert manifest["model"]["class"] == "BertForSequenceClassification"
    memory = json.loads((tmp_path / "t1" / "memory.json").read_text())
    assert [key for key, _ in memory["input_structure"]["dict"]] == ["input_ids", "attention_mask"]
    done = _retain("evaluate", "--config", str(CONFIG), "--state", "t1", tmp=tmp_path, RETAIN_TEST_CHUNKS="0,1")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # 4 topics seen: chance is 0.25; forgetting chunk 0 (what fine-tuning does) gives 0.5
    assert result["items"] == 200 and result["accuracy"] > 0.6
