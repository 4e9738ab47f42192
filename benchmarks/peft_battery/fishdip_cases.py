"""Our additions to peft's `tests/test_custom_models.py`: FISH-DIP cases beside SHiRA's.

peft's test files are not kept in this repository. `apply()` edits a downloaded copy of
`test_custom_models.py` at three anchors, each of which must occur exactly once (else it raises, so a
peft release that moved them is noticed rather than silently tested without FISH-DIP):

1. the imports: `import fishdip_peft` (registers the method with peft) and `FishDipConfig`;
2. `TEST_CASES`: five "Vanilla MLP n FISH-DIP" cases after the five SHiRA ones, one for one (same
   model, same `target_modules`; SHiRA's `random_seed` becomes FISH-DIP's `seed`);
3. `MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`: "FISH-DIP Same" / "FISH-DIP Different" after SHiRA's.

SHiRA's `r` becomes FISH-DIP's density/update_every/num_regressing: density 0.5 keeps K >= 1 on the
tiny models, update_every 1 refreshes the mask on every `step()`. Like SHiRA's, the multi-adapter
cases pass `init_weights=False` (a random start, so two adapters differ), with different seeds since
FISH-DIP's random start follows `seed`. peft's own `set_init_weights_false` helper adds
`init_weights=False` where the tests ask for it; `--keep-identity-start` turns that off for
FishDipConfig alone, as a diagnostic.
"""

from __future__ import annotations

from pathlib import Path

FISHDIP = '"density": 0.5, "update_every": 1, "num_regressing": 4'

IMPORTS = """\
import fishdip_peft  # noqa: F401  (FISH-DIP battery addition: registers the method with peft)
from fishdip_peft import FishDipConfig
"""

TEST_CASES = f"""\
    ############
    # FISH-DIP #  (battery addition, mirrors the SHiRA cases above)
    ############
    ("Vanilla MLP 1 FISH-DIP", "MLP", FishDipConfig, {{{FISHDIP}, "target_modules": "lin0"}}),
    ("Vanilla MLP 2 FISH-DIP", "MLP", FishDipConfig, {{{FISHDIP}, "target_modules": ["lin0"]}}),
    ("Vanilla MLP 3 FISH-DIP", "MLP", FishDipConfig, {{{FISHDIP}, "target_modules": ["lin1"]}}),
    (
        "Vanilla MLP 4 FISH-DIP",
        "MLP",
        FishDipConfig,
        {{{FISHDIP}, "target_modules": ["lin0", "lin1"], "seed": 56}},
    ),
    (
        "Vanilla MLP 5 FISH-DIP",
        "MLP",
        FishDipConfig,
        {{{FISHDIP}, "target_modules": ["lin0"]}},
    ),
"""

MULTIPLE_ACTIVE_ADAPTERS_CASES = f"""\
    (
        "FISH-DIP Same",
        "fishdip",
        FishDipConfig,
        {{{FISHDIP}, "target_modules": ["lin0"], "init_weights": False, "seed": 1}},
        {{{FISHDIP}, "target_modules": ["lin0"], "init_weights": False, "seed": 2}},
    ),
    (
        "FISH-DIP Different",
        "fishdip",
        FishDipConfig,
        {{{FISHDIP}, "target_modules": ["lin0"], "init_weights": False, "seed": 1}},
        {{{FISHDIP}, "target_modules": ["lin1"], "init_weights": False, "seed": 2}},
    ),
"""

# (anchor text, what to insert, before/after the anchor)
EDITS = [
    ("\nfrom peft.tuners import lora\n", "\n" + IMPORTS.rstrip("\n"), "before"),
    ("    ###############\n    # Supertuning #\n", TEST_CASES, "before"),
    (
        '        "SHiRA Different",\n'
        '        "shira",\n'
        "        ShiraConfig,\n"
        '        {"r": 1, "target_modules": ["lin0"], "init_weights": False},\n'
        '        {"r": 1, "target_modules": ["lin1"], "init_weights": False},\n'
        "    ),\n",
        MULTIPLE_ACTIVE_ADAPTERS_CASES,
        "after",
    ),
]


# Diagnostic only (`--keep-identity-start`): peft's `set_init_weights_false` returns FishDipConfig's
# kwargs unchanged instead of adding `init_weights=False`, so the tests that call it get past the
# TypeError and show what they would check next (starting from an identity adapter, as FISH-DIP does).
INIT_WEIGHTS_ANCHOR = "    kwargs = kwargs.copy()\n\n    if issubclass(config_cls, PromptLearningConfig):\n"
INIT_WEIGHTS_PASSTHROUGH = (
    '    if config_cls.__name__ == "FishDipConfig":  # battery diagnostic: FishDipConfig has no init_weights\n'
    "        return kwargs.copy()\n"
)


def _insert(source: str, anchor: str, text: str, where: str, filename: str) -> str:
    count = source.count(anchor)
    if count != 1:
        raise RuntimeError(f"anchor found {count} times (expected once) in {filename}:\n{anchor}")
    return source.replace(anchor, text + anchor if where == "before" else anchor + text)


def patch_source(source: str) -> str:
    """`test_custom_models.py`'s text with the FISH-DIP additions."""
    for anchor, text, where in EDITS:
        source = _insert(source, anchor, text, where, "test_custom_models.py")
    return source


def apply(tests_dir: Path, keep_identity_start: bool = False) -> None:
    """Patch `tests_dir/test_custom_models.py` in place and make `tests_dir` a package (the sdist ships
    the tests without `__init__.py`, and they import each other relatively)."""
    tests_dir = Path(tests_dir)
    path = tests_dir / "test_custom_models.py"
    path.write_text(patch_source(path.read_text()))
    (tests_dir / "__init__.py").touch()
    if keep_identity_start:
        utils = tests_dir / "testing_utils.py"
        utils.write_text(_insert(utils.read_text(), INIT_WEIGHTS_ANCHOR, INIT_WEIGHTS_PASSTHROUGH, "before", utils.name))
