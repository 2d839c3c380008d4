"""One ``retain tune`` trial: ``python -m retain.tune_worker --st_config_json_filename FILE``.

Syne Tune's trial backends start this file as a script with the trial's configuration; it runs
the whole continual sequence and reports ``val_accuracy`` (see ``retain.tune``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    from retain.tune import trial_main

    return trial_main(argv)


if __name__ == "__main__":
    # Started as a file (python .../retain/tune_worker.py), Python puts this folder first on
    # sys.path, where retain's module names (state, memory, data, ...) could shadow other packages.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    raise SystemExit(main())
