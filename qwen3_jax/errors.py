"""What a user is told when something cannot work, in one place: the error types every layer
raises (each message names the file, setting or value), and the warning for a renamed setting.

The launch tools catch these and end with that one line and a non-zero exit code.
"""

from __future__ import annotations

import logging


class TrainingError(RuntimeError):
    """A run that cannot start or cannot go on; the message names the setting or file."""


class HFConversionError(ValueError):
    """A Hugging Face folder or config that cannot be converted; the message names what."""


class TokenizerExportError(HFConversionError):
    """A tokenizer that cannot be exported; the message names the file and the reason."""


class ReportError(ValueError):
    """A report's missing or malformed input; the message names the file or the value."""


_told: set[tuple[str, str]] = set()


def renamed(setting: str, old: str, new: str) -> None:
    """Logs once per process that `setting`'s old name or value `old` is now `new` (still accepted)."""
    if (setting, old) in _told:
        return
    _told.add((setting, old))
    logging.getLogger("qwen3_jax").warning("%s: %r is now called %r (the old name still works; please update it)",
                                           setting, old, new)
