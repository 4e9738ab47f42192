"""FISH-DIP's member of peft's `PeftType` enum.

peft 0.21 registers methods by a member of `PeftType`, which has no FISHDIP member, so one is added
here (the same object peft's own members are: a `str` enum member whose value is its name). Adding a
member changes no other method's behaviour.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

PEFT_METHOD_NAME = "fishdip"


def _add_peft_type_member(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    if hasattr(PeftType, "_add_member_"):  # Python >= 3.13
        PeftType._add_member_(name, member)
    else:
        PeftType._member_map_[name] = member
        type.__setattr__(PeftType, name, member)
    PeftType._value2member_map_[name] = member
    if name not in PeftType._member_names_:
        PeftType._member_names_.append(name)
    return member


FISHDIP_PEFT_TYPE = _add_peft_type_member(PEFT_METHOD_NAME.upper())
