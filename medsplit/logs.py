"""How the processes log: lines for a person, or one JSON object a line for a log collector.

``medsplit --log-format json`` (or ``MEDSPLIT_LOG_FORMAT=json``, which the images' users can
set in a pod spec) writes ``{"time", "level", "logger", "message"}`` objects, plus
``exception`` when there is one, so Loki, Elasticsearch or Cloud Logging parse them as they are.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Their INFO is noise to a reader (dicomweb_client's names every instance it retrieves).
QUIET = ("medsplit.transport.paho", "amqtt", "transitions", "dicomweb_client")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def default_format() -> LogFormat:
    return "json" if os.environ.get("MEDSPLIT_LOG_FORMAT", "").lower() == "json" else "text"


def configure(log_format: LogFormat) -> None:
    """The process's logging, once (like ``basicConfig``: a host that configured logging
    already, a test runner say, keeps its handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    for chatty in QUIET:
        logging.getLogger(chatty).setLevel(logging.WARNING)
