"""User-facing errors: one line naming the file, line or key; no traceback unless asked."""

from __future__ import annotations

import errno
import functools
import os
import re
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the project: stages/, flows/, tuneoff/
TRACEBACKS = Path("logs")  # under the folder a command runs in (the project root, for a DVC stage)
# errnos a retry on the same or another machine can clear: the network, or storage under load
NETWORK_OR_STORAGE = {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                      errno.ECONNABORTED, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EAGAIN}
# exception names, anywhere in a class's bases, of the HTTP clients' connection failures and timeouts
# (requests, urllib3, httpx: the libraries under huggingface_hub, wandb and Prefect), and torch.distributed's
# (a peer process of a multi-device run lost: DistBackendError, DistNetworkError, DistStoreError)
TRANSIENT_NAMES = {"ConnectionError", "Timeout", "TimeoutError", "TimeoutException", "TransportError", "ProtocolError",
                   "DistError"}


class TuneoffError(Exception):
    """An error the user can act on; its message is the whole story."""


def transient(e: BaseException) -> bool:
    """Whether `e`, or an exception it was raised from, is a failure another attempt may not meet: a
    connection refused or reset, a timeout, an I/O error, a lost peer process."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (getattr(e, "errno", None) in NETWORK_OR_STORAGE
                or any(c.__name__ in TRANSIENT_NAMES for c in type(e).__mro__)):
            return True
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return False


def bug_line(e: BaseException, name: str) -> str:
    """One line for an exception tuneoff did not expect: its type, message and the innermost place in
    the project it came through; the whole traceback goes to logs/<name>.traceback, which the line names."""
    path = TRACEBACKS / (re.sub(r"[^\w.@-]", "_", name) + ".traceback")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(e)), encoding="utf-8")
        saved = f"traceback: {path}"
    except OSError as why:
        saved = f"traceback not saved ({why.strerror}): rerun with TUNEOFF_DEBUG=1"
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if Path(f.filename).is_relative_to(ROOT) and ".venv" not in Path(f.filename).parts]
    at = (ours or frames)[-1] if frames else None
    where = f" at {Path(at.filename).relative_to(ROOT) if at in ours else at.filename}:{at.lineno}" if at else ""
    message = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {message}{where} ({saved})"


def user_errors(main):
    """Run `main`; a failure that would recur on another attempt ends it with one line and exit 1: a
    TuneoffError (its message is the whole story) or any other exception (a bug: bug_line). A network
    or storage failure (transient) keeps its traceback, so a flow knows to retry the stage.
    TUNEOFF_DEBUG=1 shows every traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as e:
            if os.environ.get("TUNEOFF_DEBUG") or (transient(e) and not isinstance(e, TuneoffError)):
                raise
            # logs/evaluate-extraction-lora.traceback for `python -m stages.evaluate extraction lora --run-dir ...`
            # (its string arguments; the paths are not)
            name = "-".join([Path(main.__code__.co_filename).stem,
                             *(a for a in [*args, *kwargs.values()] if isinstance(a, str))])
            print(f"error: {e if isinstance(e, TuneoffError) else bug_line(e, name)}", file=sys.stderr)
            sys.exit(1)

    return wrapper
