"""Fork server for tests/test_reliability_saves.py: saves two FISH-DIP adapters alternately into one folder.

Run as `python -m tests.reliability_save_server`. It imports torch/peft once and prints `imported` (so the test
can train the adapters meanwhile), then answers commands read from stdin, one a line:

- `load DIR_A DIR_B TARGET`: load the adapters of DIR_A and DIR_B (each onto its own `tiny_llama()`), save
  each once (a warm-up) and print `ready`; the saves below go into TARGET.
- `go <first> [<phase>]`: fork a child that saves adapter `<first>` (A or B) into TARGET, then the other,
  and so on, forever. With a phase the child stops, printing `phase <phase>`, at that point of its first
  save and waits to be killed: `write` (the weights' temporary file is written, not yet renamed), `between`
  (the weights file is in place, the config not yet written), `config` (the config's temporary folder is
  written, not yet renamed). With `calibrate` it times its first save and 8 more into a scratch folder
  instead, prints `phase calibrate <seconds of the first save> <seconds per later save>` and waits to be
  killed. The server prints `pid <pid>`, waits for the
  child to die (the test kills it with SIGKILL) and prints `dead <pid> <wait status>`. A child whose save
  raises prints `error <message>` and exits with status 3.
- `quit`: exit.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _wait_forever(phase: str) -> None:
    _say(f"phase {phase}")
    while True:
        time.sleep(3600)


def _arm(phase: str) -> None:
    """Make the first save of this (forked) child stop at `phase`."""
    import fishdip_peft.formats as formats
    from peft.config import PeftConfig

    from fishdip_peft import FishDipConfig

    if phase == "write":
        original = formats.atomic_write

        def stop_before_rename(path, write):
            return original(path, lambda tmp: (write(tmp), _wait_forever("write")))

        formats.atomic_write = stop_before_rename
    elif phase == "between":
        original_config_save = FishDipConfig.save_pretrained

        def stop_before_config(self, *args, **kwargs):
            _wait_forever("between")
            return original_config_save(self, *args, **kwargs)

        FishDipConfig.save_pretrained = stop_before_config
    elif phase == "config":
        original_mixin_save = PeftConfig.save_pretrained  # PeftConfigMixin's, which FishDipConfig's super() finds

        def stop_before_rename_of_config(self, *args, **kwargs):
            original_mixin_save(self, *args, **kwargs)
            _wait_forever("config")

        PeftConfig.save_pretrained = stop_before_rename_of_config
    else:
        raise ValueError(f"unknown phase {phase!r}")


def _calibrate(models: dict) -> None:
    """Time saves in a forked child (as the savers are), into a scratch folder, then wait to be killed.

    Reports the first save, which is the one the random kills aim at: in a fresh fork it is several times slower
    than the later ones (copy-on-write faults, first use of the folder), and then the steady per-save time."""
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        models["A"].save_pretrained(scratch)
        first = time.perf_counter() - start
        start, count = time.perf_counter(), 8
        for turn in range(count):
            models["BA"[turn % 2]].save_pretrained(scratch)
        per_save = (time.perf_counter() - start) / count
    _wait_forever(f"calibrate {first:.6f} {per_save:.6f}")


def _save_forever(models: dict, first: str, target: str, phase: str | None) -> None:
    try:
        if phase == "calibrate":
            _calibrate(models)
        if phase:
            _arm(phase)
        order = [first, "B" if first == "A" else "A"]
        turn = 0
        while True:
            models[order[turn % 2]].save_pretrained(target)
            turn += 1
    except BaseException as error:  # noqa: BLE001 (reported to the test, which fails)
        _say(f"error {type(error).__name__}: {error}".replace("\n", " "))
        os._exit(3)


def _load(dir_a: str, dir_b: str) -> dict:
    from peft import PeftModel

    from tests.models import tiny_llama

    models = {"A": PeftModel.from_pretrained(tiny_llama(), dir_a), "B": PeftModel.from_pretrained(tiny_llama(), dir_b)}
    with tempfile.TemporaryDirectory() as scratch:
        for name in models:  # warm-up: the first save imports what saving needs
            models[name].save_pretrained(scratch)
    return models


def main() -> None:
    import torch

    torch.set_num_threads(1)  # no OpenMP pool to inherit across fork
    import peft  # noqa: F401

    import fishdip_peft  # noqa: F401 (registers FISH-DIP with peft)
    import tests.models  # noqa: F401

    _say("imported")
    models, target = None, None
    for line in sys.stdin:
        words = shlex.split(line)
        if not words:
            continue
        if words[0] == "quit":
            return
        if words[0] == "load":
            models, target = _load(words[1], words[2]), words[3]
            _say("ready")
            continue
        if words[0] != "go" or models is None:
            _say(f"error unexpected command {line.strip()!r}")
            continue
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _save_forever(models, words[1], target, words[2] if len(words) > 2 else None)
        _say(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        _say(f"dead {pid} {status}")


if __name__ == "__main__":
    main()
