"""The one place mos_ext touches PEFT beyond its public API.

PEFT lets a new method register its config and tuner classes (``register_peft_method``), but the
method's name must already be a member of the ``PeftType`` enum, which PEFT closes. Adding the
member ``MOS`` is the only PEFT internal mos_ext changes; it is done here, once, and checked.
Everything else (``PeftConfig``, ``BaseTuner``, ``BaseTunerLayer``, ``get_peft_model``,
``PeftModel.from_pretrained``, ``save_pretrained``) is PEFT's public API.

Supported PEFT: ``PEFT_MIN <= peft < PEFT_MAX`` (tested with the oldest and the newest).
"""
from __future__ import annotations

import enum

try:
    import peft as _peft
except ImportError as e:  # pragma: no cover - peft is a dependency of the training API
    raise ImportError("mos_ext's adapters are a PEFT method: install peft (pip install 'peft>=0.18,<0.22')") from e

from packaging.version import Version

PEFT_MIN = "0.18.0"
PEFT_MAX = "0.22.0"  # exclusive

NAME = "mos"  # PEFT method name; PeftType member "MOS"; parameter prefix "mos_"
PREFIX = "mos_"


def check_version(version: str = None) -> None:
    v = Version(version or _peft.__version__)
    if not (Version(PEFT_MIN) <= v < Version(PEFT_MAX)):
        raise ImportError(f"mos_ext supports peft >= {PEFT_MIN}, < {PEFT_MAX}; found peft {v}. Install a supported "
                          f"version (pip install 'peft>={PEFT_MIN},<{PEFT_MAX}') or a mos_ext release that supports "
                          f"peft {v}.")


check_version()

from peft import PeftConfig  # noqa: E402  (public API)
from peft.utils import PeftType  # noqa: E402


def _fail(what: str, err: Exception):
    raise RuntimeError(f"mos_ext cannot register its PEFT method on peft {_peft.__version__}: {what} ({err!r}). "
                       f"Supported: peft >= {PEFT_MIN}, < {PEFT_MAX}.") from err


def mos_peft_type() -> PeftType:
    """``PeftType.MOS``, added to PEFT's enum on first use (the one PEFT internal touched)."""
    member = PeftType.__members__.get(NAME.upper())
    if member is not None:
        return member
    try:
        if not (issubclass(PeftType, str) and issubclass(PeftType, enum.Enum)):
            raise TypeError("PeftType is no longer a str Enum")
        member = str.__new__(PeftType, NAME.upper())
        member._name_ = NAME.upper()
        member._value_ = NAME.upper()
        member.__objclass__ = PeftType
        member.__init__()
        type.__setattr__(PeftType, NAME.upper(), member)
        PeftType._member_map_[NAME.upper()] = member
        PeftType._value2member_map_[NAME.upper()] = member
        PeftType._member_names_.append(NAME.upper())
    except Exception as e:  # noqa: BLE001 - any change in the enum's internals
        _fail("adding MOS to peft.utils.PeftType", e)
    if PeftType(NAME.upper()) is not member or NAME.upper() not in list(PeftType) or getattr(PeftType, NAME.upper()) is not member:
        _fail("adding MOS to peft.utils.PeftType", AssertionError("the new member is not visible"))
    return member


def peft_method(config_cls):
    """Class decorator of the tuner: registers ``(config_cls, tuner)`` as PEFT's MoS method when the
    tuner class is defined (idempotent), as PEFT's own methods register in their package."""

    def deco(model_cls):
        _register(config_cls, model_cls)
        return model_cls

    return deco


_REGISTERED = False


def _register(config_cls, model_cls) -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    t = mos_peft_type()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(t) is not model_cls:
        try:
            register_peft_method(name=NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
        except Exception as e:  # noqa: BLE001
            _fail("peft.utils.register_peft_method", e)
    _REGISTERED = True

# Base classes of a PEFT method (public in every supported version). BufferDict is the container
# PEFT's own methods use for per-adapter buffers; PEFT's state-dict code recognizes it.
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer  # noqa: E402

try:
    from peft.tuners._buffer_dict import BufferDict  # noqa: E402
except ImportError as e:  # pragma: no cover
    _fail("importing peft.tuners._buffer_dict.BufferDict", e)
