import pytest

from benchmarks.conll04.data import Entity, Relation, Sentence
from benchmarks.conll04.metrics import evaluate, prf

PEOP, ORG, LOC = Entity(0, 2, "Peop"), Entity(4, 6, "Org"), Entity(7, 8, "Loc")
GOLD = Sentence(
    tokens="John Smith works for Acme Corp in Boston .".split(),
    entities=[PEOP, ORG, LOC],
    relations=[Relation("Work_For", 0, 1), Relation("OrgBased_In", 1, 2), Relation("Live_In", 0, 2)],
)


def test_prf():
    assert prf(2, 4, 3) == pytest.approx((50.0, 200 / 3, 400 / 7))
    assert prf(0, 0, 5) == (0.0, 0.0, 0.0)
    assert prf(0, 5, 0) == (0.0, 0.0, 0.0)
    assert prf(0, 0, 0) == (0.0, 0.0, 0.0)
    assert prf(3, 3, 3) == (100.0, 100.0, 100.0)


def test_perfect_prediction():
    scores = evaluate([GOLD], [(list(GOLD.entities), list(GOLD.relations))])
    assert scores["entity_f1"] == scores["relation_f1"] == 100.0
    assert scores["entity_correct"] == 3 and scores["relation_correct"] == 3
    assert scores["sentences"] == 1


def test_partial_prediction():
    wrong_type = Entity(4, 6, "Loc")
    spurious = Entity(2, 3, "Other")
    entities = [PEOP, wrong_type, LOC, spurious]
    relations = [Relation("Work_For", 0, 1), Relation("Live_In", 0, 2)]
    scores = evaluate([GOLD], [(entities, relations)])
    assert (scores["entity_gold"], scores["entity_predicted"], scores["entity_correct"]) == (3, 4, 2)
    assert scores["entity_precision"] == pytest.approx(50.0)
    assert scores["entity_recall"] == pytest.approx(200 / 3)
    assert scores["entity_f1"] == pytest.approx(400 / 7)
    assert (scores["relation_gold"], scores["relation_predicted"], scores["relation_correct"]) == (3, 2, 1)
    assert scores["relation_precision"] == pytest.approx(50.0)
    assert scores["relation_recall"] == pytest.approx(100 / 3)
    assert scores["relation_f1"] == pytest.approx(40.0)


def test_relation_needs_exact_spans_and_types():
    cases = [
        [Entity(0, 1, "Peop"), ORG],
        [PEOP, Entity(4, 7, "Org")],
        [Entity(0, 2, "Other"), ORG],
    ]
    for entities in cases:
        scores = evaluate([GOLD], [(entities, [Relation("Work_For", 0, 1)])])
        assert scores["relation_correct"] == 0 and scores["relation_f1"] == 0.0
    scores = evaluate([GOLD], [([PEOP, ORG], [Relation("Kill", 0, 1)])])
    assert scores["relation_correct"] == 0
    scores = evaluate([GOLD], [([ORG, PEOP], [Relation("Work_For", 1, 0)])])
    assert scores["relation_correct"] == 1 and scores["relation_precision"] == 100.0


def test_zero_predictions():
    scores = evaluate([GOLD], [([], [])])
    assert scores["entity_predicted"] == scores["relation_predicted"] == 0
    assert scores["entity_gold"] == 3 and scores["relation_gold"] == 3
    for kind in ("entity", "relation"):
        assert scores[f"{kind}_precision"] == scores[f"{kind}_recall"] == scores[f"{kind}_f1"] == 0.0


def test_zero_gold():
    empty = Sentence(tokens=GOLD.tokens)
    scores = evaluate([empty], [([PEOP, ORG], [Relation("Work_For", 0, 1)])])
    assert scores["entity_gold"] == 0 and scores["entity_predicted"] == 2
    assert scores["relation_gold"] == 0 and scores["relation_predicted"] == 1
    for kind in ("entity", "relation"):
        assert scores[f"{kind}_precision"] == scores[f"{kind}_recall"] == scores[f"{kind}_f1"] == 0.0
    scores = evaluate([empty], [([], [])])
    assert scores["entity_f1"] == scores["relation_f1"] == 0.0
    assert evaluate([], [])["entity_f1"] == 0.0


def test_duplicates_count_once():
    entities = [PEOP, ORG, PEOP]
    relations = [Relation("Work_For", 0, 1), Relation("Work_For", 2, 1)]
    scores = evaluate([GOLD], [(entities, relations)])
    assert scores["entity_predicted"] == 2 and scores["entity_correct"] == 2
    assert scores["relation_predicted"] == 1 and scores["relation_correct"] == 1


def test_micro_average_over_sentences():
    other = Sentence(tokens=["Paris"], entities=[Entity(0, 1, "Loc")])
    predictions = [([PEOP, ORG, LOC], []), ([Entity(0, 1, "Org")], [])]
    scores = evaluate([GOLD, other], predictions)
    assert (scores["entity_gold"], scores["entity_predicted"], scores["entity_correct"]) == (4, 4, 3)
    assert scores["entity_f1"] == pytest.approx(75.0)
    assert scores["relation_recall"] == 0.0


def test_invalid_inputs():
    with pytest.raises(ValueError):
        evaluate([GOLD], [])
    with pytest.raises(ValueError):
        evaluate([GOLD], [([PEOP], [Relation("Work_For", 0, 1)])])
