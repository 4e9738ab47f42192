"""FishDipConfig validation: every rejected value gets a message naming the field, the bad value, what
is accepted and an example fix; numpy values of the right kind are accepted as plain Python values; a
loaded adapter_config.json goes through the same checks."""

import json
import re

import numpy as np
import pytest
from peft import PeftConfig, PeftModel, get_peft_model

from fishdip_peft import FishDipConfig
from tests.models import tiny_llama

BOOL_FIELDS = ("dynamic", "sample_aware", "inference_mode")


def assert_helpful(error, field, value):
    """The message names the field, the bad value, what is accepted ("must ...") and a fix ("field=...")."""
    message = str(error)
    assert message.startswith(field) or f" {field} " in message, message
    assert repr(value) in message, message
    assert " must " in message, message
    assert f"{field}=" in message, message


# -- bool fields ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", BOOL_FIELDS)
@pytest.mark.parametrize("value", ["false", "True", "", 0, 1, None, 1.0])
def test_bool_fields_reject_non_bools(field, value):
    with pytest.raises(TypeError, match=field) as excinfo:
        FishDipConfig(**{field: value})
    assert_helpful(excinfo.value, field, value)
    assert "bool" in str(excinfo.value)


@pytest.mark.parametrize("field", BOOL_FIELDS)
@pytest.mark.parametrize("value", [np.bool_(False), np.bool_(True)])
def test_bool_fields_accept_numpy_bool_as_plain_bool(field, value):
    config = FishDipConfig(**{field: value})
    assert getattr(config, field) is bool(value)


# -- numbers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("density", np.float64(0.05), 0.05),
        ("density", np.float32(0.25), 0.25),
        ("density", np.float16(0.5), 0.5),
        ("density", 1, 1.0),
        ("density", np.int64(1), 1.0),
        ("update_every", np.int64(7), 7),
        ("update_every", np.int32(3), 3),
        ("num_regressing", np.int64(4), 4),
        ("num_regressing", np.uint8(2), 2),
        ("seed", np.int64(5), 5),
        ("seed", np.int32(-3), -3),
    ],
)
def test_numpy_and_integral_numbers_become_plain_python_numbers(field, value, expected):
    config = FishDipConfig(**{field: value})
    assert getattr(config, field) == expected
    assert type(getattr(config, field)) is type(expected)
    json.dumps(config.to_dict())  # still serialises


@pytest.mark.parametrize(
    "field, value",
    [
        ("density", "0.5"),
        ("density", np.bool_(True)),
        ("density", None),
        ("density", [0.5]),
        ("update_every", True),
        ("update_every", np.bool_(True)),
        ("update_every", "7"),
        ("update_every", 7.0),
        ("update_every", np.float64(7.0)),
        ("num_regressing", "15"),
        ("num_regressing", False),
        ("num_regressing", None),
        ("num_regressing", 0),
        ("update_every", np.int64(-2)),
    ],
)
def test_numeric_fields_reject_wrong_kinds_and_bools(field, value):
    with pytest.raises((TypeError, ValueError), match=field) as excinfo:
        FishDipConfig(**{field: value})
    assert_helpful(excinfo.value, field, value)


@pytest.mark.parametrize("value", ["0", "42", 1.5, np.float64(2.0), None, True, np.bool_(False), [1]])
def test_seed_must_be_an_int(value):
    with pytest.raises(TypeError, match="seed") as excinfo:
        FishDipConfig(seed=value)
    assert_helpful(excinfo.value, "seed", value)


# -- delta_dtype -------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["int8", "fp16", "torch.float16", None, 16])
def test_delta_dtype_error_names_the_choices_and_a_fix(value):
    with pytest.raises(ValueError, match="delta_dtype") as excinfo:
        FishDipConfig(delta_dtype=value)
    assert_helpful(excinfo.value, "delta_dtype", value)
    assert all(dtype in str(excinfo.value) for dtype in ("float32", "bfloat16", "float16"))


def test_delta_dtype_numpy_string_becomes_str():
    config = FishDipConfig(delta_dtype=np.str_("bfloat16"))
    assert config.delta_dtype == "bfloat16" and type(config.delta_dtype) is str


# -- target_modules / exclude_modules ------------------------------------------------------------------
@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
@pytest.mark.parametrize("pattern", ["q_proj(", "[qv]_proj[", "*_proj", r".*\.layers\.(0|1"])
def test_invalid_regex_names_the_field_and_the_regex_error(field, pattern):
    with pytest.raises(ValueError, match=field) as excinfo:
        FishDipConfig(**{field: pattern})
    try:
        re.compile(pattern)
    except re.error as error:
        regex_error = str(error)
    assert regex_error in str(excinfo.value)
    assert "regular expression" in str(excinfo.value)
    assert_helpful(excinfo.value, field, pattern)


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
@pytest.mark.parametrize(
    "value, item",
    [
        (["q_proj", 3], 3),
        (["q_proj", None], None),
        ([["q_proj"]], ["q_proj"]),
        (("q_proj", b"v_proj"), b"v_proj"),
        ({"q_proj", 1.5}, 1.5),
    ],
)
def test_module_lists_holding_non_strings_name_the_field_and_the_item(field, value, item):
    with pytest.raises(TypeError, match=field) as excinfo:
        FishDipConfig(**{field: value})
    message = str(excinfo.value)
    assert f"is {item!r} (type {type(item).__name__})" in message, message
    assert f"{field}=" in message and "must" in message, message


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
@pytest.mark.parametrize("value", [3, {"q_proj": True}, b"q_proj"])
def test_module_fields_of_the_wrong_type_name_the_field_and_a_fix(field, value):
    with pytest.raises(TypeError, match=field) as excinfo:
        FishDipConfig(**{field: value})
    assert_helpful(excinfo.value, field, value)


def test_module_fields_keep_their_values_and_matching():
    """Validation only: valid regexes and name lists pass through unchanged (sets/tuples sorted as before)."""
    config = FishDipConfig(
        target_modules=[np.str_("q_proj"), "v_proj"], exclude_modules=r".*layers\.1\..*"
    )
    assert config.target_modules == ["q_proj", "v_proj"] and all(type(m) is str for m in config.target_modules)
    assert config.exclude_modules == r".*layers\.1\..*"
    assert FishDipConfig(target_modules=("v_proj", "q_proj")).target_modules == ["q_proj", "v_proj"]
    model = get_peft_model(tiny_llama(), config)
    names = [n for n, _ in model.base_model.eligible_parameters()]
    assert names == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"]


# -- JSON round trip ---------------------------------------------------------------------------------
def test_numpy_config_round_trips_through_json_as_plain_values(tmp_path):
    config = FishDipConfig(
        density=np.float64(0.05), update_every=np.int64(7), num_regressing=np.int32(3), dynamic=np.bool_(False),
        sample_aware=np.bool_(False), seed=np.int64(11), target_modules={"v_proj", "q_proj"},
        exclude_modules=None, delta_dtype=np.str_("float16"),
    )
    config.save_pretrained(tmp_path)
    fields = ("density", "update_every", "num_regressing", "dynamic", "sample_aware", "seed",
              "target_modules", "exclude_modules", "delta_dtype")
    for loader in (FishDipConfig.from_pretrained, PeftConfig.from_pretrained):
        loaded = loader(tmp_path)
        assert isinstance(loaded, FishDipConfig)
        for name in fields:
            assert getattr(loaded, name) == getattr(config, name)
            assert type(getattr(loaded, name)) is type(getattr(config, name))
    assert (loaded.density, loaded.update_every, loaded.dynamic, loaded.seed) == (0.05, 7, False, 11)


TAMPERED = [
    ("density", "0.5"),
    ("dynamic", "false"),
    ("sample_aware", "true"),
    ("inference_mode", "false"),
    ("update_every", "7"),
    ("update_every", 7.5),
    ("num_regressing", True),
    ("seed", "0"),
    ("delta_dtype", "int8"),
    ("target_modules", "q_proj("),
    ("target_modules", ["q_proj", 3]),
    ("exclude_modules", "[bad"),
]


def tamper(directory, field, value):
    path = directory / "adapter_config.json"
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("field, value", TAMPERED)
@pytest.mark.parametrize("loader", ["FishDipConfig", "PeftConfig"])
def test_tampered_adapter_config_is_rejected_on_load(tmp_path, loader, field, value):
    FishDipConfig(density=0.05, target_modules=["q_proj"]).save_pretrained(tmp_path)
    tamper(tmp_path, field, value)
    cls = FishDipConfig if loader == "FishDipConfig" else PeftConfig
    with pytest.raises((TypeError, ValueError), match=field) as excinfo:
        cls.from_pretrained(tmp_path)
    if not isinstance(value, list):
        assert repr(value) in str(excinfo.value)
    assert f"{field}=" in str(excinfo.value)


@pytest.mark.parametrize("field, value", [("dynamic", "false"), ("density", "0.5"), ("target_modules", "q_proj(")])
def test_tampered_adapter_is_refused_by_peft_model_from_pretrained(tmp_path, field, value):
    get_peft_model(tiny_llama(), FishDipConfig(density=0.05)).save_pretrained(tmp_path)
    assert PeftModel.from_pretrained(tiny_llama(), tmp_path).peft_config["default"].dynamic is True
    tamper(tmp_path, field, value)
    with pytest.raises((TypeError, ValueError), match=field) as excinfo:
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert f"{field}=" in str(excinfo.value)
