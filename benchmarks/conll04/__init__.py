"""CoNLL'04 joint entity-relation extraction in the TANL format."""

from benchmarks.conll04.data import Entity, Relation, Sentence, load_split, load_types, train_subset
from benchmarks.conll04.metrics import evaluate
from benchmarks.conll04.tanl import format_input, format_target, parse_output

__all__ = [
    "Entity",
    "Relation",
    "Sentence",
    "evaluate",
    "format_input",
    "format_target",
    "load_split",
    "load_types",
    "parse_output",
    "train_subset",
]
