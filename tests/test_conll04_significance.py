"""Paired bootstrap of F1 gaps (benchmarks/conll04/significance.py) and the report's use of it."""

import numpy as np
import pytest

from benchmarks.conll04 import report
from benchmarks.conll04.data import load_split, load_types
from benchmarks.conll04.metrics import COUNT_KEYS, prf
from benchmarks.conll04.significance import count_matrix, micro_f1, paired_bootstrap
from benchmarks.conll04.tanl import format_target


def counts(rows: list[dict]) -> np.ndarray:
    return np.array([[row.get(key, 0) for key in COUNT_KEYS] for row in rows], dtype=np.float64)


def sentence(gold: int, predicted: int, correct: int, relations: tuple[int, int, int] = (0, 0, 0)) -> dict:
    return {"entity_gold": gold, "entity_predicted": predicted, "entity_correct": correct,
            "relation_gold": relations[0], "relation_predicted": relations[1], "relation_correct": relations[2]}


def test_micro_f1_matches_prf() -> None:
    totals = counts([sentence(3, 4, 2, (5, 0, 0))]).sum(0)
    entity, relation = micro_f1(totals)
    assert entity == pytest.approx(prf(2, 4, 3)[2])
    assert relation == 0.0
    assert micro_f1(np.zeros(len(COUNT_KEYS))).tolist() == [0.0, 0.0]


def test_identical_runs_have_a_zero_gap() -> None:
    run = counts([sentence(3, 2, 1, (1, 1, 1)), sentence(2, 4, 2, (2, 1, 0))] * 10)
    gaps = paired_bootstrap([run], [run.copy()], resamples=500)
    assert gaps == {"entity": (0.0, 0.0, 0.0), "relation": (0.0, 0.0, 0.0)}


def test_a_gap_on_every_sentence_is_beyond_noise_and_one_sentence_is_not() -> None:
    better = counts([sentence(2, 2, 2)] * 100)
    worse = counts([sentence(2, 2, 1)] * 100)
    gap, low, high = paired_bootstrap([better], [worse], resamples=2000)["entity"]
    assert gap == pytest.approx(50.0) and 0 < low <= gap <= high
    one_off = counts([sentence(2, 2, 1)] + [sentence(2, 2, 2)] * 99)
    gap, low, high = paired_bootstrap([better], [one_off], resamples=2000)["entity"]
    assert gap == pytest.approx(0.5) and low <= 0 <= high


def test_seeds_are_paired_and_averaged() -> None:
    a = [counts([sentence(2, 2, 2)] * 20), counts([sentence(2, 2, 1)] * 20)]
    b = [counts([sentence(2, 2, 1)] * 20), counts([sentence(2, 2, 1)] * 20)]
    gap, low, high = paired_bootstrap(a, b, resamples=500)["entity"]
    assert gap == pytest.approx(25.0) and low == pytest.approx(25.0) and high == pytest.approx(25.0)
    with pytest.raises(ValueError, match="same number"):
        paired_bootstrap(a, b[:1])
    with pytest.raises(ValueError, match="same sentences"):
        paired_bootstrap([a[0]], [counts([sentence(2, 2, 1)] * 19)])


def record(method: str, texts: list[str], entity_f1: float, relation_f1: float) -> dict:
    return {"method": method, "train_fraction": 0.05, "seed": 0, "predictions": texts,
            "entity_f1": entity_f1, "relation_f1": relation_f1, "eval_split": "test", "eval_limit": None}


def test_count_matrix_rescores_stored_predictions_and_checks_them() -> None:
    gold, types = load_split("test")[:3], load_types()
    perfect = record("fishdip", [format_target(s, types) for s in gold], 100.0, 100.0)
    matrix = count_matrix(perfect, gold, types)
    assert matrix.shape == (3, len(COUNT_KEYS))
    assert micro_f1(matrix.sum(0)).tolist() == [100.0, 100.0]
    with pytest.raises(ValueError, match="recorded 90.0000"):
        count_matrix({**perfect, "entity_f1": 90.0}, gold, types)
    with pytest.raises(ValueError, match="2 predictions for 3 sentences"):
        count_matrix({**perfect, "predictions": perfect["predictions"][:2]}, gold, types)


def test_report_significance_table_from_stored_predictions() -> None:
    gold, types = load_split("test"), load_types()
    runs = [record("fishdip", [format_target(s, types) for s in gold], 100.0, 100.0),
            record("lora", [" ".join(s.tokens) for s in gold], 0.0, 0.0),
            {**record("full-ft", [], 0.0, 0.0), "predictions": None}]
    lines = report.significance_section(runs, report.SentenceCounts())
    rows = [line for line in lines if line.startswith("| 5% |")]
    assert rows == ["| 5% | LoRA | 1 | **+100.0 [+100.0, +100.0]** | **+100.0 [+100.0, +100.0]** |"]
    assert report.significance_section(runs[1:], report.SentenceCounts())[0].startswith("No FISH-DIP run")


def test_resamples_are_paired_by_sentence() -> None:
    # Sentences differ far more from each other than the two runs differ on any sentence; resampling the
    # runs independently would give an interval reaching far below 0.
    ours = counts([sentence(10, 10, 10), sentence(10, 10, 0)] * 50)
    theirs = ours.copy()
    theirs[0, COUNT_KEYS.index("entity_correct")] = 9
    gap, low, high = paired_bootstrap([ours], [theirs], resamples=2000)["entity"]
    assert 0 <= low <= gap <= high < 0.5
