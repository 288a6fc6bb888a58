"""The Prefect server a flow run reports to: $PREFECT_API_URL when set, else Prefect's temporary local
server, started here so that its first start (creating and migrating its SQLite database, 15 s on an
idle 2-core machine, more on a busy one) gets the time it needs, and a failure is one line."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from tuneoff.core.errors import TuneoffError

STARTUP_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"  # Prefect's own; its default is 20 s
STARTUP_SECONDS = 300


def ensure_server() -> None:
    """Check the configured server answers, or start the temporary one and wait until it does."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        try:
            httpx.get(f"{url.rstrip('/')}/health", timeout=10).raise_for_status()
        except httpx.HTTPError as e:
            raise TuneoffError(f"cannot reach the Prefect server at PREFECT_API_URL={url} ({type(e).__name__}): "
                               "start it (`prefect server start`), or unset PREFECT_API_URL for a temporary "
                               "local server") from None
        return

    from prefect.server.api.server import SubprocessASGIServer

    timeout = int(os.environ.get(STARTUP_SETTING, STARTUP_SECONDS))
    url = PREFECT_API_DATABASE_CONNECTION_URL.value() or ""
    database = Path(url.split(":///", 1)[1]) if url.startswith("sqlite") else None
    first = database is not None and not database.exists()
    print("starting a temporary local Prefect server"
          + (f" (first run: creating its database {database}, up to a minute or two)" if first else ""), flush=True)
    try:
        SubprocessASGIServer().start(timeout=timeout)  # the instance the flow's client then finds running
    except Exception as e:  # Prefect raises RuntimeError with the server's whole output
        reason = " ".join(str(e).split())[:200]
        raise TuneoffError(f"the temporary Prefect server did not start within {timeout} s ({reason}): "
                           f"raise {STARTUP_SETTING}, or run `prefect server start` and set "
                           "PREFECT_API_URL=http://127.0.0.1:4200/api") from None
