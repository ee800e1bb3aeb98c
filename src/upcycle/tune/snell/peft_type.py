"""SNELL's place in peft: the peft versions it is tested with and the ``PeftType.SNELL`` member.

peft registers a method only under a name of its closed ``PeftType`` enum
(``register_peft_method`` refuses others), so SNELL adds its member to that enum: the
smallest workaround that lets ``PeftConfig.from_pretrained``, ``PeftModel.from_pretrained``
and the ``AutoPeftModel*`` classes find it. It touches peft's internals, so it is made only on
the peft versions the tests run (:data:`TESTED_PEFT`); on any other version nothing is
changed and the first use of SNELL (a :class:`SnellConfig`) raises :data:`PEFT_ERROR`, one
clear error instead of a stack trace from inside peft.
"""

from __future__ import annotations

import peft
from packaging.specifiers import SpecifierSet
from peft.utils.peft_types import PeftType

from ...errors import UpcycleError

TESTED_PEFT = ">=0.21,<0.22"
"""The peft versions SNELL's integration is tested with (pinned in pyproject's extras)."""
NAME = "SNELL"


def _version_error() -> str | None:
    if peft.__version__ in SpecifierSet(TESTED_PEFT):
        return None
    return (f"SNELL's peft integration is tested with peft {TESTED_PEFT}, this is peft "
            f"{peft.__version__}; install a tested one: pip install 'peft{TESTED_PEFT}'")


PEFT_ERROR = _version_error()
"""Why SNELL cannot be used with the installed peft, or None."""


def _add_member() -> None:
    """Add ``SNELL`` to ``PeftType`` as the enum's own members are made (a ``str`` enum)."""
    if NAME in PeftType.__members__:
        return
    member = str.__new__(PeftType, NAME)
    member._name_ = member._value_ = NAME
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[NAME] = member
    PeftType._value2member_map_[NAME] = member
    PeftType._member_names_.append(NAME)
    type.__setattr__(PeftType, NAME, member)


if PEFT_ERROR is None:
    _add_member()


def snell_peft_type() -> PeftType:
    """``PeftType.SNELL``; raises the version error where the member was not added."""
    if PEFT_ERROR is not None:
        raise UpcycleError(PEFT_ERROR)
    return PeftType.SNELL


__all__ = ["NAME", "PEFT_ERROR", "TESTED_PEFT", "snell_peft_type"]
