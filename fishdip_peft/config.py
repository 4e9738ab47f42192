"""Configuration of FISH-DIP (sample-aware dynamic sparse fine-tuning)."""

from __future__ import annotations

import numbers
import os
import re
import tempfile
import warnings
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
from peft.config import PeftConfig

from .atomic import atomic_write, remove_stale_temporaries, write_bytes
from .formats import ADAPTER_FILE, disarm_adapter_file_writer, embedded_config
from .peft_type import FISHDIP_PEFT_TYPE

RUNTIME_FIELDS = ("inference_mode", "base_model_name_or_path", "revision", "auto_mapping")
DELTA_DTYPES = ("float32", "bfloat16", "float16")
FISHER_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class FishDipConfig(PeftConfig):
    """Configuration for [`FishDipModel`].

    FISH-DIP trains a fraction `density` of the eligible entries of the model's weights. Every
    `update_every` optimizer steps it re-selects those entries by the empirical Fisher information of
    the `num_regressing` training samples with the highest loss since the last selection.

    Every field is validated on construction, including when peft loads an adapter_config.json: bool
    fields must be real bools, numbers must be numbers of the right kind (numpy scalars are accepted and
    stored as plain Python values, so the config stays JSON-serialisable), and a regex string in
    `target_modules` / `exclude_modules` must compile. Errors name the field, the value and a fix.

    Args:
        density: Fraction of eligible entries that are trainable (the paper's k), in (0, 1].
        update_every: Optimizer steps between mask refreshes (the paper's m).
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
        seed: Seed of the random sample pool used when `sample_aware=False` (and of `init_weights=False`).
        delta_dtype: Dtype of the deltas written by `save_pretrained`: "float32" (exact), "bfloat16" or
            "float16" (smaller, rounded).
        fisher_dtype: Precision of the Fisher pass at a mask refresh: "float32" (default, exact) or, opt-in,
            "bfloat16" / "float16", which run its forward and backward under autocast (faster where the
            hardware has fast half-precision products; the scores are still summed in float32, and a few
            entries near the top-K boundary may be ranked differently).
        fisher_batch_size: Pooled samples per forward/backward of the Fisher pass. 1 (default): one pass
            per sample, the cheapest on CPU and the least memory. Larger: batched per-sample gradients,
            the same scores within float32 rounding, with a batch's activations alive at once.
        init_weights: True (default) starts from the base model itself. False (peft's switch for tests)
            starts from a random mask whose entries get small random deltas, so outputs differ from the base.
        modules_to_save: Modules (e.g. a new classification head) trained in full and saved beside the
            sparse deltas, as with peft's other methods.
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
    fisher_dtype: str = field(default="float32", metadata={"help": "Precision of the Fisher pass (opt-in autocast)."})
    fisher_batch_size: int = field(default=1, metadata={"help": "Pooled samples per pass of the Fisher."})
    init_weights: bool = field(
        default=True, metadata={"help": "False: start from a random mask with small random deltas (for tests)."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full and saved beside the sparse deltas."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = FISHDIP_PEFT_TYPE
        # Values are converted to plain Python types (numpy scalars included) so the config serialises to JSON.
        # `PeftConfig.from_pretrained` builds the config with keyword arguments, so a loaded adapter_config.json
        # goes through the same checks.
        for name in ("dynamic", "sample_aware", "inference_mode", "init_weights"):
            setattr(self, name, _as_bool(name, getattr(self, name)))
        density = _as_real("density", self.density, "density=0.01")
        if not 0.0 < density <= 1.0:
            raise ValueError(
                f"density must be in (0, 1] (the fraction of entries to train), got {self.density!r}. "
                "For 1% of the weights use density=0.01."
            )
        self.density = density
        for name, example in (("update_every", 100), ("num_regressing", 15), ("fisher_batch_size", 1)):
            value = getattr(self, name)
            if _as_int(name, value, example, "a positive integer") < 1:
                raise ValueError(f"{name} must be a positive integer (>= 1), got {value!r}. Example: {name}={example}.")
            setattr(self, name, int(value))
        self.seed = _as_int("seed", self.seed, 0, "an integer")
        if not isinstance(self.delta_dtype, str) or self.delta_dtype not in DELTA_DTYPES:
            raise ValueError(
                f"delta_dtype must be one of {DELTA_DTYPES}, got {self.delta_dtype!r}. "
                'Example: delta_dtype="bfloat16" (halves the saved deltas) or delta_dtype="float32" (exact).'
            )
        self.delta_dtype = str(self.delta_dtype)
        if not isinstance(self.fisher_dtype, str) or self.fisher_dtype not in FISHER_DTYPES:
            raise ValueError(
                f"fisher_dtype must be one of {FISHER_DTYPES}, got {self.fisher_dtype!r}. "
                'Example: fisher_dtype="bfloat16" (a faster, approximate Fisher pass) or "float32" (exact).'
            )
        self.fisher_dtype = str(self.fisher_dtype)
        for name in ("target_modules", "exclude_modules"):
            setattr(self, name, _as_modules(name, getattr(self, name)))
        self.modules_to_save = _as_name_list("modules_to_save", self.modules_to_save)


    def to_json(self) -> str:
        """The config as saved inside the adapter file: what defines the adapter, without the fields that
        describe one use of it (`inference_mode`, `base_model_name_or_path`, `revision`, `auto_mapping`)."""
        data = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}
        for key, value in data.items():
            if isinstance(value, set):
                data[key] = sorted(value)
        return json.dumps(data, sort_keys=True, default=str)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        """`PeftConfig.from_pretrained`, checked against the adapter file beside it. The file carries the
        config it was saved with: if adapter_config.json says otherwise (a save interrupted between its two
        files), the file's own config wins, with a warning. An unreadable or tampered adapter file is
        refused here, before peft wraps the model."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        weights = os.path.join(folder, ADAPTER_FILE)
        remove_stale_temporaries(folder)
        if not os.path.isfile(weights):
            return config
        saved = embedded_config(weights)
        if saved is None:
            return config
        if json.loads(config.to_json()) == {k: v for k, v in saved.items() if k not in RUNTIME_FIELDS}:
            return config  # the pair agrees; the file's manifest is checked when it loads
        saved = embedded_config(weights, verify=True)  # the embedded config is about to be used: trust it first
        if not saved:
            return config
        warnings.warn(f"{os.path.join(folder, 'adapter_config.json')} differs from the config saved inside "
                      f"{weights} (an interrupted save?); using the adapter file's own config.")
        fields = {f.name for f in dataclasses.fields(cls)}
        embedded = cls(**{k: v for k, v in saved.items() if k in fields and k != "peft_type"})
        for name in RUNTIME_FIELDS:  # how this copy is used comes from the folder's config
            setattr(embedded, name, getattr(config, name))
        return embedded

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """`PeftConfig.save_pretrained`, written atomically: adapter_config.json is never left half-written."""
        disarm_adapter_file_writer()
        os.makedirs(save_directory, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="fishdip-config-") as staging:  # outside the adapter folder
            super().save_pretrained(staging, **kwargs)
            for name in os.listdir(staging):
                with open(os.path.join(staging, name), "rb") as handle:
                    data = handle.read()
                atomic_write(os.path.join(save_directory, name), lambda tmp, data=data: write_bytes(tmp, data))


_MODULES_EXAMPLE = 'Example: {name}=["q_proj", "v_proj"] (module names) or {name}=r".*\\.(q|v)_proj" (a regex).'


def _describe(value) -> str:
    return f"{value!r} (type {type(value).__name__})"


def _as_bool(name: str, value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(
        f"{name} must be a bool (True or False), got {_describe(value)}. "
        f"Example: {name}=False (not the string \"false\", which would count as True)."
    )


def _as_real(name: str, value, example: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a number (int, float or numpy number, not a bool or string), "
            f"got {_describe(value)}. Example: {example}."
        )
    return float(value)


def _as_int(name: str, value, example: int, kind: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be {kind} (int or numpy integer, not a bool, float or string), "
            f"got {_describe(value)}. Example: {name}={example}."
        )
    return int(value)


def _as_name_list(name: str, value):
    """None or a list of module names (strings)."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple, set)):
        raise TypeError(f"{name} must be None or a list of module names, got {_describe(value)}. "
                        f'Example: {name}=["classifier"].')
    for position, item in enumerate(value):
        if not isinstance(item, str):
            raise TypeError(f"{name} must hold module names (strings); item {position} is {_describe(item)}. "
                            f'Example: {name}=["classifier"].')
    return sorted(value) if isinstance(value, set) else list(value)


def _as_modules(name: str, value):
    """None, a regex string (compiled here, so a bad one fails now), or a list of module names."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(
                f"{name} must be a valid regular expression (a string {name} is a regex matched against the "
                f"full module name) or a list of module names; got {value!r}, which is not a valid regular "
                f"expression: {error}. Escape literal characters such as . ( [ * or pass a list of names. "
                f"{_MODULES_EXAMPLE.format(name=name)}"
            ) from error
        return str(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        for index, item in enumerate(value):
            if not isinstance(item, str):
                where = f"item {index} " if isinstance(value, (list, tuple)) else "an item "
                raise TypeError(
                    f"{name} must hold only module names (strings), but {where}is {_describe(item)} "
                    f"in {value!r}. {_MODULES_EXAMPLE.format(name=name)}"
                )
        items = [str(item) for item in value]
        return items if isinstance(value, list) else sorted(items)
    raise TypeError(
        f"{name} must be None (every parameter), a regex string or a list of module names, "
        f"got {_describe(value)}. {_MODULES_EXAMPLE.format(name=name)}"
    )
