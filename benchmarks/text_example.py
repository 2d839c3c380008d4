"""Accuracy table of the text example (examples/text_config.py) over its chunks: fine-tune vs ER vs DER++.

Every update is its own `retain update` process on the previous state folder, as a scheduled job
runs it; after each update the state is scored on the test sentences of every chunk (in this
process, with `retain.load_model(state, model=model_fn())` and `accuracy_on_dataset`, which is
what `retain evaluate` does).

    python benchmarks/text_example.py [--methods finetune er derpp] [--output runs/text]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import retain
from retain.evaluation import accuracy_on_dataset

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "examples" / "text_config.py"
NAMES = {"finetune": "fine-tune", "er": "ER", "derpp": "DER++"}


def _config():
    spec = importlib.util.spec_from_file_location("text_config", CONFIG)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["finetune", "er", "derpp"], choices=list(NAMES))
    parser.add_argument("--output", type=Path, default=Path("runs/text"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = _config()
    chunks = config.NUM_TOPICS // config.TOPICS_PER_CHUNK
    tests = []
    for c in range(chunks):
        os.environ["RETAIN_TEST_CHUNKS"] = str(c)
        tests.append(config.test_dataset_fn())
    rows = []
    for method in args.methods:
        previous = None
        for chunk in range(chunks):
            state = args.output / method / f"t{chunk}"
            command = [sys.executable, "-m", "retain.cli", "update", "--config", str(CONFIG), "--output-state",
                       str(state)] + (["--input-state", str(previous)] if previous else [])  # fmt: skip
            env = {**os.environ, "RETAIN_METHOD": method, "RETAIN_CHUNK": str(chunk), "OMP_NUM_THREADS": "1"}
            started = time.perf_counter()
            subprocess.run(command, env=env, check=True, capture_output=True)
            seconds = time.perf_counter() - started
            model = retain.load_model(state, model=config.model_fn())
            scores = [accuracy_on_dataset(model, t, collate_fn=config.COLLATE_FN)[0] for t in tests[: chunk + 1]]
            rows.append((NAMES[method], chunk, scores, seconds))
            print(f"{NAMES[method]} after chunk {chunk}: " + ", ".join(f"{100 * s:.1f}" for s in scores)
                  + f" ({seconds:.0f} s)", flush=True)  # fmt: skip
            previous = state
    header = "| method | after chunk | " + " | ".join(f"topics {2 * c},{2 * c + 1}" for c in range(chunks))
    print("\n" + header + " | mean seen |\n|---|---|" + "---|" * (chunks + 1))
    for name, chunk, scores, _ in rows:
        cells = [f"{100 * s:.1f}" for s in scores] + ["" for _ in range(chunks - len(scores))]
        print(f"| {name} | {chunk} | " + " | ".join(cells) + f" | {100 * sum(scores) / len(scores):.1f} |")


if __name__ == "__main__":
    main()
