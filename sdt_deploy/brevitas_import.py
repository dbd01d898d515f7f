"""brevitas, imported without torch._dynamo.

`import brevitas` reads `torch._dynamo.is_compiling` once, at import, to keep as its
`is_dynamo_compiling`; touching `torch._dynamo` makes torch import its whole compiler stack (sympy,
torch.fx's symbolic shapes, torch.export: measured 0.85 s of an export's ~6 s on a 2-core machine),
none of which the weight quantization uses. `torch._dynamo.is_compiling` is
`torch.compiler.is_compiling` (torch/_dynamo/external_utils.py: it returns exactly that), so for the
length of the import `torch._dynamo` is a namespace holding that one function; it is removed right
after, and any later `torch._dynamo` access imports the real module as before. Where the real module is
already loaded (a test run, a user's session), brevitas simply gets it.
"""
from __future__ import annotations

import sys
import threading
import types

_lock = threading.Lock()


def import_brevitas() -> None:
    """Import the brevitas modules the quantizer uses (idempotent, thread-safe)."""
    if "brevitas.nn" in sys.modules and "brevitas.quant.fixed_point" in sys.modules:
        return
    import torch

    with _lock:
        shim = "torch._dynamo" not in sys.modules and "_dynamo" not in vars(torch) and \
            callable(getattr(getattr(torch, "compiler", None), "is_compiling", None))
        if shim:
            torch._dynamo = types.SimpleNamespace(is_compiling=torch.compiler.is_compiling)
        try:
            import brevitas.core.stats.stats_op  # noqa: F401
            import brevitas.nn  # noqa: F401
            import brevitas.quant.fixed_point  # noqa: F401
        finally:
            if shim:
                del torch._dynamo
