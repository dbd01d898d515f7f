"""The one exception type users see: its message is the single line the CLI prints."""


class DeployError(Exception):
    """A problem with the user's input (file, option, array) that the CLI reports in one line."""

    exit_code = 2


class MismatchError(DeployError):
    """A verification found differing spikes."""

    exit_code = 1
