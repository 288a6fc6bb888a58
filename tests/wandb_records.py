"""Read W&B's offline run files (run-<id>.wandb) back, to check what a stage logged.

The file is a LevelDB-style log (W&B's "datastore" format): a 7-byte header, then 32 KiB
blocks of records, each a 7-byte header (CRC32, length, type: full/first/middle/last) and a
chunk of a serialized `wandb_internal.Record` protobuf. wandb >= 0.2x reads it in Go
(wandb-core) and ships no Python reader, so this is the few lines it takes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    out, pos, parts = [], 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += BLOCK - pos % BLOCK
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (FULL, FIRST) else parts + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """What one offline run holds: its identity, config, summary, history and artifacts."""

    path: Path
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    alerts: list = field(default_factory=list)
    artifacts: list = field(default_factory=list)
    exit_code: int | None = None


def read_run(run_dir: Path) -> OfflineRun:
    (wandb_file,) = Path(run_dir).glob("run-*.wandb")
    run = OfflineRun(run_dir)
    for r in records(wandb_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run.name, run.group, run.job_type = r.run.display_name, r.run.run_group, r.run.job_type
            run.tags = list(r.run.tags)
            run.config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            run.config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "artifact":
            run.artifacts.append({"name": r.artifact.name, "type": r.artifact.type,
                                  "aliases": list(r.artifact.aliases),
                                  "metadata": json.loads(r.artifact.metadata or "{}"),
                                  "files": [m.path for m in r.artifact.manifest.contents],
                                  "refs": [m.ref for m in r.artifact.manifest.contents]})
        elif kind == "alert":
            run.alerts.append({"title": r.alert.title, "text": r.alert.text, "level": r.alert.level})
        elif kind == "exit":
            run.exit_code = r.exit.exit_code
    return run


def read_runs(wandb_dir: Path) -> list[OfflineRun]:
    return [read_run(d) for d in sorted(Path(wandb_dir).glob("offline-run-*"))]
