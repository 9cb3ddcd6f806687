"""The JSON Schema files in `edge/schemas/`, generated from the payload models (commands, answers, verdicts)
and the bundle manifest.

Regenerate them after changing a model: `python -m ganspect.edge.schema_files`; a test
holds the files equal to what this module writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ganspect.edge.manifest import manifest_json_schema
from ganspect.edge.payloads import COMMANDS, CommandResult, ReloadCommand, ThresholdCommand, TriggerCommand
from ganspect.edge.verdict import Verdict

STATUS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://ganspect.example/schemas/status/1",
    "title": "ganspect status",
    "description": "The retained payload of <prefix>/<site>/<line>/<station>/status: the bare UTF-8 word, not "
    "JSON-quoted (validate the decoded text as a string). online: connected; stopped: ended cleanly; "
    "offline: the last will, published by the broker when the daemon vanished.",
    "type": "string",
    "enum": ["online", "offline", "stopped"],
}


def _one_line_descriptions(node: Any) -> Any:
    # Docstrings become descriptions with their line breaks; a schema reads better without them.
    if isinstance(node, dict):
        return {
            key: " ".join(value.split())
            if key == "description" and isinstance(value, str)
            else _one_line_descriptions(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_one_line_descriptions(item) for item in node]
    return node


def _schema_of(model: type[BaseModel], name: str, title: str) -> dict[str, Any]:
    # Commands are read (validation); answers are written (serialization: every field is always there).
    schema = model.model_json_schema(
        by_alias=True, mode="validation" if model in COMMANDS.values() else "serialization"
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://ganspect.example/schemas/{name}/1",
        **_one_line_descriptions(schema),
        "title": title,
    }


def schemas() -> dict[str, dict[str, Any]]:
    """Every JSON Schema this module defines, by file name in `edge/schemas/`."""
    return {
        "cmd-trigger.schema.json": _schema_of(TriggerCommand, "cmd-trigger", "ganspect cmd/trigger"),
        "cmd-reload.schema.json": _schema_of(ReloadCommand, "cmd-reload", "ganspect cmd/reload"),
        "cmd-threshold.schema.json": _schema_of(ThresholdCommand, "cmd-threshold", "ganspect cmd/threshold"),
        "cmd-result.schema.json": _schema_of(CommandResult, "cmd-result", "ganspect cmd/result"),
        "status.schema.json": STATUS_SCHEMA,
        "verdict.schema.json": _schema_of(Verdict, "verdict", "ganspect verdict"),
        "manifest.schema.json": manifest_json_schema(),
    }


def schema_text(schema: dict[str, Any]) -> str:
    # ASCII: the id pattern's code points beyond the BMP are written as JSON surrogate pairs, not as invisible text.
    return json.dumps(schema, indent=2, ensure_ascii=True) + "\n"


def write_schemas(folder: Path | None = None) -> list[Path]:
    """Regenerate the schema files (after changing a model): `python -m ganspect.edge.schema_files`."""
    folder = folder or Path(__file__).parent / "schemas"
    written = []
    for name, schema in schemas().items():
        path = folder / name
        path.write_text(schema_text(schema), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for written in write_schemas():
        print(written)
