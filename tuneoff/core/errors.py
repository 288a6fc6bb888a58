"""User-facing errors: one line naming the file, line or key; no traceback unless asked."""

from __future__ import annotations

import functools
import os
import sys


class TuneoffError(Exception):
    """An error the user can act on; its message is the whole story."""


def user_errors(main):
    """Run `main`; print a TuneoffError as one line and exit 1 (TUNEOFF_DEBUG=1 shows the traceback)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except TuneoffError as e:
            if os.environ.get("TUNEOFF_DEBUG"):
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    return wrapper
