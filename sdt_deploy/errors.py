"""The one exception type users see: its message is the single line the CLI prints."""
import re


class DeployError(Exception):
    """A problem with the user's input (file, option, array) that the CLI reports in one line."""

    exit_code = 2


class MismatchError(DeployError):
    """A verification found differing spikes."""

    exit_code = 1


# torch's advice when a weights-only load fails: load the file again with weights_only=False, which runs
# whatever the pickle asks for. Never shown to a user: a message is cut where the advice begins.
_UNSAFE_ADVICE = re.compile(
    r"Weights only load failed|This file can still be loaded|In PyTorch 2\.6, we changed|Re-running `torch\.load`"
    r"|`weights_only` set to `False`|weights_only\s*=\s*False|Do it only if you got the file from a trusted source"
    r"|add_safe_globals|safe_globals\(|to allowlist this global", re.IGNORECASE)


def without_unsafe_advice(text: str) -> str:
    """`text` cut before torch's advice to load with weights_only=False (and what comes after it)."""
    m = _UNSAFE_ADVICE.search(text)
    if m is None:
        return text
    return text[:m.start()].rstrip(" \t\n.,:;(-")
