"""User-facing errors: one line that names the file, the field and the fix."""

from __future__ import annotations

import os


class DecodeAccelError(Exception):
    """An error caused by the user's input (a file, a config value, a flag).

    The CLI prints ``str(error)`` as one line and exits non-zero, without a traceback unless
    ``--debug`` is given.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, field: str | None = None,
                 fix: str | None = None):
        parts = []
        if path is not None:
            parts.append(f"{os.fspath(path)}:")
        if field is not None:
            parts.append(f"{field}:")
        parts.append(message.rstrip("."))
        text = " ".join(parts)
        if fix:
            text += f" ({fix})"
        super().__init__(text)
        self.path = path
        self.field = field
        self.fix = fix
