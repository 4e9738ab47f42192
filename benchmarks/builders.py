"""The builders of the benchmarks' fine-tuning methods (registered in `benchmarks.methods`).

Every builder takes a freshly loaded Hugging Face model (causal LM or seq2seq), prepares it
for training and records the hyperparameters it chose; keyword overrides replace them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

HOULSBY_ADAPTER = "houlsby"
COMPACTER_ADAPTER = "compacter"


@dataclass
class PreparedMethod:
    """A model ready for training with one method, and what was chosen for it."""

    model: nn.Module
    name: str
    trainable_params: int
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    controller: Any = None  # what drives a mask kept outside the model (the dense-mask baseline)


def count_trainable(model: nn.Module) -> int:
    """Number of trainable scalars, each shared (tied) tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peft_task_type(model: nn.Module) -> str:
    return "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"


def _peft_count(model: nn.Module) -> int:
    return int(model.get_nb_trainable_parameters()[0])


def full_ft(model: nn.Module) -> PreparedMethod:
    """Full fine-tuning: every parameter trainable."""
    model.requires_grad_(True)
    return PreparedMethod(model, "full-ft", count_trainable(model), {},
                          "all parameters trainable (tied embeddings counted once)")


def lora(model: nn.Module, r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.05,
         target_modules: str | list[str] = "all-linear") -> PreparedMethod:
    """peft LoRA on every linear layer except the output head."""
    from peft import LoraConfig, get_peft_model

    hp = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules, bias="none")
    peft_model = get_peft_model(model, LoraConfig(task_type=_peft_task_type(model), **hp))
    hp["resolved_target_modules"] = sorted(peft_model.peft_config["default"].target_modules)
    return PreparedMethod(peft_model, "lora", _peft_count(peft_model), hp,
                          f"LoRA r={r}, alpha={lora_alpha} on all linear layers")


def ia3(model: nn.Module, target_modules: list[str] | None = None,
        feedforward_modules: list[str] | None = None) -> PreparedMethod:
    """peft IA3 with peft's default targets for the architecture unless overridden."""
    from peft import IA3Config, get_peft_model
    from peft.utils import constants

    model_type = model.config.model_type
    if target_modules is None:
        target_modules = constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type]
        feedforward_modules = (feedforward_modules or
                               constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type])
    hp = dict(target_modules=list(target_modules),
              feedforward_modules=list(feedforward_modules or []))
    peft_model = get_peft_model(model, IA3Config(task_type=_peft_task_type(model), **hp))
    return PreparedMethod(peft_model, "ia3", _peft_count(peft_model), hp,
                          f"IA3 scaling vectors on {', '.join(hp['target_modules'])}")


def prefix_tuning(model: nn.Module, num_virtual_tokens: int = 20,
                  prefix_projection: bool = False) -> PreparedMethod:
    """peft prefix tuning: trainable key/value prefixes in every attention layer."""
    from peft import PrefixTuningConfig, get_peft_model

    hp = dict(num_virtual_tokens=num_virtual_tokens, prefix_projection=prefix_projection)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type=_peft_task_type(model), **hp))
    return PreparedMethod(peft_model, "prefix-tuning", _peft_count(peft_model), hp,
                          f"prefix tuning with {num_virtual_tokens} virtual tokens per layer")


def _rename_cache_kwarg(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if "past_key_values" in kwargs:
        kwargs["past_key_value"] = kwargs.pop("past_key_values")
    return args, kwargs


def _route_kv_cache(model: nn.Module) -> None:
    """Pass the KV cache to attention layers that still name it `past_key_value`.

    adapters 1.3.0 replaces some attention classes (Llama, Mistral, GPT-2, ...) with forwards
    taking `past_key_value`, while transformers 4.57 decoder layers pass `past_key_values`;
    the cache then lands in `**kwargs`, is never updated and cached generation is garbage.
    """
    for module in model.modules():
        params = inspect.signature(module.forward).parameters
        if "past_key_value" in params and "past_key_values" not in params:
            module.register_forward_pre_hook(_rename_cache_kwarg, with_kwargs=True)


def _adapterhub(model: nn.Module, adapter_name: str, config: Any) -> nn.Module:
    """Add and activate an AdapterHub adapter, cast to the base model's dtype and device."""
    import adapters

    reference = next(model.parameters())
    adapters.init(model)
    model.add_adapter(adapter_name, config=config, set_active=True)
    model.train_adapter(adapter_name)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(device=reference.device, dtype=reference.dtype)
    _route_kv_cache(model)
    return model


def houlsby(model: nn.Module, reduction_factor: int = 16, non_linearity: str = "swish",
            init_weights: str = "mam_adapter") -> PreparedMethod:
    """Houlsby bottleneck adapters after attention and feed-forward (AdapterHub).

    The default `mam_adapter` init zeroes the up-projection, so the untrained model equals the
    base model; AdapterHub's default `bert` init perturbs SmolLM2's large activations enough to
    change its greedy answers.
    """
    from adapters import DoubleSeqBnConfig

    hp = dict(config="DoubleSeqBnConfig", reduction_factor=reduction_factor,
              non_linearity=non_linearity, init_weights=init_weights,
              adapter_dtype=str(next(model.parameters()).dtype))
    config = DoubleSeqBnConfig(reduction_factor=reduction_factor, non_linearity=non_linearity,
                               init_weights=init_weights)
    model = _adapterhub(model, HOULSBY_ADAPTER, config)
    return PreparedMethod(model, "houlsby", count_trainable(model), hp,
                          f"Houlsby adapters, bottleneck hidden/{reduction_factor}")


def compacter(model: nn.Module, reduction_factor: int = 16, phm_dim: int = 4) -> PreparedMethod:
    """Compacter (PHM bottleneck adapters, AdapterHub).

    hidden_size / reduction_factor must be an integer divisible by phm_dim: SmolLM2 (576) needs
    reduction_factor 16, as AdapterHub's default 32 gives a bottleneck of 18.
    """
    from adapters import CompacterConfig

    hidden = model.config.hidden_size
    if hidden % reduction_factor or (hidden // reduction_factor) % phm_dim or hidden % phm_dim:
        raise ValueError(f"Compacter needs hidden size {hidden} / reduction_factor "
                         f"{reduction_factor} to be an integer divisible by phm_dim {phm_dim}")
    hp = dict(config="CompacterConfig", reduction_factor=reduction_factor, phm_dim=phm_dim,
              adapter_dtype=str(next(model.parameters()).dtype))
    config = CompacterConfig(reduction_factor=reduction_factor, phm_dim=phm_dim)
    model = _adapterhub(model, COMPACTER_ADAPTER, config)
    return PreparedMethod(model, "compacter", count_trainable(model), hp,
                          f"Compacter adapters, bottleneck hidden/{reduction_factor}, "
                          f"phm_dim {phm_dim}")


def _fishdip(name: str, model: nn.Module, *, density: float = 0.01, update_every: int = 100,
             num_regressing: int = 15, dynamic: bool = True, sample_aware: bool = True,
             seed: int = 0, **extra: Any) -> PreparedMethod:
    from peft import get_peft_model

    from fishdip_peft import FishDipConfig

    hp = dict(density=density, update_every=update_every, num_regressing=num_regressing,
              dynamic=dynamic, sample_aware=sample_aware, seed=seed, **extra)
    config = FishDipConfig(task_type=_peft_task_type(model), **hp)
    peft_model = get_peft_model(model, config)
    kind = "dynamic" if dynamic else "fixed"
    source = "highest-loss samples" if sample_aware else "samples not chosen by loss"
    return PreparedMethod(peft_model, name, _peft_count(peft_model), hp,
                          f"{kind} sparse mask, density {density}, Fisher over {source}")


def fishdip(model: nn.Module, **overrides: Any) -> PreparedMethod:
    """FISH-DIP: sparse mask refreshed from the Fisher of the highest-loss samples."""
    return _fishdip("fishdip", model, **overrides)


def fixed_fish(model: nn.Module, **overrides: Any) -> PreparedMethod:
    """FISH mask (Sung et al. 2021): the sparse mask is computed once and never refreshed."""
    return _fishdip("fixed-fish", model, **{"dynamic": False, **overrides})


def fishdip_no_sample_aware(model: nn.Module, **overrides: Any) -> PreparedMethod:
    """FISH-DIP ablation: importance from samples not chosen by loss."""
    return _fishdip("fishdip-no-sample-aware", model, **{"sample_aware": False, **overrides})


def dense_mask(model: nn.Module, density: float = 0.01, update_every: int = 100,
               num_regressing: int = 15) -> PreparedMethod:
    """The original FISH-DIP code's style (`benchmarks.dense_mask`): a dense float mask over every
    weight, dense gradients masked after `backward()`, an optimizer over all weights."""
    from benchmarks.dense_mask import DenseMaskFishDip

    controller = DenseMaskFishDip(model, density, update_every, num_regressing)
    hp = dict(density=density, update_every=update_every, num_regressing=num_regressing)
    return PreparedMethod(model, "dense-mask", count_trainable(model), hp,
                          f"dense float mask, density {density}, dense gradients masked after backward",
                          controller=controller)
