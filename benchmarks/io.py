"""Result files of the benchmarks, written whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fishdip_peft.atomic import atomic_write


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON to `path` (parent folders created) via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp_path: str) -> None:
        with open(tmp_path, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=1)
            out.write("\n")

    atomic_write(str(path), write)
