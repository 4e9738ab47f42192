"""Loading the CoNLL'04 corpus (SpERT JSON layout) shipped in ``data/``."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Entity:
    """A typed token span; ``start`` is inclusive and ``end`` exclusive."""

    start: int
    end: int
    type: str


@dataclass(frozen=True)
class Relation:
    """A directed relation; ``head`` and ``tail`` index the sentence's entity list."""

    type: str
    head: int
    tail: int


@dataclass
class Sentence:
    """A tokenized sentence with its gold entities and relations."""

    tokens: list[str]
    entities: list[Entity] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)
    orig_id: int | None = None


def _sentence_from_json(record: dict) -> Sentence:
    return Sentence(
        tokens=list(record["tokens"]),
        entities=[Entity(e["start"], e["end"], e["type"]) for e in record["entities"]],
        relations=[Relation(r["type"], r["head"], r["tail"]) for r in record["relations"]],
        orig_id=record.get("orig_id"),
    )


def load_split(name: str, data_dir: str | Path = DEFAULT_DATA_DIR) -> list[Sentence]:
    """Load one split (``train``, ``dev`` or ``test``) as a list of sentences."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
    with open(Path(data_dir) / f"{name}.json", encoding="utf-8") as f:
        return [_sentence_from_json(record) for record in json.load(f)]


def load_types(data_dir: str | Path = DEFAULT_DATA_DIR) -> dict:
    """Load ``types.json``: ``{"entities": {key: {...}}, "relations": {key: {...}}}``."""
    with open(Path(data_dir) / "types.json", encoding="utf-8") as f:
        return json.load(f)


def train_subset(sentences: list[Sentence], fraction: float, seed: int) -> list[Sentence]:
    """Deterministic subset of ``round(fraction * len)`` sentences (at least one), in corpus order.

    The subset depends only on ``(len(sentences), fraction, seed)``, so every method that asks
    for the same fraction and seed trains on the same sentences.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not sentences:
        return []
    size = max(1, round(fraction * len(sentences)))
    indices = sorted(random.Random(seed).sample(range(len(sentences)), size))
    return [sentences[i] for i in indices]
