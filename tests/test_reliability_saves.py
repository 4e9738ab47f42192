"""kill -9 during saves: a folder that two adapters are saved into in turn always loads as one of them.

Two trained adapters A and B (same base, different data and density) are saved alternately into ONE folder
by a child process (`tests/reliability_save_server.py`, which imports once and forks a saver per round),
and the child is killed with SIGKILL:
- at random moments (delays uniform over twice the first save of a fresh fork, as timed by the server, so
  kills land in the weights write, between the two files, in the config write and in the next save);
- at three chosen points of a save (the child stops there and waits): the weights' temporary file written
  but not renamed, the weights renamed but the config not written, the config's temporary folder written
  but not renamed.
After every kill the folder is loaded with `PeftModel.from_pretrained(tiny_llama(), folder)` and compared
with A and B reloaded from their own clean folders (logits with torch.equal, and the config), and searched
for temporary files (`.tmp-*`). The fixture prints the counts of kills per kind and folder state (`-s`).
"""

from __future__ import annotations

import os
import queue
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model

from fishdip_peft import FishDipConfig
from tests.models import causal_batch, tiny_llama

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the save server forks its savers")

REPO = Path(__file__).resolve().parents[1]
RANDOM_KILLS = 50
CALIBRATIONS = 3  # fresh forks timed before the kills
PHASES = ("write", "between", "config")
TIMEOUT = 60.0  # seconds to wait for one line of the server (it only waits that long if it hangs)
CONFIGS = {"A": {"density": 0.05, "seed": 1}, "B": {"density": 0.1, "seed": 2},
           "C": {"density": 0.1, "seed": 3, "target_modules": ["q_proj", "v_proj"]}}


def train(seed: int, **config) -> torch.nn.Module:
    """An adapter trained in automatic mode for one step (a mask, then an update) on data of its own."""
    model = get_peft_model(tiny_llama(), FishDipConfig(update_every=1, num_regressing=2, **config))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(1):
        model(**causal_batch(100 * seed + step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


PROBE = causal_batch(999)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE["input_ids"], attention_mask=PROBE["attention_mask"]).logits


def config_of(model) -> dict:
    config = model.peft_config["default"].to_dict()
    config.pop("inference_mode", None)
    return config


class Server:
    """The fork server, with a reader thread so that no read blocks the test for ever."""

    def __init__(self, log: Path):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.log = log
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.reliability_save_server"],
                cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                text=True, bufsize=1,
            )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.saver: int | None = None

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def expect(self, word: str) -> list[str]:
        try:
            line = self.lines.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"the save server sent nothing for {TIMEOUT} s (waiting for '{word}')") from None
        assert line is not None, (f"the save server exited (waiting for '{word}'); its stderr ends with: "
                                  f"{self.log.read_text(errors='replace')[-2000:]}")
        assert line.split()[0] == word, f"expected '{word}' from the save server, got {line!r}"
        return line.split()[1:]

    def send(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def kill_saver(self) -> None:
        os.kill(self.saver, signal.SIGKILL)
        pid, status = self.expect("dead")
        assert int(pid) == self.saver
        status = int(status)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
            f"the saver ended by itself (wait status {status}): a save failed")
        self.saver = None

    def close(self) -> None:
        if self.process.poll() is not None:
            return
        if self.saver is not None:
            try:
                os.kill(self.saver, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.send("quit")
            self.process.wait(timeout=10)
        except Exception:  # noqa: BLE001 (cleanup of the process this test started)
            self.process.kill()
            self.process.wait()


def leftovers(folder: Path) -> set[str]:
    """The temporary files (`name`) and folders (`name/`) in `folder`."""
    return {name + ("/" if (folder / name).is_dir() else "") for name in os.listdir(folder) if name.startswith(".tmp-")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The save server, started first so that it imports while the adapters are trained."""
    started = time.perf_counter()
    server = Server(tmp_path_factory.mktemp("server") / "stderr.txt")
    yield server, started
    server.close()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A, B (and C, for the torn-pair test) saved into folders of their own, with their reference outputs."""
    root = tmp_path_factory.mktemp("adapters")
    references = {}
    for name, settings in CONFIGS.items():
        train(**settings).save_pretrained(root / name)
        clean = PeftModel.from_pretrained(tiny_llama(), root / name)
        references[name] = {
            "folder": root / name, "logits": logits(clean), "config": config_of(clean),
            "weights": (root / name / "adapter_model.safetensors").read_bytes(),
            "config_text": (root / name / "adapter_config.json").read_text(),
        }
    assert not torch.equal(references["A"]["logits"], references["B"]["logits"])
    return references


@pytest.fixture(scope="module")
def kills(server, adapters, tmp_path_factory):
    """Run every kill; return the references of A and B and one record per kill."""
    root = tmp_path_factory.mktemp("kill9")
    references = {name: adapters[name] for name in ("A", "B")}
    target = root / "target"
    shutil.copytree(references["A"]["folder"], target)

    rng = random.Random(20240917)
    plan = [("random", None)] * RANDOM_KILLS + [(phase, phase) for phase in PHASES for _ in range(2)]
    rng.shuffle(plan)
    records = []
    server, started = server
    server.expect("imported")
    server.send(shlex.join(["load", str(references["A"]["folder"]), str(references["B"]["folder"]), str(target)]))
    try:
        server.expect("ready")
        # The first save of a freshly forked saver, as in the rounds below, is what the random kills aim at; it
        # varies from fork to fork, so take the slowest of a few.
        first_saves, later_saves = [], []
        for _ in range(CALIBRATIONS):
            server.send("go A calibrate")
            server.saver = int(server.expect("pid")[0])
            phase, first_save, later_save = server.expect("phase")
            assert phase == "calibrate"
            first_saves.append(float(first_save))
            later_saves.append(float(later_save))
            server.kill_saver()
        first_save, per_save = max(first_saves), min(later_saves)
        ready = time.perf_counter()
        seen = leftovers(target)
        held = {"weights": "A", "config": "A"}
        for kind, phase in plan:
            # The first save of the round changes the weights file; stopped between the files or in the config
            # write, it changes the weights file but not the config, so the folder is then surely torn.
            changed = "config" if phase in ("between", "config") else "weights"
            first = "B" if held[changed] == "A" else "A"
            server.send(f"go {first}" + (f" {phase}" if phase else ""))
            (pid,) = server.expect("pid")
            server.saver = int(pid)
            delay = None
            if phase:
                assert server.expect("phase") == [phase]
            else:
                delay = rng.uniform(0.0, 2.0 * first_save)
                time.sleep(delay)
            server.kill_saver()
            record = {"kind": kind, "delay": delay, "old": held["weights"], "first": first}
            now = leftovers(target)
            record["new_leftovers"] = sorted(now - seen)
            seen = now
            weights = (target / "adapter_model.safetensors").read_bytes()
            config_text = (target / "adapter_config.json").read_text()
            record["weights_of"] = next((n for n, r in references.items() if r["weights"] == weights), None)
            record["config_of"] = next((n for n, r in references.items() if r["config_text"] == config_text), None)
            try:
                loaded = PeftModel.from_pretrained(tiny_llama(), target)
            except Exception as error:  # noqa: BLE001 (recorded; the tests below fail on it)
                record["error"] = f"{type(error).__name__}: {error}"
                loaded = None
            record["left_after_load"] = sorted(leftovers(target))
            seen = leftovers(target)
            if loaded is not None:
                out = logits(loaded)
                record["logits_of"] = next((n for n, r in references.items() if torch.equal(r["logits"], out)), None)
                record["loaded_config"] = config_of(loaded)
            records.append(record)
            held = {"weights": record["weights_of"] or held["weights"], "config": record["config_of"] or held["config"]}
    finally:
        server.close()
    summary = {}
    for record in records:
        record["landed"] = landed(record)
        key = (record["kind"], record["landed"])
        summary[key] = summary.get(key, 0) + 1
    print(f"\nkill -9 during saves: ready {ready - started:.1f} s after the start (the adapters were trained "
          f"meanwhile), {len(records)} kills in {time.perf_counter() - ready:.1f} s; one save takes "
          f"{per_save * 1000:.1f} ms, the first in a fresh fork {first_save * 1000:.1f} ms. Kills by kind and where "
          f"they landed (as the folder shows it):")
    for key in sorted(summary):
        print(f"  {key[0]:<8} {key[1]:<46} {summary[key]}")
    return references, records


def landed(record: dict) -> str:
    """Where in a save the kill landed, as far as the folder shows it."""
    if any(not name.endswith("/") for name in record["new_leftovers"]):
        return "in the weights write (temporary file left)"
    if record["new_leftovers"]:
        return "in the config write (temporary folder left)"
    if record["weights_of"] != record["config_of"]:
        return "between the two files (torn pair)"
    if record["weights_of"] == record["old"]:
        return "before the weights were renamed"
    return "after a whole save"


def test_every_kill_leaves_a_folder_that_loads_as_exactly_a_or_b(kills):
    references, records = kills
    assert len(records) >= 50
    for number, record in enumerate(records):
        assert "error" not in record, f"kill {number} ({record['kind']}): the folder does not load: {record['error']}"
        assert record["logits_of"] is not None, f"kill {number}: the folder loads as neither A nor B: {record}"
        # the weights decide the outputs: the logits are those of the adapter whose weights file is there
        assert record["logits_of"] == record["weights_of"], record
    # The random kills landed both before the first save of a round was complete and after it.
    random_kills = [record for record in records if record["kind"] == "random"]
    before = sum(record["weights_of"] == record["old"] for record in random_kills)
    delays = [round(record["delay"] * 1000, 1) for record in random_kills]
    assert 0 < before < len(random_kills), (
        f"{before} of {len(random_kills)} random kills landed before the first save's weights were renamed: the "
        f"delays (ms) {delays[:8]}... do not straddle the save")


def test_every_kill_leaves_the_config_of_the_weights_it_loads(kills):
    references, records = kills
    torn = [record for record in records if record["loaded_config"] != references[record["logits_of"]]["config"]]
    assert not torn, (f"{len(torn)} of {len(records)} kills loaded one adapter's weights with the other's config: "
                      f"{torn[0]}")


def test_no_kill_leaves_a_temporary_file_in_the_folder(kills):
    """A temporary name exists only between the link and the rename of a write (two system calls); a kill
    exactly there leaves it until the next load or save of the folder, which removes it."""
    _, records = kills
    left = [(record["kind"], record["left_after_load"]) for record in records if record["left_after_load"]]
    assert not left, f"{len(left)} of {len(records)} kills left temporary files: {left[:5]}"
    window = [record for record in records if record["new_leftovers"]]
    print(f"\n{len(window)} of {len(records)} kills landed between a link and its rename")


@pytest.mark.parametrize("weights, config", [("A", "B"), ("B", "A"), ("A", "C"), ("C", "A")],
                         ids=["A-weights-B-density", "B-weights-A-density", "all-weights-qv-config",
                              "qv-weights-all-config"])
def test_a_torn_pair_loads_as_the_adapter_of_its_weights(adapters, weights, config, tmp_path):
    """The subtle case, built by hand: the weights of one save with the config of the other. The folder must load
    as exactly the adapter whose weights it holds (outputs, config, K and, for a trainable load, the mask)."""
    shutil.copy(adapters[weights]["folder"] / "adapter_model.safetensors", tmp_path)
    shutil.copy(adapters[config]["folder"] / "adapter_config.json", tmp_path)
    clean = PeftModel.from_pretrained(tiny_llama(), adapters[weights]["folder"], is_trainable=True)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert config_of(loaded) == config_of(clean)
    assert loaded.base_model.num_trainable == clean.base_model.num_trainable
    assert torch.equal(loaded.base_model.mask, clean.base_model.mask)
    assert torch.equal(logits(loaded.eval()), logits(clean.eval()))
