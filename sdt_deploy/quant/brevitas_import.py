"""brevitas, imported without torch._dynamo.

`import brevitas` reads `torch._dynamo.is_compiling` once, at import, to keep as its
`is_dynamo_compiling`; touching `torch._dynamo` makes torch import its whole compiler stack (sympy,
torch.fx's symbolic shapes, torch.export: measured 0.85 s of an export's ~6 s on a 2-core machine),
none of which the weight quantization uses. `torch._dynamo.is_compiling` is
`torch.compiler.is_compiling` (torch/_dynamo/external_utils.py: it returns exactly that), so for the
length of the import `torch._dynamo` is a namespace holding that one function; it is removed right
after, and any later `torch._dynamo` access imports the real module as before. Where the real module is
already loaded (a test run, a user's session), brevitas simply gets it; a brevitas whose import needs
more of torch._dynamo than that is imported again the plain way.
"""
from __future__ import annotations

import sys
import threading
import types

_lock = threading.Lock()


def _import_modules() -> None:
    import brevitas.core.stats.stats_op  # noqa: F401
    import brevitas.nn  # noqa: F401
    import brevitas.quant.fixed_point  # noqa: F401


def _forget_brevitas() -> None:
    for name in [m for m in sys.modules if m == "brevitas" or m.startswith("brevitas.")]:
        del sys.modules[name]


def import_brevitas() -> None:
    """Import the brevitas modules the quantizer uses (idempotent, thread-safe)."""
    if "brevitas.nn" in sys.modules and "brevitas.quant.fixed_point" in sys.modules:
        return
    import torch

    with _lock:
        stand_in_needed = "torch._dynamo" not in sys.modules and "_dynamo" not in vars(torch) and \
            callable(getattr(getattr(torch, "compiler", None), "is_compiling", None))
        if not stand_in_needed:
            _import_modules()
            return
        stand_in = types.SimpleNamespace(is_compiling=torch.compiler.is_compiling)
        torch._dynamo = stand_in
        try:
            _import_modules()
        except Exception:  # noqa: BLE001 - this brevitas wants more of torch._dynamo: the plain way
            _remove(torch, stand_in)
            _forget_brevitas()
            _import_modules()
        finally:
            _remove(torch, stand_in)


def _remove(torch, stand_in) -> None:
    """Take the stand-in away (not the real module, should the import have loaded it meanwhile)."""
    if vars(torch).get("_dynamo") is stand_in:
        del torch._dynamo
