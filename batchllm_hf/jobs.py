"""Resumable progress for long jobs: finished rows are appended to a JSON-lines log as they finish.

Each line is one finished row: {"row": i, "text": ..., "token_ids": [...], "finish_reason": ...}. A line is
written whole and flushed (a crash can cut only the last line, which `load` ignores); the file is fsynced
every few seconds. Rows complete in whatever order the engine finishes them; the final output is written
in input order from these records, so a resumed run produces the same final file as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time


class ProgressLog:
    """Append-only log of finished rows at `path`."""

    def __init__(self, path: str, *, resume: bool, fsync_seconds: float = 2.0):
        self.path = path
        self.fsync_seconds = fsync_seconds
        self.done = load(path) if resume else {}
        if not resume and os.path.exists(path):
            os.remove(path)
        if resume and os.path.exists(path):
            _drop_torn_tail(path)
        self._file = open(path, "a", encoding="utf-8")
        self._last_sync = time.monotonic()

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        self.done[record["row"]] = record
        if time.monotonic() - self._last_sync > self.fsync_seconds:
            os.fsync(self._file.fileno())
            self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path: str) -> dict[int, dict]:
    """Finished rows recorded at `path` (a missing file is an empty log; a torn last line is ignored)."""
    if not os.path.exists(path):
        return {}
    done = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # cut off mid-write by a crash
            record = json.loads(line)
            done[int(record["row"])] = record
    return done


def _drop_torn_tail(path: str) -> None:
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            f.truncate(keep)
