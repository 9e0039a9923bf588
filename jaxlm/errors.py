"""The errors that stop a command with one line: a config the user can fix (`ConfigError`, exit 2)
and a run that cannot go on (`RunFailed`, exit 3)."""
from jaxlm.config.schema import ConfigError

__all__ = ["ConfigError", "RunFailed"]


class RunFailed(RuntimeError):
    """Training cannot go on: it diverged past its restores, no step was finite, or a checkpoint
    could not be written. The message says what failed and what was kept."""
