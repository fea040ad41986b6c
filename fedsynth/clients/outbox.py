"""The node's outbox log: one JSON line per message that left the node.

A Flower client mod placed outermost, so it sees each reply exactly as it leaves (after
SecAgg+ has masked it): time, run, round, message type, bytes, what the reply holds, and
the epsilon the node reported. ``fedsynth node outbox`` prints it, so an institution can
see exactly what it shared, and that it never included a row. A message the node could not
answer (its table does not fit the spec, say) also keeps, as ``local_detail``, the full
reason, rows and values included, which only this log holds: the reply carries the kinds of
problem alone.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedsynth.clients.node import NodeConfigError, resolve_context
from fedsynth.privacy import protocol

#: Where a handler leaves, in the node's context, the full reason it did not take part
#: (rows, values, paths): the outbox keeps it as ``local_detail``; it is never sent.
LOCAL_NOTE_RECORD = "fedsynth-local-note"


def message_bytes(message: Message) -> int:
    """Payload size: array bytes plus the UTF-8 size of config and metric values."""
    if not message.has_content():
        return len(str(message.error.reason).encode())
    content = message.content
    size = sum(len(a.data) for r in content.array_records.values() for a in r.values())
    for records in (content.config_records, content.metric_records):
        for record in records.values():
            for key, value in record.items():
                size += len(key.encode()) + _size(value)
    return size


def _size(value: Any) -> int:
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(_size(v) for v in value)
    return 8  # a number or a bool


def describe(message: Message) -> dict[str, Any]:
    """What a reply holds: record names and, per array record, the array count."""
    if not message.has_content():
        return {"error": str(message.error.reason)[:200]}
    content = message.content
    return {
        "arrays": {k: len(v) for k, v in content.array_records.items()},
        "configs": sorted(content.config_records),
        "metrics": {k: dict(v) for k, v in content.metric_records.items()},
    }


def outbox_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    try:
        reply = call_next(message, context)
    except Exception as exc:
        # Flower sends the server the exception's text in an error reply: log that too
        _log(message, context, None, error=f"{type(exc).__name__}: {exc}")
        raise
    _log(message, context, reply)
    return reply


def _log(message: Message, context: Context, reply: Message | None, error: str = "") -> None:
    note = context.state.config_records.pop(LOCAL_NOTE_RECORD, None)
    try:
        config = resolve_context(context)
    except NodeConfigError:
        return  # nothing to log to; the handler has already said why
    entry: dict[str, Any] = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "run": message.metadata.run_id,
        "round": message.metadata.group_id,
        "type": message.metadata.message_type,
        "bytes": len(error.encode()) if reply is None else message_bytes(reply),
        "content": {"error": error[:200]} if reply is None else describe(reply),
    }
    if note is not None:  # the full reason of a refusal to take part: never sent
        entry["local_detail"] = str(note.get("detail", ""))
    if reply is None:
        entry["status"] = "error"
    elif reply.has_content():  # legacy fit/evaluate replies keep metrics in config records
        content = reply.content
        records = [*content.metric_records.values(), *content.config_records.values()]
        for record in (cast(dict[str, Any], r) for r in records):
            if protocol.EPSILON in record:
                entry["epsilon_reported"] = record[protocol.EPSILON]
            if protocol.STATUS in record:
                entry["status"] = record[protocol.STATUS]
    append_line(config.outbox_path, entry)


def append_line(path: Path, entry: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
    try:
        os.write(fd, (json.dumps(entry, default=str) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_outbox(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
