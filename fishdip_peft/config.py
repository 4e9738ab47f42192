"""Configuration of FISH-DIP (sample-aware dynamic sparse fine-tuning)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from .registration import FISHDIP_PEFT_TYPE

DELTA_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class FishDipConfig(PeftConfig):
    """Configuration for [`FishDipModel`].

    FISH-DIP trains a fraction `density` of the eligible entries of the model's weights. Every
    `update_every` optimizer steps it re-selects those entries by the empirical Fisher information of
    the `num_regressing` training samples with the highest loss since the last selection.

    Args:
        density: Fraction of eligible entries that are trainable (the paper's k), in (0, 1].
        update_every: Number of `step()` calls (optimizer steps) between mask refreshes (the paper's m).
        num_regressing: Number of highest-loss samples whose Fisher ranks the entries (the paper's n).
        dynamic: If False, the mask is computed once at the first step and never refreshed (the fixed
            "FISH mask" of Sung et al. 2021).
        sample_aware: If False, the Fisher is computed on `num_regressing` samples drawn uniformly at
            random instead of the highest-loss ones (the paper's ablation).
        target_modules: Modules whose parameters are eligible: a list of module names (a name matches
            itself and any name ending in `.<name>`) or a regex matched against the full module name.
            `None` makes every parameter of the model eligible (embeddings and norms included; tied
            weights once).
        exclude_modules: Modules whose parameters are never eligible, same syntax as `target_modules`.
        seed: Seed of the random sample pool used when `sample_aware=False`.
        delta_dtype: Dtype of the deltas written by `save_pretrained`: "float32" (exact), "bfloat16" or
            "float16" (smaller, rounded).
    """

    density: float = field(default=0.01, metadata={"help": "Fraction of eligible entries trained, in (0, 1]."})
    update_every: int = field(default=100, metadata={"help": "Optimizer steps between mask refreshes (m)."})
    num_regressing: int = field(default=15, metadata={"help": "Highest-loss samples used for the Fisher (n)."})
    dynamic: bool = field(default=True, metadata={"help": "Refresh the mask every `update_every` steps."})
    sample_aware: bool = field(default=True, metadata={"help": "Rank with the highest-loss samples."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules whose parameters are eligible; None for all."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules whose parameters are never eligible."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random pool when sample_aware=False."})
    delta_dtype: str = field(default="float32", metadata={"help": "Dtype of the saved deltas."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = FISHDIP_PEFT_TYPE
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
            raise TypeError(f"density must be a number in (0, 1], got {self.density!r}.")
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(
                f"density must be in (0, 1] (the fraction of entries to train), got {self.density}. "
                "For 1% of the weights use density=0.01."
            )
        for name in ("update_every", "num_regressing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.delta_dtype not in DELTA_DTYPES:
            raise ValueError(f"delta_dtype must be one of {DELTA_DTYPES}, got {self.delta_dtype!r}.")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
            elif value is not None and not isinstance(value, (str, list)):
                raise TypeError(f"{name} must be None, a regex string or a list of module names, got {value!r}.")
