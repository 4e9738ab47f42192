import json

import pytest

from benchmarks.conll04 import rescore
from benchmarks.conll04.data import load_types
from benchmarks.conll04.report import load_runs
from benchmarks.conll04.significance import count_matrix
from benchmarks.conll04.tanl import SCORING, format_target
from benchmarks.conll04.training import eval_sentences

TYPES = load_types()
LIMIT = 6


def run_record(method: str, texts: list[str], entity_f1: float, relation_f1: float, **extra) -> dict:
    return {"method": method, "train_fraction": 0.05, "seed": 0, "entity_f1": entity_f1, "relation_f1": relation_f1,
            "scores": {"entity_f1": entity_f1, "relation_f1": relation_f1}, "eval_split": "dev",
            "eval_limit": LIMIT, "eval_sentences": LIMIT, "run_spec": {"method": method}, **extra,
            "predictions": texts}


@pytest.fixture()
def results(tmp_path):
    gold = eval_sentences("dev", LIMIT)
    targets = [format_target(s, TYPES) for s in gold]
    (tmp_path / "lr_selection").mkdir()
    for path, record in (
        ("fishdip-0.05-0.json", run_record("fishdip", targets, 50.0, 40.0)),
        ("lr_selection/houlsby-lr0.001.json", run_record("houlsby", ["" for _ in gold], 60.0, 20.0, learning_rate=1e-3)),
        ("lr_selection/houlsby-lr0.003.json", run_record("houlsby", targets, 55.0, 20.0, learning_rate=3e-3)),
    ):
        (tmp_path / path).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    (tmp_path / "quick_timing.json").write_text('{"wall_seconds": 1.0, "runs": 3}\n', encoding="utf-8")
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    lr_file = tmp_path / "lr_selection.json"
    lr_file.write_text(json.dumps({"methods": {"houlsby": {"selected": 1e-3}}}), encoding="utf-8")
    return tmp_path, lr_file, gold


def test_rescore_rewrites_scores_and_keeps_the_first_old_ones(results, capsys):
    folder, lr_file, gold = results
    untouched = {p: p.read_bytes() for p in (folder / "quick_timing.json", folder / "broken.json")}
    argv = ["--results-dir", str(folder), "--lr-file", str(lr_file)]
    assert rescore.main(argv) == 0

    record = json.loads((folder / "fishdip-0.05-0.json").read_text(encoding="utf-8"))
    assert record["scoring"] == SCORING
    assert record["entity_f1"] == record["relation_f1"] == 100.0
    assert record["scores"]["entity_f1"] == 100.0 and record["scores"]["sentences"] == LIMIT
    assert record["scores_before_rescore"] == {"scoring": rescore.UNVERSIONED, "entity_f1": 50.0, "relation_f1": 40.0,
                                               "scores": {"entity_f1": 50.0, "relation_f1": 40.0}}
    assert record["run_spec"] == {"method": "fishdip"} and record["predictions"]
    assert list(record)[list(record).index("scores") + 1] == "scoring"
    # The report still reads the run, and the bootstrap's re-scoring agrees with the stored F1.
    assert {r["_file"] for r in load_runs(folder)} == {"fishdip-0.05-0.json"}
    assert count_matrix(record, gold, TYPES).shape == (LIMIT, 6)
    for path, content in untouched.items():
        assert path.read_bytes() == content

    report = (folder / "RESCORE.md").read_text(encoding="utf-8")
    assert f"`python -m benchmarks.conll04.rescore --results-dir {folder} --lr-file {lr_file}`" in report
    assert "| fishdip-0.05-0.json | dev, 6 sentences | 50.00 -> 100.00 (+50.00) | 40.00 -> 100.00 (+60.00) |" in report
    assert "3 runs, 3 changed" in report
    assert "| houlsby | 0.001 | 0.001 (40.00) | 0.003 (100.00) **differs** |" in report
    assert report in capsys.readouterr().out

    # Running again changes no file and keeps the original old scores.
    snapshot = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert rescore.main(argv) == 0
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == snapshot


def test_dry_run_writes_nothing(results):
    folder, lr_file, _ = results
    snapshot = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert rescore.main(["--results-dir", str(folder), "--lr-file", str(lr_file), "--dry-run"]) == 0
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == snapshot


def test_predictions_must_fit_the_gold_sentences(results):
    folder, lr_file, _ = results
    path = folder / "fishdip-0.05-0.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**record, "predictions": record["predictions"][:-1]}), encoding="utf-8")
    with pytest.raises(ValueError, match="fishdip-0.05-0.json"):
        rescore.main(["--results-dir", str(folder), "--lr-file", str(lr_file)])


def test_is_run():
    assert rescore.is_run({"predictions": [], "eval_split": "test"})
    assert not rescore.is_run({"predictions": []})
    assert not rescore.is_run({"eval_split": "test", "wall_seconds": 3.0})
    assert not rescore.is_run([1, 2])
