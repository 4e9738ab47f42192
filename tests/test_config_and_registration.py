import pytest
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType

import fishdip_peft
from fishdip_peft import FISHDIP_PEFT_TYPE, FishDipConfig, FishDipModel
from fishdip_peft.registration import register

from tests.models import tiny_llama


def test_peft_type_member_behaves_like_peft_members():
    assert PeftType("FISHDIP") is FISHDIP_PEFT_TYPE is PeftType.FISHDIP is PeftType["FISHDIP"]
    assert FISHDIP_PEFT_TYPE in list(PeftType)
    assert FISHDIP_PEFT_TYPE == "FISHDIP" and isinstance(FISHDIP_PEFT_TYPE, str)
    assert PEFT_TYPE_TO_CONFIG_MAPPING["FISHDIP"] is FishDipConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[FISHDIP_PEFT_TYPE] is FishDipModel


def test_register_is_idempotent():
    register()
    register()
    assert PEFT_TYPE_TO_TUNER_MAPPING[FISHDIP_PEFT_TYPE] is FishDipModel


def test_get_peft_model_returns_peft_model_and_config_round_trips(tmp_path):
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05, update_every=7, num_regressing=3))
    assert isinstance(model, PeftModel)
    model.save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, FishDipConfig)
    assert (config.density, config.update_every, config.num_regressing) == (0.05, 7, 3)
    assert config.peft_type is FISHDIP_PEFT_TYPE


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"density": 0.0}, "density must be in"),
        ({"density": 1.5}, "density must be in"),
        ({"density": -0.1}, "density must be in"),
        ({"density": True}, "density must be a number"),
        ({"update_every": 0}, "update_every must be a positive integer"),
        ({"num_regressing": 2.5}, "num_regressing must be a positive integer"),
        ({"delta_dtype": "int8"}, "delta_dtype must be one of"),
        ({"target_modules": 3}, "target_modules must be None"),
    ],
)
def test_invalid_config_is_rejected(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        FishDipConfig(**kwargs)


def test_unknown_target_module_names_the_problem():
    base = tiny_llama()
    before = {n: p.clone() for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match="matches no module"):
        get_peft_model(base, FishDipConfig(target_modules=["no_such_proj"]))
    assert all(p.equal(before[n]) for n, p in base.named_parameters())


def test_target_and_exclude_modules_choose_eligible_weights():
    model = get_peft_model(
        tiny_llama(), FishDipConfig(density=0.1, target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.1\..*")
    )
    names = [n for n, _ in model.base_model.eligible_parameters()]
    assert names == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"]


def test_default_eligibility_is_every_weight_with_tied_weights_once():
    base = tiny_llama()
    model = get_peft_model(base, FishDipConfig(density=0.01))
    eligible = model.base_model.eligible_parameters()
    assert sum(p.numel() for _, p in eligible) == sum(p.numel() for p in base.parameters())
    assert "model.embed_tokens.weight" in dict(eligible) and "lm_head.weight" not in dict(eligible)
    assert any("norm" in n for n, _ in eligible)
    total = model.base_model.mask.numel()
    assert model.base_model.num_trainable == round(0.01 * total)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == round(0.01 * total)


def test_version_is_exported():
    assert fishdip_peft.__version__
