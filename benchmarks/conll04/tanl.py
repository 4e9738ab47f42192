"""TANL augmented natural language for joint entity-relation extraction (Paolini et al., 2021).

The target is the input sentence in which each entity is written in place as
``[ entity words | type | relation = tail words | relation2 = tail2 words ]``, for example::

    [ Kenneth Adelman | people | work for = Arms Control and Disarmament Agency ] , director
    of the [ Arms Control and Disarmament Agency | organization ] ...

Type and relation names are the lowercased ``verbose`` names of ``types.json``; a relation is
written in its head entity, tails ordered by position.

Relations are read with TANL's definitions (``JointEROutputFormat.run_inference`` in Paolini et
al.'s code), stricter than matching the input ("tanl-strict", `SCORING`):

- A tail is named by its words and resolves to a returned entity whose *generated* name (the words
  written inside its brackets, exactly, case included) is those words. The input words under the
  span an entity aligned to are never used: a model that writes ``[ ACME Corp | organization ]`` for
  the input's "Acme Corp" cannot then refer to it as ``= Acme Corp``.
- The head is a candidate like any other entity. A relation whose tail resolves to its own head is
  kept as a prediction (no gold relation has that form, so it scores as a false positive).

Tail disambiguation: the candidates of a tail are the returned entities named by its words, the
head included, in sentence order. A plain reference means the candidate nearest to the head
(distance between start tokens, ties to the earlier), so it means the head itself whenever the head
has those words (distance 0). Where the gold tail is not the nearest candidate (e.g. a sentence that
mentions "Sao Paulo" three times), the target adds its 1-based rank among the candidates:
``organization based in = Sao Paulo # 1``; a rank outside 1..candidates falls back to the nearest.
TANL sorts candidates by the gap between spans rather than by start tokens and cannot round-trip
these references; with the suffix every gold target of train, dev and test parses back to exactly its
gold entities and relations. No gold relation has a tail with its head's words, so counting the head
among the candidates changes no gold target: the suffix is needed 18 times in train, 9 in dev and 12
in test.

A model's text may be decoded with the tokenizer's clean-up of spaces, which removes the space
before ``.``, ``,``, ``?``, ``!``, ``n't`` and ``'s``-like words (``"] ,"`` becomes ``"],"``,
``"Washington , D.C."`` becomes ``"Washington, D.C."``, ``"U.S. 's"`` becomes ``"U.S.'s"``). Such text
parses as the spaced text does: brackets, bars and ``=`` are split from the words around them, the
alignment matches a fused word to the input words it joins (`align_spans`), and the clean-up
rewrites an entity's name and a tail reference to it alike. Gold targets put through the clean-up
still round-trip to 100 F1; without the fused matches, "Washington, D.C." and "$1,600" lost their
spans and the cleaned targets of each split scored about 97 entity and 95 relation F1.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from benchmarks.conll04.data import Entity, Relation, Sentence

MATCH_SCORE = 2.0
CASE_MATCH_SCORE = 1.0
MISMATCH_SCORE = -1.0
GAP_SCORE = -1.0
MAX_FUSED_WORDS = 8
CLEANED_UP_PREFIXES = frozenset(".?!,'")

SCORING = "tanl-strict-1"
"""Names the parsing and scoring rules above; a run scored under other rules records another name."""

_PIECE = re.compile(r"[\[\]|=]|[^\s\[\]|=]+")
_ATTACHED_RANK = re.compile(r"#(\d+)")

Words = tuple[str, ...]


@dataclass
class _RawEntity:
    first: int
    words: list[str] = field(default_factory=list)
    tags: list[list[str]] = field(default_factory=list)


def _normalize(name: str) -> str:
    return " ".join(name.lower().split())


def natural_names(types: dict) -> tuple[dict[str, str], dict[str, str]]:
    """Map entity and relation type keys to their natural names (lowercased ``verbose``)."""
    entities = {key: _normalize(spec["verbose"]) for key, spec in types["entities"].items()}
    relations = {key: _normalize(spec["verbose"]) for key, spec in types["relations"].items()}
    return entities, relations


def format_input(sentence: Sentence) -> str:
    """The plain sentence: tokens joined by single spaces."""
    return " ".join(sentence.tokens)


def _tail_candidates(names: Sequence[Iterable[Words]], starts: Sequence[int], words: Words) -> list[int]:
    """The entities named by `words` (the head included), in sentence order."""
    matches = [i for i, entity_names in enumerate(names) if words in entity_names]
    return sorted(matches, key=lambda i: (starts[i], i))


def _nearest(candidates: list[int], starts: Sequence[int], head: int) -> int:
    return min(candidates, key=lambda i: (abs(starts[i] - starts[head]), starts[i], i))


def _tail_reference(sentence: Sentence, relation: Relation) -> str:
    words = [tuple(sentence.tokens[e.start : e.end]) for e in sentence.entities]
    starts = [e.start for e in sentence.entities]
    tail_words = words[relation.tail]
    candidates = _tail_candidates([{w} for w in words], starts, tail_words)
    text = " ".join(tail_words)
    if _nearest(candidates, starts, relation.head) == relation.tail:
        return text
    return f"{text} # {candidates.index(relation.tail) + 1}"


def format_target(sentence: Sentence, types: dict) -> str:
    """The TANL augmented sentence for ``sentence`` (entities must not overlap)."""
    entity_names, relation_names = natural_names(types)
    entities = sentence.entities
    order = sorted(range(len(entities)), key=lambda i: entities[i].start)
    for previous, current in zip(order, order[1:]):
        if entities[current].start < entities[previous].end:
            raise ValueError(f"overlapping entities in sentence {sentence.orig_id}")
    outgoing: dict[int, list[Relation]] = defaultdict(list)
    for relation in sentence.relations:
        outgoing[relation.head].append(relation)

    by_start = {entities[i].start: i for i in order}
    pieces: list[str] = []
    position = 0
    while position < len(sentence.tokens):
        index = by_start.get(position)
        if index is None:
            pieces.append(sentence.tokens[position])
            position += 1
            continue
        entity = entities[index]
        tags = [entity_names[entity.type]]
        for relation in sorted(outgoing[index], key=lambda r: (entities[r.tail].start, r.type)):
            tags.append(f"{relation_names[relation.type]} = {_tail_reference(sentence, relation)}")
        words = " ".join(sentence.tokens[entity.start : entity.end])
        pieces.append(f"[ {words} | {' | '.join(tags)} ]")
        position = max(entity.end, position + 1)
    return " ".join(pieces)


def _scan(generated: str) -> tuple[list[str], list[_RawEntity]]:
    """Split generated text into its plain words and bracketed entities, tolerating bad syntax."""
    plain: list[str] = []
    raw_entities: list[_RawEntity] = []
    current: _RawEntity | None = None
    for piece in _PIECE.findall(generated):
        if piece == "[":
            if current is not None:
                raw_entities.append(current)
            current = _RawEntity(first=len(plain))
        elif piece == "]":
            if current is not None:
                raw_entities.append(current)
                current = None
        elif current is None:
            if piece not in ("|", "="):
                plain.append(piece)
        elif piece == "|":
            current.tags.append([])
        elif current.tags:
            current.tags[-1].append(piece)
        elif piece != "=":
            current.words.append(piece)
            plain.append(piece)
    if current is not None:
        raw_entities.append(current)
    return plain, raw_entities


def _similarity(a: str, b: str) -> float:
    if a == b:
        return MATCH_SCORE
    if a.lower() == b.lower():
        return CASE_MATCH_SCORE
    return MISMATCH_SCORE


def _fusable(left: str, right: str) -> bool:
    """Whether the tokenizer's clean-up of spaces removes the space between these two words.

    The clean-up (``PreTrainedTokenizerBase.clean_up_tokenization`` in transformers) removes the
    space before ``.``, ``?``, ``!``, ``,``, ``n't``, ``'s``, ``'m``, ``'ve`` and ``'re`` and both spaces
    around a lone ``'``; any word that starts with ``'`` is accepted here.
    """
    return right[:1] in CLEANED_UP_PREFIXES or right.startswith("n't") or left == "'"


def _fusions(source: Sequence[str], target: Sequence[str]) -> dict[tuple[int, int], list[tuple[int, float]]]:
    """Where a source word is two or more consecutive target words that the clean-up of spaces fused.

    Returns ``{(i, end): [(start, score), ...]}`` for each ``source[i] == "".join(target[start:end])``
    (or equal up to case), scored as ``end - start`` matches (or case matches).
    """
    fusions: dict[tuple[int, int], list[tuple[int, float]]] = defaultdict(list)
    lowered = [word.lower() for word in target]
    for i, word in enumerate(source):
        low = word.lower()
        for start in range(len(target)):
            if not lowered[start] or len(lowered[start]) >= len(low) or not low.startswith(lowered[start]):
                continue
            joined = lowered[start]
            for end in range(start + 2, min(len(target), start + MAX_FUSED_WORDS) + 1):
                if not _fusable(target[end - 2], target[end - 1]):
                    break
                joined += lowered[end - 1]
                if not low.startswith(joined):
                    break
                if len(joined) == len(low):
                    exact = word == "".join(target[start:end])
                    fusions[(i, end)].append((start, (end - start) * (MATCH_SCORE if exact else CASE_MATCH_SCORE)))
                    break
    return fusions


def align_spans(source: Sequence[str], target: Sequence[str]) -> list[tuple[int, int] | None]:
    """Needleman-Wunsch global alignment of two word sequences.

    Returns, for each source position, the span ``(start, end)`` of target positions it is aligned
    to, or ``None`` when the source word is aligned to a gap. A source word matches or substitutes
    one target word, or matches two or more consecutive target words that it writes without the
    spaces a tokenizer's clean-up of spaces removes (``"Washington,"`` for ``"Washington" ","``,
    ``"U.S.'s"`` for ``"U.S." "'s"``; see `_fusable`), scored as that many matches.
    """
    if list(source) == list(target):
        return [(j, j + 1) for j in range(len(source))]
    n, m = len(source), len(target)
    fusions = _fusions(source, target)
    score = [[j * GAP_SCORE for j in range(m + 1)]]
    for i in range(1, n + 1):
        previous, row, word = score[i - 1], [i * GAP_SCORE], source[i - 1]
        for j in range(1, m + 1):
            best = max(
                previous[j - 1] + _similarity(word, target[j - 1]),
                previous[j] + GAP_SCORE,
                row[j - 1] + GAP_SCORE,
            )
            for start, gain in fusions.get((i - 1, j), ()):
                best = max(best, previous[start] + gain)
            row.append(best)
        score.append(row)

    spans: list[tuple[int, int] | None] = [None] * n
    i, j = n, m
    while i > 0 and j > 0:
        if score[i][j] == score[i - 1][j - 1] + _similarity(source[i - 1], target[j - 1]):
            spans[i - 1] = (j - 1, j)
            i, j = i - 1, j - 1
            continue
        fused = next((start for start, gain in fusions.get((i - 1, j), ()) if score[i][j] == score[i - 1][start] + gain),
                     None)
        if fused is not None:
            spans[i - 1] = (fused, j)
            i, j = i - 1, fused
        elif score[i][j] == score[i - 1][j] + GAP_SCORE:
            i -= 1
        else:
            j -= 1
    return spans


def align(source: Sequence[str], target: Sequence[str]) -> list[int | None]:
    """For each source position, the first target position :func:`align_spans` aligns it to, or ``None``."""
    return [span[0] if span else None for span in align_spans(source, target)]


def _split_rank(words: list[str]) -> tuple[Words, int | None]:
    if len(words) >= 3 and words[-2] == "#" and words[-1].isdigit():
        return tuple(words[:-2]), int(words[-1])
    if len(words) >= 2 and (match := _ATTACHED_RANK.fullmatch(words[-1])):
        return tuple(words[:-1]), int(match.group(1))
    return tuple(words), None


def parse_output(generated: str, input_tokens: Sequence[str], types: dict) -> tuple[list[Entity], list[Relation]]:
    """Parse a generated TANL sentence into entities (input token spans) and relations.

    Never raises on malformed text. Plain words are aligned to ``input_tokens`` with
    :func:`align_spans`; an entity spans the input tokens its words align to and is dropped when
    none align, when its type is missing or unknown, or when it repeats an earlier entity.
    A text ``[`` inside an open entity closes it; a missing ``]`` is implied at the next
    ``[`` or at the end of the text.

    A relation is kept when its name is known and its tail words are the generated name of a
    returned entity (every bracket that produced the entity adds its name; the input words of the
    span do not count). Among several such entities, the head included, a ``# k`` suffix picks
    the k-th in sentence order and a plain reference the one whose start is nearest to the head's,
    which is the head itself when the head has those words: such a relation is kept, with
    ``head == tail`` (see the module docstring). Relations refer to the returned entity list,
    without duplicates.
    """
    entity_names, relation_names = natural_names(types)
    entity_by_name = {name: key for key, name in entity_names.items()}
    relation_by_name = {name: key for key, name in relation_names.items()}
    plain, raw_entities = _scan(generated)
    spans = align_spans(plain, list(input_tokens))

    entities: list[Entity] = []
    names: list[set[Words]] = []
    index_of: dict[Entity, int] = {}
    raw_index: list[int | None] = []
    for raw in raw_entities:
        entity_type = entity_by_name.get(_normalize(" ".join(raw.tags[0]))) if raw.tags else None
        aligned = [span for span in spans[raw.first : raw.first + len(raw.words)] if span is not None]
        if entity_type is None or not aligned:
            raw_index.append(None)
            continue
        entity = Entity(min(span[0] for span in aligned), max(span[1] for span in aligned), entity_type)
        if entity not in index_of:
            index_of[entity] = len(entities)
            entities.append(entity)
            names.append(set())
        names[index_of[entity]].add(tuple(raw.words))
        raw_index.append(index_of[entity])

    starts = [e.start for e in entities]
    relations: list[Relation] = []
    for raw, head in zip(raw_entities, raw_index):
        if head is None:
            continue
        for tag in raw.tags[1:]:
            if "=" not in tag:
                continue
            split = tag.index("=")
            relation_type = relation_by_name.get(_normalize(" ".join(tag[:split])))
            tail_words, rank = _split_rank([p for p in tag[split + 1 :] if p != "="])
            if relation_type is None or not tail_words:
                continue
            candidates = _tail_candidates(names, starts, tail_words)
            if not candidates:
                continue
            if rank is not None and 1 <= rank <= len(candidates):
                tail = candidates[rank - 1]
            else:
                tail = _nearest(candidates, starts, head)
            relation = Relation(relation_type, head, tail)
            if relation not in relations:
                relations.append(relation)
    return entities, relations
