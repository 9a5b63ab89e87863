"""Structured logs: one JSON object per line, with the request id.

Every log line the process writes goes through :class:`JsonFormatter`: ours,
uvicorn's, and any library's (python-multipart, asyncio, warnings), through the
root logger.
"""

from __future__ import annotations

import json
import logging
import logging.config
import time
from contextvars import ContextVar

request_id: ContextVar[str] = ContextVar("request_id", default="-")  # set per request by the HTTP middleware
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "request_id", ...extra fields}``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
               "request_id": request_id.get()}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str = "info") -> dict:
    """Route our loggers and uvicorn's through :class:`JsonFormatter`; returns
    the dictConfig also handed to uvicorn."""
    config = {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": "WARNING"},  # libraries: warnings and errors, as JSON
        "loggers": {name: {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
                    for name in ("msdnet", "uvicorn", "uvicorn.error")},
    }
    config["loggers"]["uvicorn.access"] = {"handlers": [], "level": "WARNING", "propagate": False}
    logging.config.dictConfig(config)
    logging.captureWarnings(True)  # warnings.warn lines too
    return config

