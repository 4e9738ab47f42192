"""Fuzz of FISH-DIP's two loaders: the adapter file (with its adapter_config.json) and the training state.

Every case corrupts a real saved file (seeded, so the cases are the same on every run) and loads it. A case
passes if it either loads exactly what the clean file loads (the same logits; for the training state the same
weights, values, mask, schedule and pool), or is refused with an exception of an expected type whose message
names the problem, leaving the model it was loaded into as it was: for the adapter, the base model's
parameters, requires_grad flags and modules unchanged, no hook left on any module and no `peft_config`
attribute; for the training state, the FISH-DIP model's weights, values, mask, schedule and pool unchanged.

The cases run once per module (fixtures) and the tests check them by kind; the one upstream peft behaviour
FISH-DIP cannot act on is a strict xfail. Each fixture prints the counts per kind and outcome (`pytest -s`).
"""

from __future__ import annotations

import json
import random
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fishdip_peft import FishDipConfig, fishdip_tuner, load_training_state, save_training_state
from fishdip_peft.formats import MANIFEST_KEY, SPECIAL_KEYS, STATE_NAME, manifest
from tests.models import causal_batch, tiny_llama, train_automatically

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
PROBE = causal_batch(999)
SETTINGS = {"density": 0.05, "update_every": 1, "num_regressing": 3}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE["input_ids"], attention_mask=PROBE["attention_mask"]).logits


def train(steps: int = 2) -> torch.nn.Module:
    """A FISH-DIP model trained in automatic mode (two steps, a mask refresh before each: some entries left
    the mask, so the training state holds touched entries that are not trainable any more)."""
    model = get_peft_model(tiny_llama(), FishDipConfig(**SETTINGS))
    train_automatically(model, steps)
    model(**causal_batch(50))  # refreshes the mask (and empties the pool) ...
    model(**causal_batch(51))  # ... and this one fills the pool: the saved state holds pooled samples
    assert len(fishdip_tuner(model).progress["default"].pool) == SETTINGS["num_regressing"]
    return model.eval()


@pytest.fixture(scope="module")
def trained_model():
    return train()


def summarize(title: str, records: list[dict]) -> None:
    counts = Counter((record["kind"], record["outcome"]) for record in records)
    kinds = sorted({kind for kind, _ in counts})
    print(f"\n{title}: {len(records)} cases")
    for kind in kinds:
        row = ", ".join(f"{outcome} {count}" for (k, outcome), count in sorted(counts.items()) if k == kind)
        print(f"  {kind:<22} {row}")


def failures(records: list[dict], kinds, check) -> list[str]:
    found = []
    for record in records:
        if record["kind"] in kinds:
            problem = check(record)
            if problem:
                found.append(f"[{record['kind']}] {record['label']}: {problem}")
    return found


# =============================================================================================================
# Adapter file and adapter_config.json
# =============================================================================================================
ADAPTER_ERRORS = (ValueError, TypeError, OSError, SafetensorError)  # json.JSONDecodeError is a ValueError


class Case:
    def __init__(self, kind: str, label: str, weights: bytes, config: str, names=(), ours: bool = True,
                 upstream: bool = False):
        self.kind, self.label, self.weights, self.config = kind, label, weights, config
        self.names = [n for n in names if n]  # what an error message of our own checks must name (one of them)
        self.ours = ours  # False: an error of the file format's reader (safetensors, json) is enough
        self.upstream = upstream  # peft itself refuses it (a bare KeyError from its registry of peft types)


def serialize(tensors: dict, manifest_mode: str = "kept") -> bytes:
    """The tensors as a safetensors file, with the old manifest ("kept"), a new one ("recomputed") or none."""
    tensors = dict(tensors)
    if manifest_mode == "recomputed":
        tensors[MANIFEST_KEY] = manifest(tensors)
    elif manifest_mode == "removed":
        tensors.pop(MANIFEST_KEY, None)
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})


def adapter_cases(weights: bytes, config_text: str, tensors: dict) -> list[Case]:
    rng = random.Random(1234)
    cases = []
    header_end = 8 + struct.unpack("<Q", weights[:8])[0]
    fields = [k for k in tensors if k not in SPECIAL_KEYS]
    groups = sorted({k.rpartition(".")[0] for k in fields})
    weight_name = lambda key: key.rpartition(".")[0].removeprefix("base_model.model.")  # noqa: E731

    def names_of(key):
        return [weight_name(key), key.rpartition(".")[2], "manifest"]

    def add_tensors(kind, label, edited, mode, key):
        cases.append(Case(kind, f"{label} (manifest {mode})", serialize(edited, mode), config_text, names_of(key)))

    # -- bit flips anywhere in the file: half in the header (JSON, offsets), half in the tensor bytes ---------
    for number in range(100):
        where = rng.randrange(header_end) if number % 2 == 0 else rng.randrange(header_end, len(weights))
        data = bytearray(weights)
        data[where] ^= 1 << rng.randrange(8)
        region = "header" if where < header_end else "data"
        cases.append(Case("bit flip", f"byte {where} ({region})", bytes(data), config_text,
                          ["manifest", "fishdip", "base_model"]))

    # -- truncation --------------------------------------------------------------------------------------
    cuts = {0, 1, 7, 8, 9, header_end - 1, header_end, header_end + 1, len(weights) - 1}
    while len(cuts) < 40:
        cuts.add(rng.randrange(len(weights)))
    for cut in sorted(cuts):
        cases.append(Case("truncation", f"first {cut} of {len(weights)} bytes", weights[:cut], config_text, ours=False))

    # -- indices: out of range, negative, unsorted, duplicated, moved; manifest kept, recomputed, removed ---
    index_keys = [k for k in fields if k.endswith(".fishdip_indices") and tensors[k].numel() >= 2]
    edits = {
        "past the end": lambda t, numel: t.index_fill(0, torch.tensor([t.numel() - 1]), numel),
        "far past the end": lambda t, numel: t.index_fill(0, torch.tensor([0]), 2**31 - 1),
        "negative": lambda t, numel: t.index_fill(0, torch.tensor([0]), -1),
        "unsorted": lambda t, numel: t[torch.tensor([1, 0, *range(2, t.numel())])],
        "duplicated": lambda t, numel: t.index_fill(0, torch.tensor([1]), int(t[0])),
        "moved": lambda t, numel: t.index_fill(0, torch.tensor([t.numel() - 1]),
                                               int(t[-1]) + 1 if int(t[-1]) + 1 < numel else int(t[-1])),
    }
    for label, edit in edits.items():
        for mode in ("kept", "recomputed", "removed"):
            for _ in range(4):
                key = rng.choice(index_keys)
                numel = int(tensors[key.replace("fishdip_indices", "fishdip_shape")].prod())
                edited = {**tensors, key: edit(tensors[key].clone(), numel)}
                if label == "moved" and torch.equal(edited[key], tensors[key]):
                    continue
                add_tensors("indices", f"{label} in {weight_name(key)}", edited, mode, key)

    # -- deltas: NaN, inf, changed values --------------------------------------------------------------
    delta_keys = [k for k in fields if k.endswith(".fishdip_deltas")]
    for label, value in (("NaN", float("nan")), ("+inf", float("inf")), ("-inf", float("-inf"))):
        for mode in ("kept", "recomputed", "removed"):
            for _ in range(4):
                key = rng.choice(delta_keys)
                delta = tensors[key].clone()
                delta[rng.randrange(delta.numel())] = value
                add_tensors("deltas", f"{label} in {weight_name(key)}", {**tensors, key: delta}, mode, key)
    for _ in range(14):  # a changed value is only detectable with the manifest
        key = rng.choice(delta_keys)
        delta = tensors[key].clone()
        delta[rng.randrange(delta.numel())] += rng.choice([1e-6, -0.5, 3.0])
        add_tensors("deltas", f"changed value in {weight_name(key)}", {**tensors, key: delta}, "kept", key)

    # -- other fields: shape, flags, fingerprint, edited with the manifest kept or recomputed ---------------
    for group in rng.sample(groups, min(4, len(groups))):
        for label, key, value in (
            ("shape transposed", f"{group}.fishdip_shape", lambda t: t.flip(0)),
            ("shape grown", f"{group}.fishdip_shape", lambda t: t + 1),
            ("shape of another rank", f"{group}.fishdip_shape", lambda t: torch.cat([t, torch.ones(1, dtype=t.dtype)])),
            ("flags one byte short", f"{group}.fishdip_selected", lambda t: t[:-1]),
            ("flags flipped", f"{group}.fishdip_selected", lambda t: t ^ 0xFF),
            ("fingerprint changed", f"{group}.fishdip_fingerprint", lambda t: t ^ 1),
            ("fingerprint short", f"{group}.fishdip_fingerprint", lambda t: t[:16]),
        ):
            for mode in ("kept", "recomputed"):
                add_tensors("fields", f"{label} of {weight_name(key)}", {**tensors, key: value(tensors[key].clone())},
                            mode, key)

    # -- removed tensors ---------------------------------------------------------------------------------
    for key in [MANIFEST_KEY, *rng.sample(fields, 16)]:
        for mode in ("kept", "recomputed") if key != MANIFEST_KEY else ("removed",):
            edited = {k: v for k, v in tensors.items() if k != key}
            add_tensors("removed tensor", f"without {key.removeprefix('base_model.model.')}", edited, mode, key)

    # -- added tensors -------------------------------------------------------------------------------------
    some_group = groups[0]
    additions = {
        "a foreign weight": ("base_model.model.model.norm.extra", torch.ones(3)),
        "a FISH-DIP field of no eligible weight": ("base_model.model.model.nothing.weight.fishdip_indices",
                                                   torch.tensor([0, 1], dtype=torch.int32)),
        "an unknown FISH-DIP field": (f"{some_group}.fishdip_unknown", torch.zeros(2)),
        "an entry with no prefix": ("model.norm.weight.fishdip_indices", torch.tensor([0], dtype=torch.int32)),
        "a second manifest": ("base_model.model.model.fishdip_manifest", torch.zeros(32, dtype=torch.uint8)),
        "a lone field of an eligible weight": ("base_model.model.model.norm.weight.fishdip_indices",
                                               torch.tensor([0, 1], dtype=torch.int32)),
        "an empty tensor": ("base_model.model.empty", torch.zeros(0)),
    }
    for label, (key, tensor) in additions.items():
        for mode in ("kept", "recomputed", "removed"):
            cases.append(Case("added tensor", f"{label} (manifest {mode})", serialize({**tensors, key: tensor}, mode),
                              config_text, [key.removeprefix("base_model.model.").rpartition(".")[0],
                                            key.rpartition(".")[2], key, "manifest"]))

    # -- changed dtypes ----------------------------------------------------------------------------------
    dtype_edits = [
        ("fishdip_indices", [torch.int64, torch.int16, torch.float32, torch.uint8]),
        ("fishdip_deltas", [torch.float64, torch.int32, torch.bool, torch.int64]),  # not float16/bfloat16: they round
        ("fishdip_selected", [torch.int8, torch.bool, torch.int32]),
        ("fishdip_shape", [torch.int32, torch.float32]),
        ("fishdip_fingerprint", [torch.int64, torch.float32]),
        ("fishdip_manifest", [torch.int8, torch.int64]),
    ]
    for field, dtypes in dtype_edits:
        for dtype in dtypes:
            for mode in ("kept", "recomputed") if field != "fishdip_manifest" else ("kept",):
                key = MANIFEST_KEY if field == "fishdip_manifest" else f"{rng.choice(groups)}.{field}"
                edited = {**tensors, key: tensors[key].to(dtype)}
                add_tensors("dtype", f"{key.removeprefix('base_model.model.')} as {dtype}", edited, mode, key)

    # -- adapter_config.json -----------------------------------------------------------------------------
    config = json.loads(config_text)

    def config_case(kind, label, edited, names, upstream=False):
        text = edited if isinstance(edited, str) else json.dumps(edited, indent=2)
        cases.append(Case(kind, label, weights, text, [*names, CONFIG, "config"], ours=kind != "config garbage",
                          upstream=upstream))

    wrong_types = {
        "density": ["0.05", True, None, [0.05], {"v": 1}],
        "update_every": ["2", 2.0, 2.5, True, None],
        "num_regressing": ["3", 3.5, False, [3]],
        "dynamic": ["false", 0, 1, None, "true"],
        "sample_aware": ["no", 1, [True]],
        "init_weights": ["true", 1, None],
        "inference_mode": ["yes", 0],
        "seed": ["0", 0.5, True, None],
        "delta_dtype": [32, None, ["float32"]],
        "target_modules": [3, {"q_proj": 1}, [1, 2], True],
        "exclude_modules": [3, [None], {"a": "b"}],
        "modules_to_save": ["lm_head", ["lm_head"], ["nothing"]],
        "peft_type": [3, None, "fishdip", "NOPE"],
        "task_type": ["NOPE", 3],
        "base_model_name_or_path": [3, "/nonexistent"],
        "revision": [3],
        "auto_mapping": ["x", 3],
        "peft_version": [3],
    }
    for field, values in wrong_types.items():
        for value in values:
            config_case("config value", f"{field} = {value!r}", {**config, field: value}, [field],
                        upstream=field == "peft_type")
    for value in (3, [1], [None], {"a": 1}, ["embed_tokens"]):
        config_case("config modules_to_save", f"modules_to_save = {value!r}", {**config, "modules_to_save": value},
                    ["modules_to_save"])
    config_case("config peft_type LORA", "peft_type = 'LORA'", {**config, "peft_type": "LORA"}, ["peft_type"])
    wrong_values = {
        "density": [0, -0.1, 1.5, float("nan"), float("inf"), 1e-9],
        "update_every": [0, -2],
        "num_regressing": [0, -1],
        "delta_dtype": ["int8", "float64", ""],
        "target_modules": ["([", ["nope"], ["q_proj"], r".*\.mlp\..*", "nothing"],
        "exclude_modules": [["mlp"], ["self_attn"], "(", ["embed_tokens"]],
        "task_type": ["SEQ_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM"],
    }
    for field, values in wrong_values.items():
        for value in values:
            config_case("config value", f"{field} = {value!r}", {**config, field: value}, [field, "target_modules"])
    for field in config:
        edited = {k: v for k, v in config.items() if k != field}
        config_case("config missing field", f"without {field}", edited, [field], upstream=field == "peft_type")
    config_case("config missing field", "an unknown extra field", {**config, "not_a_field": 1}, ["not_a_field"])
    garbage = {
        "empty file": "",
        "truncated": config_text[: len(config_text) // 2],
        "null": "null",
        "a list": "[1, 2]",
        "a number": "3",
        "a string": '"FISHDIP"',
        "not JSON": "density = 0.05",
        "trailing garbage": config_text + "}",
        "binary": "\x00\x01\x02\ufffd",
        "an empty object": "{}",
    }
    for label, text in garbage.items():
        config_case("config garbage", label, text, ["peft_type"], upstream=label == "an empty object")
    return cases


def init_weights_false_case(weights: bytes, config_text: str) -> Case:
    config = {**json.loads(config_text), "init_weights": False}
    return Case("config init_weights", "init_weights = False", weights, json.dumps(config), ["init_weights"])


def module_state(model) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "modules": [(n, type(m)) for n, m in model.named_modules()],
    }


def base_problems(model, reference: dict) -> list[str]:
    """How `model` (a base model a load was refused on) differs from the untouched `reference`."""
    problems = []
    if hasattr(model, "peft_config"):
        problems.append("it has a peft_config attribute")
    if [(n, type(m)) for n, m in model.named_modules()] != reference["modules"]:
        problems.append("its modules changed")
    params = dict(model.named_parameters())
    if params.keys() != reference["params"].keys():
        problems.append("its parameters changed names")
    else:
        changed = [n for n, p in params.items() if not torch.equal(p, reference["params"][n])]
        if changed:
            problems.append(f"parameters changed: {changed[:3]}")
        flags = [n for n, p in params.items() if p.requires_grad != reference["requires_grad"][n]]
        if flags:
            problems.append(f"requires_grad changed: {flags[:3]}")
    hooked = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
              or m._backward_pre_hooks]
    if hooked:
        problems.append(f"hooks left on {hooked[:3]}")
    return problems


def run_adapter_case(case: Case, folder: Path, reference_logits, reference_state, spare: list) -> dict:
    """Load the case's files onto a base model: `spare` holds one that a refused load left verifiably untouched
    (reused, since it is as good as a new one), else a new `tiny_llama()` is made."""
    for name in (WEIGHTS, CONFIG):
        if (folder / name).exists():
            (folder / name).unlink()
    (folder / WEIGHTS).write_bytes(case.weights)
    (folder / CONFIG).write_text(case.config)
    record = {"kind": case.kind, "label": case.label, "names": case.names, "ours": case.ours,
              "upstream": case.upstream}
    base = spare.pop() if spare else tiny_llama()
    try:
        loaded = PeftModel.from_pretrained(base, folder)
    except Exception as error:  # noqa: BLE001 (judged below)
        record.update(outcome="refused", error=error, type=type(error).__name__, message=str(error))
        record["base_problems"] = base_problems(base, reference_state)
        if not record["base_problems"]:
            spare.append(base)
        return record
    same = torch.equal(logits(loaded), reference_logits)
    record.update(outcome="loaded-identical" if same else "loaded-DIFFERENT")
    return record


@pytest.fixture(scope="module")
def adapter_records(trained_model, tmp_path_factory):
    clean = tmp_path_factory.mktemp("clean_adapter")
    trained_model.save_pretrained(clean)
    weights, config_text = (clean / WEIGHTS).read_bytes(), (clean / CONFIG).read_text()
    reference_logits = logits(PeftModel.from_pretrained(tiny_llama(), clean))
    reference_state = module_state(tiny_llama())
    folder = tmp_path_factory.mktemp("fuzzed_adapter")
    cases = adapter_cases(weights, config_text, load_safetensors(weights))
    cases.append(init_weights_false_case(weights, config_text))
    spare = []
    records = [run_adapter_case(case, folder, reference_logits, reference_state, spare) for case in cases]
    summarize("adapter loader fuzz", records)
    return records


def names_one_of(message: str, names) -> bool:
    message = message.lower()
    return any(n.lower() in message or n.lower().replace("_", " ") in message for n in names)


def refusal_problem(record: dict) -> str:
    """Why a refusal is not a good one (the state of the base model aside), or ''."""
    error = record["error"]
    upstream = record["upstream"] and isinstance(error, KeyError)  # peft's PEFT_TYPE_TO_CONFIG_MAPPING[...] lookup
    if not isinstance(error, ADAPTER_ERRORS) and not upstream:
        return f"unexpected {record['type']}: {record['message'][:200]}"
    message = record["message"].strip()
    if not message:
        return f"{record['type']} with an empty message"
    from_reader = isinstance(error, (SafetensorError, json.JSONDecodeError)) or not record["ours"] or upstream
    # the loader's own refusal of a file safetensors cannot read names the file
    names = [*record["names"], "adapter_model.safetensors"] if record["names"] else record["names"]
    if not from_reader and names and not names_one_of(message, names):
        return f"the message names none of {record['names']}: {message[:200]}"
    return ""


def outcome_problem(record: dict) -> str:
    if record["outcome"] == "loaded-DIFFERENT":
        return "loaded, with other logits than the clean adapter"
    return refusal_problem(record) if record["outcome"] == "refused" else ""


def unreadable_by_safetensors(record: dict) -> bool:
    """The safetensors reader could not read the file (FISH-DIP's config check says so before peft wraps the
    model, naming the file; a raw SafetensorError would come from peft's own load_peft_weights)."""
    return record["outcome"] == "refused" and (
        isinstance(record["error"], SafetensorError) or "is not a readable adapter file" in record["message"])


ADAPTER_KINDS = ["bit flip", "truncation", "indices", "deltas", "fields", "removed tensor", "added tensor", "dtype",
                 "config value", "config missing field", "config garbage"]
PEFT_LORA_UPSTREAM = (
    "peft (upstream): an adapter_config.json whose peft_type was edited to LORA loads as an untrained LoRA "
    "adapter with every key missing (a warning only); FISH-DIP's code never runs, so it cannot refuse it.")


def test_adapter_fuzz_has_enough_cases_of_every_kind(adapter_records):
    counts = Counter(record["kind"] for record in adapter_records)
    assert len(adapter_records) >= 500, counts
    assert set(ADAPTER_KINDS) <= set(counts), counts
    assert all(counts[kind] >= 10 for kind in ADAPTER_KINDS), counts
    outcomes = Counter(record["outcome"] for record in adapter_records)
    assert outcomes["refused"] >= 300 and outcomes["loaded-identical"] >= 40, outcomes


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_every_corrupt_adapter_loads_identically_or_is_refused_with_a_named_error(adapter_records, kind):
    found = failures(adapter_records, {kind}, outcome_problem)
    assert not found, f"{len(found)} cases:\n" + "\n".join(found[:15])


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_a_refused_adapter_file_that_safetensors_reads_leaves_the_base_model_untouched(adapter_records, kind):
    def problem(record):
        if record["outcome"] != "refused" or unreadable_by_safetensors(record):
            return ""
        return "; ".join(record["base_problems"])

    found = failures(adapter_records, {kind}, problem)
    assert not found, f"{len(found)} cases:\n" + "\n".join(found[:15])


def test_a_refused_adapter_file_that_safetensors_cannot_read_leaves_the_base_model_untouched(adapter_records):
    unreadable = [record for record in adapter_records if unreadable_by_safetensors(record)]
    assert len(unreadable) >= 20
    found = failures(unreadable, set(ADAPTER_KINDS), lambda record: "; ".join(record["base_problems"]))
    assert not found, f"{len(found)} of {len(unreadable)} cases:\n" + "\n".join(found[:10])


def test_a_config_with_a_malformed_modules_to_save_is_refused_naming_it(adapter_records):
    records = [record for record in adapter_records if record["kind"] == "config modules_to_save"]
    found = failures(records, {"config modules_to_save"}, outcome_problem)
    assert not found, "\n".join(found)


@pytest.mark.xfail(strict=True, reason=PEFT_LORA_UPSTREAM)
def test_a_config_edited_to_another_peft_type_is_refused(adapter_records):
    (record,) = [record for record in adapter_records if record["kind"] == "config peft_type LORA"]
    assert not outcome_problem(record), outcome_problem(record)


def test_a_config_saying_init_weights_false_loads_the_saved_deltas(adapter_records):
    (record,) = [record for record in adapter_records if record["kind"] == "config init_weights"]
    assert not outcome_problem(record), outcome_problem(record)
    assert record["outcome"] == "refused" or not record.get("base_problems")


# =============================================================================================================
# Training state (fishdip_state.pt)
# =============================================================================================================
STATE_ERRORS = (ValueError, TypeError, OSError)


def fishdip_snapshot(model) -> dict:
    tuner = fishdip_tuner(model)
    adapter, progress = tuner.sparse_adapters["default"], tuner.progress["default"]
    return {
        "weights": [p.detach().clone() for p in tuner.model.parameters()],
        "values": adapter.values.detach().clone(),
        "requires_grad": adapter.values.requires_grad,
        "index": [slot.index.clone() for slot in adapter.slots],
        "touched": [slot.touched.clone() for slot in adapter.slots],
        "base": [slot.base.clone() for slot in adapter.slots],
        "progress": progress.state_dict(),
        "pool": (progress.pool.keys(), progress.pool._seen, progress.pool.capacity),
    }


def same_tensor(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and bool(torch.equal(x, y))


def snapshot_difference(a: dict, b: dict) -> str:
    for key in ("weights", "index", "touched", "base"):
        if len(a[key]) != len(b[key]) or not all(same_tensor(x, y) for x, y in zip(a[key], b[key])):
            return key
    if not same_tensor(a["values"], b["values"]):
        return "values"
    for key in ("requires_grad", "progress", "pool"):
        if a[key] != b[key]:
            return key
    return ""


class StateCase:
    def __init__(self, kind: str, label: str, raw: bytes = None, edit=None, settings=None, names=()):
        self.kind, self.label, self.raw, self.edit = kind, label, raw, edit
        self.settings = {**SETTINGS, **(settings or {})}  # the config of the model the state is loaded into
        self.names = list(names)


def state_cases(raw: bytes, state: dict) -> list[StateCase]:
    rng = random.Random(99)
    cases = []
    entry = state["adapters"]["default"]
    slots = len(entry["names"])
    used = [i for i in range(slots) if entry["index"][i].numel() >= 2]
    touched_slots = [i for i in range(slots) if entry["touched"][i].numel() >= 2]

    def adapter(s):
        return s["adapters"]["default"]

    def edit_case(kind, label, edit, names=(), settings=None):
        cases.append(StateCase(kind, label, edit=edit, settings=settings, names=names))

    # -- file bytes --------------------------------------------------------------------------------------
    cuts = {0, 1, 10, 100, len(raw) // 2, len(raw) - 22, len(raw) - 1}
    while len(cuts) < 30:
        cuts.add(rng.randrange(len(raw)))
    for cut in sorted(cuts):
        cases.append(StateCase("truncation", f"first {cut} of {len(raw)} bytes", raw=raw[:cut]))
    for _ in range(66):
        where = rng.randrange(len(raw))
        data = bytearray(raw)
        data[where] ^= 1 << rng.randrange(8)
        cases.append(StateCase("bit flip", f"byte {where}", raw=bytes(data)))

    # -- missing keys ------------------------------------------------------------------------------------
    for key in ("format", "adapters", "active_adapter"):
        edit_case("missing key", f"without '{key}'", lambda s, key=key: s.pop(key), [key])
    for key in list(entry):
        edit_case("missing key", f"adapter without '{key}'", lambda s, key=key: adapter(s).pop(key), [key])
    for key in list(entry["progress"]):
        edit_case("missing key", f"progress without '{key}'", lambda s, key=key: adapter(s)["progress"].pop(key),
                  [key, "progress"])
    for key in list(entry["pools"][0]):
        edit_case("missing key", f"pool without '{key}'", lambda s, key=key: adapter(s)["pools"][0].pop(key),
                  [key, "pool"])

    # -- wrong shapes ------------------------------------------------------------------------------------
    for field in ("index", "touched", "base", "trained"):
        for label, cut in (("one entry short", lambda t: t[:-1]), ("one entry more", lambda t: torch.cat([t, t[-1:]])),
                           ("2-D", lambda t: t.reshape(1, -1))):
            pick = used if field == "index" else touched_slots
            slot = rng.choice(pick)
            edit_case("wrong shape", f"{field}[{slot}] {label}",
                      lambda s, f=field, i=slot, c=cut: adapter(s)[f].__setitem__(i, c(adapter(s)[f][i])),
                      [field, entry["names"][slot]])
    for label, cut in (("one short", lambda t: t[:-1]), ("one more", lambda t: torch.cat([t, t[:1]])),
                       ("2-D", lambda t: t.reshape(1, -1)), ("empty", lambda t: t[:0])):
        edit_case("wrong shape", f"values {label}",
                  lambda s, c=cut: adapter(s).__setitem__("values", c(adapter(s)["values"])),
                  ["values", "K="])
    for label, edit in (("transposed", lambda shape: tuple(reversed(shape))),
                        ("grown", lambda shape: (shape[0] + 1, *shape[1:]))):
        slot = rng.randrange(slots)
        edit_case("wrong shape", f"shapes[{slot}] {label}",
                  lambda s, i=slot, e=edit: adapter(s)["shapes"].__setitem__(i, e(adapter(s)["shapes"][i])),
                  ["shapes", "eligible weights", entry["names"][slot]])

    # -- wrong counts --------------------------------------------------------------------------------------
    for field in ("index", "touched", "base", "trained", "names", "shapes"):  # slot 0 (the embedding) has entries
        edit_case("wrong count", f"{field}: the first slot missing", lambda s, f=field: adapter(s)[f].pop(0),
                  [field, "eligible"])
        edit_case("wrong count", f"{field}: the first slot twice",
                  lambda s, f=field: adapter(s)[f].insert(0, adapter(s)[f][0]), [field, "eligible"])
    i, j = used[0], (used[1] if len(used) > 1 else touched_slots[-1])
    edit_case("wrong count", f"index: an entry moved from slot {i} to slot {j} (K kept)",
              lambda s: (adapter(s)["index"].__setitem__(j, torch.cat([adapter(s)["index"][j],
                                                                       adapter(s)["index"][i][-1:]]).sort().values),
                         adapter(s)["index"].__setitem__(i, adapter(s)["index"][i][:-1])), ["index"])
    edit_case("wrong count", "pools: none", lambda s: adapter(s).__setitem__("pools", []), ["pools"])
    edit_case("wrong count", "pools: of two processes",
              lambda s: adapter(s).__setitem__("pools", adapter(s)["pools"] * 2), ["pools"])
    def another_sample(s):
        key, arrival, sample = adapter(s)["pools"][0]["entries"][-1]
        other = {k: (v + 1) % 64 if k == "input_ids" else v for k, v in sample.items()}
        adapter(s)["pools"][0]["entries"].append((key - 1.0, arrival - 1, other))

    edit_case("wrong count", "pool: a sample more than num_regressing", another_sample, ["pool", "num_regressing"])
    edit_case("wrong count", "pool: entries not triples",
              lambda s: adapter(s)["pools"][0].__setitem__("entries",
                                                           [e[:2] for e in adapter(s)["pools"][0]["entries"]]),
              ["pool", "entries"])
    edit_case("wrong count", "pool: entries a string", lambda s: adapter(s)["pools"][0].__setitem__("entries", "x"),
              ["pool", "entries"])
    edit_case("wrong count", "pool: rng state garbage", lambda s: adapter(s)["pools"][0].__setitem__("rng", (1, 2)),
              ["pool", "rng"])

    # -- edited values -------------------------------------------------------------------------------------
    def set_entry(field, slot, position, value):
        def edit(s):
            tensor = adapter(s)[field][slot].clone()
            tensor[position] = value
            adapter(s)[field][slot] = tensor
        return edit

    for slot in rng.sample(used, min(3, len(used))):
        index = entry["index"][slot]
        numel = int(torch.tensor(entry["shapes"][slot]).prod())
        name = entry["names"][slot]
        edit_case("edited values", f"index[{slot}] past the end", set_entry("index", slot, -1, numel), ["index", name])
        edit_case("edited values", f"index[{slot}] negative", set_entry("index", slot, 0, -1), ["index", name])
        edit_case("edited values", f"index[{slot}] duplicated", set_entry("index", slot, 1, int(index[0])),
                  ["index", name])
        edit_case("edited values", f"index[{slot}] unsorted",
                  lambda s, i=slot: adapter(s)["index"].__setitem__(i, adapter(s)["index"][i].flip(0)), ["index", name])
        outside = sorted(set(range(numel)) - set(entry["touched"][slot].tolist()))
        if outside:
            edit_case("edited values", f"index[{slot}] not among the touched entries",
                      lambda s, i=slot, p=outside[0]: adapter(s)["index"].__setitem__(
                          i, torch.cat([adapter(s)["index"][i][1:], torch.tensor([p])]).sort().values),
                      ["index", "touched", name])
        edit_case("edited values", f"touched[{slot}] past the end", set_entry("touched", slot, -1, numel),
                  ["touched", name])
        edit_case("edited values", f"trained[{slot}] NaN", set_entry("trained", slot, 0, float("nan")),
                  ["trained", name])
        edit_case("edited values", f"trained[{slot}] changed", set_entry("trained", slot, 0, 7.0), ["trained", name])
        edit_case("edited values", f"base[{slot}] changed", set_entry("base", slot, 0, 7.0), ["base", name])
    for label, value in (("NaN", float("nan")), ("inf", float("inf")), ("changed", 5.0)):
        position = rng.randrange(entry["values"].numel())
        edit_case("edited values", f"values[{position}] {label}",
                  lambda s, p=position, v=value: adapter(s)["values"].__setitem__(p, v), ["values"])
    edit_case("edited values", "values as float64",
              lambda s: adapter(s).__setitem__("values", adapter(s)["values"].double()),
              ["values"])
    edit_case("edited values", "trained as float16",
              lambda s: adapter(s).__setitem__("trained", [t.half() for t in adapter(s)["trained"]]), ["trained"])
    edit_case("edited values", "index as float",
              lambda s: adapter(s).__setitem__("index", [t.float() for t in adapter(s)["index"]]), ["index"])
    for field, value in (("optimizer_steps", "x"), ("optimizer_steps", -3), ("refreshes", None), ("manual", "no"),
                         ("last_refresh_step", 10**6), ("attempts", [1])):
        edit_case("edited values", f"progress {field} = {value!r}",
                  lambda s, f=field, v=value: adapter(s)["progress"].__setitem__(f, v), [field, "progress"])
    edit_case("edited values", "pool seen = 'x'", lambda s: adapter(s)["pools"][0].__setitem__("seen", "x"),
              ["seen", "pool"])
    edit_case("edited values", "pool loss NaN-free key replaced by a string",
              lambda s: adapter(s)["pools"][0].__setitem__(
                  "entries", [("high", *e[1:]) for e in adapter(s)["pools"][0]["entries"]]), ["pool", "entries"])
    edit_case("edited values", "format = 1", lambda s: s.__setitem__("format", 1), ["format"])
    edit_case("edited values", "format = '2'", lambda s: s.__setitem__("format", "2"), ["format"])
    edit_case("edited values", "adapters a list", lambda s: (s.clear(), s.update({"format": 2, "adapters": []})),
              ["adapters"])

    # -- adapter names -------------------------------------------------------------------------------------
    edit_case("adapter names", "adapter renamed",
              lambda s: s["adapters"].__setitem__("other", s["adapters"].pop("default")), ["other", "adapters"])
    edit_case("adapter names", "a second adapter",
              lambda s: s["adapters"].__setitem__("other", s["adapters"]["default"]), ["other", "adapters"])
    edit_case("adapter names", "no adapter", lambda s: s["adapters"].clear(), ["adapters"])
    edit_case("adapter names", "active adapter unknown", lambda s: s.__setitem__("active_adapter", "zzz"),
              ["active_adapter", "zzz"])
    edit_case("adapter names", "a weight renamed",
              lambda s: adapter(s)["names"].__setitem__(0, adapter(s)["names"][0] + "x"), ["names", "eligible weights"])
    edit_case("adapter names", "two weights swapped",
              lambda s: adapter(s)["names"].__setitem__(slice(0, 2), adapter(s)["names"][1::-1]),
              ["names", "eligible weights"])

    # -- the model's config against the saved state -----------------------------------------------------------
    saved_pool = len(entry["pools"][0]["entries"])
    for value in sorted({1, saved_pool - 1, saved_pool, saved_pool + 1, 15} - {0}):
        edit_case("config vs state", f"num_regressing={value} (the saved pool holds {saved_pool})", lambda s: None,
                  ["num_regressing", "pool"], settings={"num_regressing": value})
    if "num_regressing" in entry:  # the state records the pool's capacity
        edit_case("config vs state", "the state's num_regressing edited to 5",
                  lambda s: adapter(s).__setitem__("num_regressing", 5), ["num_regressing"])
    for settings in ({"density": 0.1}, {"density": 0.02}, {"target_modules": ["q_proj", "v_proj"]},
                     {"exclude_modules": ["mlp"]}, {"update_every": 5}, {"sample_aware": False}, {"dynamic": False},
                     {"seed": 3}):
        edit_case("config vs state", ", ".join(f"{k}={v}" for k, v in settings.items()), lambda s: None,
                  [*settings, "K=", "eligible weights"], settings=settings)
    return cases


def run_state_case(case: StateCase, raw: bytes, folder: Path, clean: dict) -> dict:
    path = folder / STATE_NAME
    if case.raw is not None:
        path.write_bytes(case.raw)
    else:
        state = torch.load(raw_file(raw, folder), map_location="cpu", weights_only=True)
        case.edit(state)
        torch.save(state, path)
    model = get_peft_model(tiny_llama(), FishDipConfig(**case.settings))
    before = fishdip_snapshot(model)
    record = {"kind": case.kind, "label": case.label, "names": case.names}
    try:
        load_training_state(model, str(folder))
    except Exception as error:  # noqa: BLE001 (judged below)
        record.update(outcome="refused", error=error, type=type(error).__name__, message=str(error),
                      changed=snapshot_difference(before, fishdip_snapshot(model)))
        return record
    after = fishdip_snapshot(model)
    capacity = after["pool"][2]
    if len(after["pool"][0]) > capacity:
        record.update(outcome="loaded-OVERFULL", detail=f"{len(after['pool'][0])} samples in a pool of {capacity}")
    elif case.settings != SETTINGS:  # another config: only what the state holds must be restored
        difference = snapshot_difference({**after, "pool": after["pool"][:2]}, {**clean, "pool": clean["pool"][:2]})
        record.update(outcome="loaded-exact" if not difference else "loaded-DIFFERENT", detail=difference)
    else:
        difference = snapshot_difference(after, clean)
        record.update(outcome="loaded-exact" if not difference else "loaded-DIFFERENT", detail=difference)
    return record


_RAW_FILES: dict = {}


def raw_file(raw: bytes, folder: Path) -> Path:
    """The clean state file (written once), for the cases that edit its content."""
    path = folder.parent / (folder.name + "-clean.pt")
    if path not in _RAW_FILES:
        path.write_bytes(raw)
        _RAW_FILES[path] = True
    return path


@pytest.fixture(scope="module")
def state_records(trained_model, tmp_path_factory):
    saved = tmp_path_factory.mktemp("clean_state")
    save_training_state(trained_model, str(saved))
    raw = (saved / STATE_NAME).read_bytes()
    state = torch.load(saved / STATE_NAME, map_location="cpu", weights_only=True)
    reference = get_peft_model(tiny_llama(), FishDipConfig(**SETTINGS))
    load_training_state(reference, str(saved))
    clean = fishdip_snapshot(reference)
    folder = tmp_path_factory.mktemp("fuzzed_state")
    records = [run_state_case(case, raw, folder, clean) for case in state_cases(raw, state)]
    summarize("training-state loader fuzz", records)
    return records


def state_problem(record: dict) -> str:
    if record["outcome"] != "refused":
        return "" if record["outcome"] == "loaded-exact" else f"{record['outcome']}: {record.get('detail')}"
    if record["changed"]:
        return f"refused ({record['type']}: {record['message'][:120]}) after changing the model's {record['changed']}"
    if not isinstance(record["error"], STATE_ERRORS):
        return f"unexpected {record['type']}: {record['message'][:160]}"
    message = record["message"]
    named = [STATE_NAME, "training state", *record["names"]]
    if not message.strip() or not any(n.lower() in message.lower() for n in named):
        return f"the message names neither the file nor one of {record['names']}: {message[:160]}"
    return ""


STATE_KINDS = ["truncation", "adapter names", "config vs state", "wrong shape", "bit flip", "missing key",
               "wrong count", "edited values"]



def test_state_fuzz_has_enough_cases_of_every_kind(state_records):
    counts = Counter(record["kind"] for record in state_records)
    assert len(state_records) >= 200, counts
    assert set(counts) == set(STATE_KINDS), counts
    assert all(counts[kind] >= 5 for kind in STATE_KINDS), counts


@pytest.mark.parametrize("kind", STATE_KINDS)
def test_every_corrupt_training_state_restores_exactly_or_is_refused_with_a_named_error(state_records, kind):
    found = failures(state_records, {kind}, state_problem)
    assert not found, f"{len(found)} cases:\n" + "\n".join(found[:15])
