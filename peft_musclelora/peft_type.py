"""A `PeftType` member for MuScleLoRA.

PEFT's `register_peft_method` only accepts names that `PeftType` already lists, and the enum has no public way to grow.
The member is therefore added through the enum's own bookkeeping tables, once: importing this module again (or
under a second name) finds the member and leaves the enum unchanged.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

MUSCLELORA_NAME = "musclelora"


def _extend_peft_type(value: str) -> PeftType:
    existing = PeftType.__members__.get(value)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member.__objclass__ = PeftType
    member.__init__(value)
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(value)
    # EnumType.__setattr__ refuses to rebind member names, so go around it as Enum's own construction does.
    type.__setattr__(PeftType, value, member)
    return member


MUSCLELORA_PEFT_TYPE: PeftType = _extend_peft_type(MUSCLELORA_NAME.upper())
