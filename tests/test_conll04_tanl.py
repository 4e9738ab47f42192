import hashlib
from pathlib import Path

import pytest

from benchmarks.conll04.data import DEFAULT_DATA_DIR, Entity, Relation, Sentence, load_split, load_types, train_subset
from benchmarks.conll04.metrics import evaluate
from benchmarks.conll04.tanl import align, align_spans, format_input, format_target, natural_names, parse_output

TYPES = load_types()
SPLIT_SIZES = {"train": 922, "dev": 231, "test": 288}
RANKED_REFERENCES = {"train": 18, "dev": 9, "test": 12}
SHA256 = {
    "train": "65c52d5b6134c72c44277c74c5ecb354bf33aa352fc7b856edf6bda0bb436eea",
    "dev": "3965a5110a79671fb74a78c0fd0113c4da6583c3833bd418c1ca414bb491e010",
    "test": "347f45cf181b5641d2373248a1af0592954415234f72536835dde1df1b504556",
    "types": "9244d21d2640430f03eda97f59ce3e0a28a766964b1c04683c80656b5e505ad8",
}

TOKENS = "John Smith works for Acme Corp in Boston .".split()
JOHN, ACME, BOSTON = Entity(0, 2, "Peop"), Entity(4, 6, "Org"), Entity(7, 8, "Loc")
SENTENCE = Sentence(
    tokens=TOKENS,
    entities=[JOHN, ACME, BOSTON],
    relations=[Relation("Work_For", 0, 1), Relation("OrgBased_In", 1, 2), Relation("Live_In", 0, 2)],
    orig_id=1,
)
TARGET = (
    "[ John Smith | people | work for = Acme Corp | live in = Boston ] works for "
    "[ Acme Corp | organization | organization based in = Boston ] in [ Boston | location ] ."
)


def parse(text: str, tokens: list[str] = TOKENS) -> tuple[list[Entity], list[Relation]]:
    return parse_output(text, tokens, TYPES)


def triples(entities: list[Entity], relations: list[Relation]) -> set[tuple]:
    return {(r.type, entities[r.head], entities[r.tail]) for r in relations}


@pytest.fixture(scope="module", params=list(SPLIT_SIZES))
def split(request) -> tuple[str, list[Sentence]]:
    return request.param, load_split(request.param)


def test_shipped_data_is_the_reference_corpus():
    for name, digest in SHA256.items():
        assert hashlib.sha256((Path(DEFAULT_DATA_DIR) / f"{name}.json").read_bytes()).hexdigest() == digest


def test_load_split(split):
    name, sentences = split
    assert len(sentences) == SPLIT_SIZES[name]
    first = sentences[0]
    assert all(isinstance(e, Entity) for e in first.entities)
    assert all(isinstance(r, Relation) for r in first.relations)
    assert isinstance(first.orig_id, int)


def test_load_split_counts_match_readme():
    train = load_split("train")
    assert sum(len(s.tokens) for s in train) == 26525
    assert sum(len(s.entities) for s in train) == 3377
    assert sum(len(s.relations) for s in train) == 1283


def test_natural_names():
    entities, relations = natural_names(TYPES)
    assert entities == {"Loc": "location", "Org": "organization", "Peop": "people", "Other": "other"}
    assert relations["OrgBased_In"] == "organization based in"
    assert relations["Work_For"] == "work for"


def test_train_subset_is_deterministic():
    train = load_split("train")
    subset = train_subset(train, 0.05, seed=0)
    assert len(subset) == 46
    assert [s.orig_id for s in subset] == [s.orig_id for s in train_subset(load_split("train"), 0.05, seed=0)]
    assert [s.orig_id for s in subset] != [s.orig_id for s in train_subset(train, 0.05, seed=1)]
    positions = [train.index(s) for s in subset]
    assert positions == sorted(positions)
    assert len(train_subset(train, 1e-6, seed=0)) == 1
    assert train_subset(train, 1.0, seed=3) == train
    with pytest.raises(ValueError):
        train_subset(train, 0.0, seed=0)


def test_format_input_and_target():
    assert format_input(SENTENCE) == " ".join(TOKENS)
    assert format_target(SENTENCE, TYPES) == TARGET


def test_format_target_rejects_overlapping_entities():
    sentence = Sentence(TOKENS, [Entity(0, 2, "Peop"), Entity(1, 3, "Peop")], [])
    with pytest.raises(ValueError):
        format_target(sentence, TYPES)


def test_gold_round_trip(split):
    name, sentences = split
    predictions = []
    for sentence in sentences:
        entities, relations = parse(format_target(sentence, TYPES), sentence.tokens)
        assert entities == sentence.entities
        assert sorted(relations, key=str) == sorted(sentence.relations, key=str)
        predictions.append((entities, relations))
    scores = evaluate(sentences, predictions)
    assert scores["entity_f1"] == 100.0
    assert scores["relation_f1"] == 100.0
    ranked = sum(format_target(s, TYPES).count(" # ") for s in sentences)
    assert ranked == RANKED_REFERENCES[name]


def test_cleaned_up_gold_round_trip(split):
    """Text decoded with the tokenizer's clean-up of spaces ("Washington, D.C.", "U.S.'s") scores as spaced text."""
    clean_up = pytest.importorskip("transformers").PreTrainedTokenizerBase.clean_up_tokenization
    _, sentences = split
    targets = [clean_up(format_target(s, TYPES)) for s in sentences]
    assert sum(" " + word not in target for s, target in zip(sentences, targets) for word in s.tokens[1:]) > 100
    predictions = [parse(target, s.tokens) for s, target in zip(sentences, targets)]
    scores = evaluate(sentences, predictions)
    assert scores["entity_f1"] == 100.0
    assert scores["relation_f1"] == 100.0


def test_ranked_tail_reference():
    tokens = "Dancers of Moscow 's Bolshoi Ballet in Moscow and Leningrad".split()
    moscow1, ballet, moscow2, leningrad = (
        Entity(2, 3, "Loc"), Entity(4, 6, "Org"), Entity(7, 8, "Loc"), Entity(9, 10, "Loc"),
    )
    sentence = Sentence(
        tokens, [moscow1, ballet, moscow2, leningrad], [Relation("OrgBased_In", 1, 0), Relation("OrgBased_In", 1, 2)]
    )
    target = format_target(sentence, TYPES)
    assert "organization based in = Moscow | organization based in = Moscow # 2 ]" in target
    head = "[ Bolshoi Ballet | organization | organization based in = Moscow{} ]"
    rest = "Dancers of [ Moscow | location ] 's {} in [ Moscow | location ] and [ Leningrad | location ]"
    for suffix, tail in (("", moscow1), (" # 1", moscow1), (" # 2", moscow2), (" #2", moscow2), (" # 9", moscow1)):
        entities, relations = parse(rest.format(head.format(suffix)), tokens)
        assert triples(entities, relations) == {("OrgBased_In", ballet, tail)}



def test_tail_resolving_to_its_head_is_kept():
    text = "[ John Smith | people | work for = John Smith ] works for [ Acme Corp | organization ] in Boston ."
    entities, relations = parse(text)
    assert entities == [JOHN, ACME]
    assert relations == [Relation("Work_For", 0, 0)]
    scores = evaluate([SENTENCE], [(entities, relations)])
    assert (scores["relation_predicted"], scores["relation_correct"]) == (1, 0)


def test_head_counts_among_same_word_candidates():
    tokens = "Moscow police said Moscow was calm".split()
    moscow1, moscow2 = Entity(0, 1, "Loc"), Entity(3, 4, "Loc")
    text = "[ Moscow | location | located in = Moscow{} ] police said [ Moscow | location ] was calm"
    for suffix, tail in (("", moscow1), (" # 1", moscow1), (" # 2", moscow2), (" # 3", moscow1)):
        entities, relations = parse(text.format(suffix), tokens)
        assert entities == [moscow1, moscow2]
        assert triples(entities, relations) == {("Located_In", moscow1, tail)}


def test_tail_resolves_by_generated_names_only():
    # The second entity aligns to the input's "Acme Corp" but is written "ACME Corp": the tail
    # "Acme Corp" names no generated entity, however the span's input words read.
    text = "[ John Smith | people | work for = Acme Corp ] works for [ ACME Corp | organization ] in Boston ."
    entities, relations = parse(text)
    assert entities == [JOHN, ACME] and relations == []
    text = (
        "[ John Smith | people | work for = Acme Corporation ] works for "
        "[ Acme Corporation | organization ] in Boston ."
    )
    entities, relations = parse(text)
    assert entities == [JOHN, ACME]
    assert triples(entities, relations) == {("Work_For", JOHN, ACME)}
    text = "[ John Smith | people | live in = Boston ] works for Acme Corp in [ Boston , | location ] ."
    entities, relations = parse(text)
    assert entities == [JOHN, BOSTON] and relations == []


def test_empty_and_plain_generations():
    assert parse("") == ([], [])
    assert parse("   ") == ([], [])
    assert parse(" ".join(TOKENS)) == ([], [])
    assert parse(TARGET, []) == ([], [])


def test_unbalanced_brackets():
    entities, relations = parse("John Smith ] works for [ Acme Corp | organization ] ] in Boston .")
    assert entities == [ACME] and relations == []
    entities, _ = parse("John Smith | people ] works for [ Acme Corp | organization ] in Boston .")
    assert entities == [ACME]
    entities, _ = parse("[ John Smith | people works for [ Acme Corp | organization ] in Boston .")
    assert entities == [ACME]
    entities, relations = parse("[ John Smith | people [ Acme Corp | organization ] in [ Boston | location ] .")
    assert entities == [JOHN, ACME, BOSTON] and relations == []
    entities, _ = parse("[ [ John Smith | people ] ] works for Acme Corp in Boston .")
    assert entities == [JOHN]


def test_missing_or_unknown_types():
    assert parse("[ John Smith | ] works for Acme Corp in Boston .") == ([], [])
    assert parse("[ John Smith ] works for Acme Corp in Boston .") == ([], [])
    assert parse("[ John Smith | | people ] works for Acme Corp in Boston .") == ([], [])
    assert parse("[ John Smith | work for = Acme Corp ] works for [ Acme Corp | organization ] in Boston .") == (
        [ACME],
        [],
    )
    entities, relations = parse(
        "[ John Smith | person | work for = Acme Corp ] works for [ Acme Corp | organization ] in "
        "[ Boston | city ] ."
    )
    assert entities == [ACME] and relations == []
    entities, relations = parse("[ John Smith | PEOPLE ] works for Acme Corp in [ Boston | Location ] .")
    assert entities == [JOHN, BOSTON] and relations == []


def test_unknown_relations_and_missing_tails():
    text = (
        "[ John Smith | people | employed by = Acme Corp | work for = | live in | work for = Globex "
        "| live in = Boston ] works for [ Acme Corp | organization | organization based in = Acme Corp ] in "
        "[ Boston | location ] ."
    )
    entities, relations = parse(text)
    assert entities == [JOHN, ACME, BOSTON]
    assert triples(entities, relations) == {("Live_In", JOHN, BOSTON), ("OrgBased_In", ACME, ACME)}


def test_relations_to_dropped_entities_are_dropped():
    text = "[ John Smith | people | work for = Acme Corp ] works for [ Acme Corp | company ] in Boston ."
    assert parse(text) == ([JOHN], [])


def test_duplicate_relations_and_entities_collapse():
    text = (
        "[ John Smith | people | work for = Acme Corp | work for = Acme Corp ] works for "
        "[ Acme Corp | organization ] in [ Boston | location | location ] ."
    )
    entities, relations = parse(text)
    assert entities == [JOHN, ACME, BOSTON]
    assert relations == [Relation("Work_For", 0, 1)]


def test_hallucinated_words():
    text = (
        "Yesterday [ John Q. Smith | people | work for = Acme Corp ] really works for "
        "[ Acme Corp | organization ] in [ Boston | location ] , Mass ."
    )
    entities, relations = parse(text)
    assert entities == [JOHN, ACME, BOSTON]
    assert triples(entities, relations) == {("Work_For", JOHN, ACME)}
    assert parse("[ Mary | people ] and [ Bob | people ] " + " ".join(TOKENS)) == ([], [])


def test_dropped_and_changed_words():
    text = "[ John Smith | people | live in = Boston ] for [ Acme Corp | organization ] [ Boston | location ]"
    entities, relations = parse(text)
    assert entities == [JOHN, ACME, BOSTON]
    assert triples(entities, relations) == {("Live_In", JOHN, BOSTON)}
    text = "[ Jon Smith | people | work for = Acme Corp ] works for [ Acme Corp | organization ] in Boston ."
    entities, relations = parse(text)
    assert entities == [JOHN, ACME]
    assert triples(entities, relations) == {("Work_For", JOHN, ACME)}
    text = "[ John Smith | people | work for = ACME Corp ] works for [ ACME Corp | organization ] in Boston ."
    entities, relations = parse(text)
    assert entities == [JOHN, ACME]
    assert triples(entities, relations) == {("Work_For", JOHN, ACME)}


def test_truncated_generation():
    cut = TARGET.index("Acme Corp | organization") + len("Acme Co")
    entities, relations = parse(TARGET[:cut])
    assert entities == [JOHN] and relations == []
    cut = TARGET.index("= Boston ] in") + len("= Bos")
    entities, relations = parse(TARGET[:cut])
    assert entities == [JOHN, ACME] and triples(entities, relations) == {("Work_For", JOHN, ACME)}
    cut = TARGET.index("[ Boston | location") + len("[ Boston | loc")
    entities, relations = parse(TARGET[:cut])
    assert entities == [JOHN, ACME] and triples(entities, relations) == {("Work_For", JOHN, ACME)}
    entities, relations = parse(TARGET[: -len(" ] .")])
    assert entities == [JOHN, ACME, BOSTON] and triples(entities, relations) == triples(
        SENTENCE.entities, SENTENCE.relations
    )


def test_every_prefix_of_a_target_parses_to_a_subset_of_gold():
    gold = triples(SENTENCE.entities, SENTENCE.relations)
    for cut in range(len(TARGET) + 1):
        entities, relations = parse(TARGET[:cut])
        assert set(entities) <= set(SENTENCE.entities)
        assert triples(entities, relations) <= gold


def test_prefixes_of_corpus_targets_stay_valid():
    for sentence in load_split("test")[:10]:
        target = format_target(sentence, TYPES)
        for cut in range(0, len(target) + 1, 3):
            entities, relations = parse(target[:cut], sentence.tokens)
            assert all(0 <= e.start < e.end <= len(sentence.tokens) for e in entities)
            assert all(0 <= r.head < len(entities) and 0 <= r.tail < len(entities) for r in relations)
            assert all(r.head != r.tail for r in relations)


def test_align():
    assert align(["a", "b", "c"], ["a", "b", "c"]) == [0, 1, 2]
    assert align(["a", "x", "b", "c"], ["a", "b", "c"]) == [0, None, 1, 2]
    assert align(["a", "c"], ["a", "b", "c"]) == [0, 2]
    assert align(["a", "B", "c"], ["a", "b", "c"]) == [0, 1, 2]
    assert align(["a", "z", "c"], ["a", "b", "c"]) == [0, 1, 2]
    assert align([], ["a"]) == []
    assert align(["a"], []) == [None]


def test_align_spans_fused_words():
    target = "near Washington , D.C. , the U.S. 's capital".split()
    source = "near Washington, D.C., the U.S.'s capital".split()
    assert align_spans(source, target) == [(0, 1), (1, 3), (3, 5), (5, 6), (6, 8), (8, 9)]
    assert align(source, target) == [0, 1, 3, 5, 6, 8]
    assert align_spans(["Don't", "go"], ["Do", "n't", "go"]) == [(0, 2), (2, 3)]
    assert align_spans(["O'Neill"], ["O", "'", "Neill"]) == [(0, 3)]
    # Only the spaces the clean-up removes: a model that drops another space gets no fused match.
    spans = align_spans(["MiddleEast", "talks"], ["Middle", "East", "talks"])
    assert all(span is None or span[1] - span[0] == 1 for span in spans) and spans[1] == (2, 3)
    entities, _ = parse("[ Washington, D.C. | location ] is far", "Washington , D.C. is far".split())
    assert entities == [Entity(0, 3, "Loc")]
