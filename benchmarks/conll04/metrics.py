"""Micro-averaged entity F1 and strict relation F1 for CoNLL'04."""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.conll04.data import Entity, Relation, Sentence

Prediction = tuple[Sequence[Entity], Sequence[Relation]]
_EntityKey = tuple[int, int, str]
_RelationKey = tuple[str, _EntityKey, _EntityKey]
COUNT_KEYS = tuple(f"{kind}_{count}" for kind in ("entity", "relation") for count in ("gold", "predicted", "correct"))


def _entity_key(entity: Entity) -> _EntityKey:
    return (entity.start, entity.end, entity.type)


def _relation_keys(entities: Sequence[Entity], relations: Sequence[Relation]) -> set[_RelationKey]:
    keys = set()
    for relation in relations:
        for index in (relation.head, relation.tail):
            if not 0 <= index < len(entities):
                raise ValueError(f"relation {relation} refers to a missing entity")
        keys.add((relation.type, _entity_key(entities[relation.head]), _entity_key(entities[relation.tail])))
    return keys


def prf(correct: int, predicted: int, gold: int) -> tuple[float, float, float]:
    """Precision, recall and F1 in percent; each is 0.0 when its denominator is zero."""
    precision = 100.0 * correct / predicted if predicted else 0.0
    recall = 100.0 * correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def sentence_counts(gold: Sequence[Sentence], predicted: Sequence[Prediction]) -> list[dict[str, int]]:
    """Per sentence: ``{entity,relation}_{gold,predicted,correct}`` counts (duplicates count once).

    An entity is correct when its span and type match; a relation is correct (strict) when its
    type, head span and type, and tail span and type all match.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predictions")
    rows = []
    for sentence, (entities, relations) in zip(gold, predicted):
        row = {}
        for kind, gold_set, predicted_set in (
            ("entity", {_entity_key(e) for e in sentence.entities}, {_entity_key(e) for e in entities}),
            ("relation", _relation_keys(sentence.entities, sentence.relations), _relation_keys(entities, relations)),
        ):
            row[f"{kind}_gold"] = len(gold_set)
            row[f"{kind}_predicted"] = len(predicted_set)
            row[f"{kind}_correct"] = len(gold_set & predicted_set)
        rows.append(row)
    return rows


def evaluate(gold: Sequence[Sentence], predicted: Sequence[Prediction]) -> dict:
    """Score predictions against gold sentences, micro-averaged over the corpus (see `sentence_counts`).

    Returns ``{entity,relation}_{precision,recall,f1}`` in percent and the
    ``{entity,relation}_{gold,predicted,correct}`` counts.
    """
    rows = sentence_counts(gold, predicted)
    counts = {key: sum(row[key] for row in rows) for key in COUNT_KEYS}
    result: dict = {}
    for kind in ("entity", "relation"):
        precision, recall, f1 = prf(counts[f"{kind}_correct"], counts[f"{kind}_predicted"], counts[f"{kind}_gold"])
        result[f"{kind}_precision"] = precision
        result[f"{kind}_recall"] = recall
        result[f"{kind}_f1"] = f1
    result.update(counts)
    result["sentences"] = len(gold)
    return result
