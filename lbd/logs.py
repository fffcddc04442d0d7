"""lbd's own log: stderr, one line per event, as text for people or JSON for log pipelines.

`--log-format json` writes one object per line: `time` (RFC 3339, UTC, ms), `level`, `logger`,
`message`, `worker` in a worker's lines, and for an audit line (logger `lbd.audit`) an `audit`
object with its fields.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Final

LEVELS: Final = ("debug", "info", "warning", "error")
FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s {name} %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        line: dict[str, object] = {
            "time": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            line["worker"] = self.worker
        audit = getattr(record, "audit", None)
        if audit is not None:
            line["audit"] = audit
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"), default=str)


def setup(level: str, log_format: str, worker: int | None = None) -> None:
    """Configure the root logger once, at start. The arguments are checked by the caller. A worker's
    lines name it (`lbd/w2`; in JSON, `"worker": 2`): several workers share the supervisor's stderr."""
    handler = logging.StreamHandler(sys.stderr)
    name = "lbd" if worker is None else f"lbd/w{worker}"
    text = logging.Formatter(TEXT_FORMAT.format(name=name))
    handler.setFormatter(JsonFormatter(worker) if log_format == "json" else text)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
