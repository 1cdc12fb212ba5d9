"""Validate REST traffic against Discord's official OpenAPI 3.1 spec.

The spec (``tests/data/discord/openapi.json``, ~1 MB: discord/discord-api-spec,
``specs/openapi.json`` at commit 74fda0fad044407ea280043a03ffc9bc64c4e49e, MIT, see the
LICENSE next to it) is loaded once per process. Each
request is matched to an operation (path template + method, literal segments winning over
``{params}`` as in Discord's router), then its path/query parameters and JSON body are checked
with ``jsonschema`` (Draft 2020-12) through a ``referencing`` registry that holds the whole
spec, so ``$ref``s resolve lazily. Compiled validators are cached per schema location.

openapi-core is not used: building its spec object takes ~8 s for this document, and the
quirks below need schema patches anyway.

Deliberate deviations from the raw spec (known quirks; where the spec and Discord's
documentation differ, the documentation wins):

- ``SnowflakeType`` also accepts non-negative integers: Discord accepts them, and discord.py
  sends ints (``attachments[].id``, ``allowed_mentions.users``...).
- ``default_member_permissions`` may be a string of digits (the docs' type; discord.py
  sends strings), not only the spec's integer.
- Message ``content`` is limited to 2000 characters (the spec says 4000; Discord's docs and
  its API for bots say 2000).
- Multipart bodies: the ``payload_json`` part is validated as the JSON body; the other parts
  must be ``files[n]`` with a matching ``attachments[].id == n`` and a size within the
  interaction's ``attachment_size_limit``.
- The Interaction object is not in the spec: :data:`INTERACTION_SCHEMA` is written from
  Discord's documentation and reuses the spec's component schemas.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match, relevance
from referencing import Registry
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parents[1] / "data" / "discord" / "openapi.json"
SPEC_URI = "urn:discord:openapi"
INTERACTION_URI = "urn:discord:interaction"

_FILES_PART = re.compile(r"^files\[(\d+)\]$")
# Upload placeholders are small integers (0..9); anything bigger is an existing attachment.
_MAX_UPLOAD_INDEX = 1 << 22
_BOT_CONTENT_LIMIT = 2000


class UploadedFileLike(Protocol):
    """What the validator needs from a multipart file part."""

    field: str
    filename: str | None
    data: bytes


class RequestLike(Protocol):
    """What the validator needs from a recorded request (see ``server.RecordedRequest``)."""

    method: str
    path: str
    query: Mapping[str, str]
    content_type: str
    json: Any
    raw_text: str | None
    files: list[Any]
    size_limit: int | None
    status: int | None
    response: Any


@dataclass(frozen=True)
class Operation:
    """One (path template, method) of the spec."""

    template: str
    method: str
    operation_id: str
    parameters: tuple[dict[str, Any], ...]
    body_content_types: tuple[str, ...]
    body_required: bool
    response_codes: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.method} {self.template} ({self.operation_id})"


@dataclass
class _Route:
    template: str
    pattern: re.Pattern[str]
    literals: int
    operations: dict[str, Operation] = field(default_factory=dict)


def path_shape(path: str) -> tuple[int, str]:
    """(number of segments, first segment) of a path or template: a parameter matches exactly
    one segment, and Discord's routes all start with a literal, so only templates of the same
    shape can match a path."""
    segments = path.strip("/").split("/")
    return len(segments), segments[0]


def _pointer(*parts: str) -> str:
    escaped = (p.replace("~", "~0").replace("/", "~1") for p in parts)
    return SPEC_URI + "#" + quote("/" + "/".join(escaped), safe="/~")


def _json_path(path: Iterable[Any]) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _wrong_branch(error: ValidationError) -> bool:
    """True when an anyOf/oneOf branch failed because it describes another shape."""
    if not error.relative_path and error.validator == "type":
        return True
    return list(error.relative_path) == ["type"] and error.validator in ("enum", "const")


def _leaf(error: ValidationError) -> ValidationError:
    """Descend anyOf/oneOf errors into the one branch that matches the instance's shape."""
    while error.context:
        branches: dict[Any, list[ValidationError]] = {}
        for sub in error.context:
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        viable = [errs for errs in branches.values() if not any(map(_wrong_branch, errs))]
        if len(viable) != 1:
            return best_match([error])
        error = max(viable[0], key=relevance)
    return error


def _describe(error: ValidationError) -> str:
    """One readable line for the most relevant leaf of a (possibly nested) error."""
    leaf = _leaf(error)
    message = leaf.message
    if len(message) > 240:
        message = message[:237] + "..."
    return f"{_json_path(leaf.absolute_path)}: {message}"


def _patch_quirks(spec: dict[str, Any]) -> dict[str, Any]:
    schemas = spec["components"]["schemas"]
    schemas["SnowflakeType"] = {
        "anyOf": [
            {"type": "string", "pattern": r"^(0|[1-9][0-9]*)$"},
            {"type": "integer", "minimum": 0},
        ]
    }
    # Docs: "default_member_permissions: ?string"; discord.py sends str(value).
    for schema in schemas.values():
        prop = schema.get("properties", {}).get("default_member_permissions")
        if prop is not None and "integer" in prop.get("type", ()):
            schema["properties"]["default_member_permissions"] = {
                "anyOf": [prop, {"type": ["string"], "pattern": r"^[0-9]+$"}]
            }
    for name in ("MessageCreateRequest", "MessageEditRequestPartial", "BaseCreateMessageCreateRequest"):
        content = schemas.get(name, {}).get("properties", {}).get("content")
        if content is not None:
            content["maxLength"] = _BOT_CONTENT_LIMIT
    return spec


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"{SPEC_URI}#/components/schemas/{name}"}


_SNOWFLAKE = _ref("SnowflakeType")
_OPTION_VALUE_TYPES = {
    3: {"type": "string"},
    4: {"type": "integer"},
    5: {"type": "boolean"},
    6: _SNOWFLAKE,
    7: _SNOWFLAKE,
    8: _SNOWFLAKE,
    9: _SNOWFLAKE,
    10: {"type": "number"},
    11: _SNOWFLAKE,
}

#: JSON schema of the Interaction object (Discord docs, "Interaction Object").
INTERACTION_SCHEMA: dict[str, Any] = {
    "$id": INTERACTION_URI,
    "$defs": {
        "option": {
            "type": "object",
            "required": ["name", "type"],
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 32},
                "type": {"type": "integer", "minimum": 1, "maximum": 11},
                "focused": {"type": "boolean"},
                "options": {"type": "array", "items": {"$ref": "#/$defs/option"}},
            },
            "allOf": [
                {
                    "if": {"properties": {"type": {"enum": [1, 2]}}},
                    "then": {"not": {"required": ["value"]}},
                    "else": {"required": ["value"]},
                },
                # A focused (autocomplete) value is the raw partial input, any type goes.
                *(
                    {
                        "if": {
                            "properties": {"type": {"const": t}},
                            "not": {"required": ["focused"]},
                        },
                        "then": {"properties": {"value": schema}},
                    }
                    for t, schema in _OPTION_VALUE_TYPES.items()
                ),
            ],
        },
        "command_data": {
            "type": "object",
            "required": ["id", "name", "type"],
            "properties": {
                "id": _SNOWFLAKE,
                "name": {"type": "string", "minLength": 1, "maxLength": 32},
                "type": {"enum": [1, 2, 3, 4]},
                "guild_id": _SNOWFLAKE,
                "target_id": _SNOWFLAKE,
                "resolved": {"type": "object"},
                "options": {"type": "array", "items": {"$ref": "#/$defs/option"}},
            },
        },
        "member": {
            "allOf": [
                _ref("GuildMemberResponse"),
                {"required": ["permissions"], "properties": {"permissions": {"type": "string"}}},
            ]
        },
    },
    "type": "object",
    "required": [
        "id",
        "application_id",
        "type",
        "token",
        "version",
        "entitlements",
        "authorizing_integration_owners",
        "attachment_size_limit",
    ],
    "properties": {
        "id": _SNOWFLAKE,
        "application_id": _SNOWFLAKE,
        "type": {"enum": [1, 2, 3, 4, 5]},
        "token": {"type": "string", "minLength": 1},
        "version": {"const": 1},
        "guild_id": _SNOWFLAKE,
        "channel_id": _SNOWFLAKE,
        "channel": {
            "anyOf": [
                _ref("GuildChannelResponse"),
                _ref("PrivateChannelResponse"),
                _ref("ThreadResponse"),
            ]
        },
        "guild": {"type": "object", "required": ["id"], "properties": {"id": _SNOWFLAKE}},
        "member": {"$ref": "#/$defs/member"},
        "user": _ref("UserResponse"),
        "message": _ref("MessageResponse"),
        "app_permissions": {"type": "string", "pattern": r"^[0-9]+$"},
        "locale": _ref("AvailableLocalesEnum"),
        "guild_locale": _ref("AvailableLocalesEnum"),
        "entitlements": {"type": "array"},
        "authorizing_integration_owners": {
            "type": "object",
            "propertyNames": {"enum": ["0", "1"]},
            "additionalProperties": _SNOWFLAKE,
        },
        "context": {"enum": [0, 1, 2]},
        "attachment_size_limit": {"type": "integer", "minimum": 0},
    },
    "allOf": [
        {
            "if": {"properties": {"type": {"const": 1}}},
            "else": {"required": ["data", "channel", "channel_id", "app_permissions", "locale", "context"]},
        },
        {
            "if": {"required": ["guild_id"]},
            "then": {"required": ["member", "guild_locale"], "not": {"required": ["user"]}},
            "else": {"required": ["user"], "not": {"required": ["member"]}},
        },
        {
            "if": {"properties": {"type": {"enum": [2, 4]}}},
            "then": {"properties": {"data": {"$ref": "#/$defs/command_data"}}},
        },
        {
            "if": {"properties": {"type": {"const": 3}}},
            "then": {
                "required": ["message"],
                "properties": {
                    "data": {
                        "type": "object",
                        "required": ["custom_id", "component_type"],
                        "properties": {
                            "custom_id": {"type": "string", "minLength": 1, "maxLength": 100},
                            "component_type": {"type": "integer"},
                            "values": {"type": "array"},
                        },
                    }
                },
            },
        },
        {
            "if": {"properties": {"type": {"const": 5}}},
            "then": {
                "properties": {
                    "data": {
                        "type": "object",
                        "required": ["custom_id", "components"],
                        "properties": {"components": {"type": "array"}},
                    }
                }
            },
        },
    ],
}


def _focused_count(options: Iterable[Mapping[str, Any]]) -> int:
    count = 0
    for opt in options:
        count += bool(opt.get("focused"))
        count += _focused_count(opt.get("options", ()))
    return count


def _coerce_query(value: str, schema: Mapping[str, Any]) -> Any:
    kind = schema.get("type")
    if kind == "boolean":
        lowered = value.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise ValueError(f"{value!r} is not a boolean")
    if kind == "integer":
        return int(value)
    if kind == "number":
        return float(value)
    return value


class DiscordSpec:
    """The loaded spec: operation lookup plus cached request/response validators."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = _patch_quirks(raw)
        self.registry: Registry = Registry().with_resources(
            [
                (SPEC_URI, DRAFT202012.create_resource(self.raw)),
                (INTERACTION_URI, DRAFT202012.create_resource(INTERACTION_SCHEMA)),
            ]
        )
        self._validators: dict[str, Draft202012Validator] = {}
        self._routes: list[_Route] = []
        for template, item in self.raw["paths"].items():
            segments = template.strip("/").split("/")
            regex = "/".join(f"(?P<{s[1:-1]}>[^/]+)" if s.startswith("{") else re.escape(s) for s in segments)
            route = _Route(
                template,
                re.compile(f"^/{regex}$"),
                sum(not s.startswith("{") for s in segments),
            )
            shared = tuple(item.get("parameters", ()))
            for method, op in item.items():
                if method == "parameters":
                    continue
                body = op.get("requestBody") or {}
                route.operations[method.upper()] = Operation(
                    template=template,
                    method=method.upper(),
                    operation_id=op.get("operationId", "?"),
                    parameters=shared + tuple(op.get("parameters", ())),
                    body_content_types=tuple(body.get("content", {})),
                    body_required=bool(body.get("required")),
                    response_codes=tuple(op.get("responses", {})),
                )
            self._routes.append(route)
        # Literal segments beat parameters (/users/@me before /users/{user_id}).
        self._routes.sort(key=lambda r: (-r.literals, r.template))
        # The fake looks up every request: only templates of the path's shape are tried.
        self._by_shape: dict[tuple[int, str], list[_Route]] = {}
        for route in self._routes:
            self._by_shape.setdefault(path_shape(route.template), []).append(route)

    # -- lookup -------------------------------------------------------------------------

    def match(self, method: str, path: str) -> tuple[Operation | None, dict[str, str], str | None]:
        """(operation, path params, template) for a request path relative to ``/api/v10``.

        The operation is None when the path exists but not with this method; the template
        is None when no path matches at all.
        """
        for route in self._by_shape.get(path_shape(path), ()):
            m = route.pattern.match(path)
            if m:
                return route.operations.get(method.upper()), m.groupdict(), route.template
        return None, {}, None

    def validator(self, pointer: str) -> Draft202012Validator:
        """A compiled validator for the schema at ``pointer`` (a URI into the registry)."""
        validator = self._validators.get(pointer)
        if validator is None:
            validator = Draft202012Validator({"$ref": pointer}, registry=self.registry)
            self._validators[pointer] = validator
        return validator

    def _param_validator(self, schema: Mapping[str, Any]) -> Draft202012Validator:
        key = json.dumps(schema, sort_keys=True)
        validator = self._validators.get(key)
        if validator is None:
            validator = Draft202012Validator(schema, registry=self.registry)
            self._validators[key] = validator
        return validator

    def _schema_at(self, pointer: str) -> Any:
        return self.registry.resolver().lookup(pointer).contents

    # -- requests -----------------------------------------------------------------------

    def request_problems(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        content_type: str = "",
        body: Any = None,
        raw_text: str | None = None,
        files: Iterable[UploadedFileLike] = (),
        size_limit: int | None = None,
    ) -> list[str]:
        """Everything wrong with one request, as readable lines (empty when valid)."""
        op, params, template = self.match(method, path)
        if template is None:
            return [f"{method} {path}: no such path in Discord's API"]
        if op is None:
            return [f"{method} {path}: {template} has no {method} operation"]
        label = op.label
        problems: list[str] = []
        problems += self._parameter_problems(op, params, query or {})
        files = list(files)
        media = content_type.split(";")[0].strip().lower()
        has_body = body is not None or bool(files) or bool(raw_text)
        if not op.body_content_types:
            if has_body:
                problems.append(f"{label}: sends a body but the operation takes none")
            return problems
        if not has_body:
            if op.body_required:
                problems.append(f"{label}: request body is required")
            return problems
        if media not in op.body_content_types:
            problems.append(f"{label}: content type {media or '(none)'} not in {list(op.body_content_types)}")
            return problems
        if body is None and raw_text:
            problems.append(f"{label}: body is not valid JSON")
            return problems
        if body is None and media == "multipart/form-data":
            body = {}  # files without payload_json: Discord accepts that
        schema_type = "application/json" if "application/json" in op.body_content_types else media
        pointer = _pointer("paths", op.template, method.lower(), "requestBody", "content", schema_type, "schema")
        problems += [f"{label}: body {_describe(e)}" for e in self.validator(pointer).iter_errors(body)]
        problems += self._attachment_problems(label, media, body, files, size_limit)
        return problems

    def _parameter_problems(self, op: Operation, params: Mapping[str, str], query: Mapping[str, str]) -> list[str]:
        problems: list[str] = []
        known_query: set[str] = set()
        for param in op.parameters:
            name, where = param["name"], param["in"]
            schema = param.get("schema", {})
            if "$ref" in schema:
                schema = self._schema_at(SPEC_URI + schema["$ref"])
            if where == "query":
                known_query.add(name)
                if name not in query:
                    if param.get("required"):
                        problems.append(f"{op.label}: missing query parameter {name}")
                    continue
                raw = query[name]
            elif where == "path":
                raw = params.get(name)
                if raw is None:
                    continue
            else:
                continue
            try:
                value = _coerce_query(raw, schema)
            except ValueError as exc:
                problems.append(f"{op.label}: {where} parameter {name}: {exc}")
                continue
            for error in self._param_validator(schema).iter_errors(value):
                problems.append(f"{op.label}: {where} parameter {name}={raw!r}: {error.message}")
        for name in query:
            if name not in known_query:
                problems.append(f"{op.label}: unknown query parameter {name!r}")
        return problems

    @staticmethod
    def _attachment_problems(
        label: str, media: str, body: Any, files: list[UploadedFileLike], size_limit: int | None
    ) -> list[str]:
        problems: list[str] = []
        payload = body
        if isinstance(body, dict) and "type" in body and isinstance(body.get("data"), dict):
            payload = body["data"]  # interaction callbacks wrap the message in "data"
        attachments = payload.get("attachments") if isinstance(payload, dict) else None
        declared: set[int] = set()
        for item in attachments or ():
            if not isinstance(item, dict):
                continue
            try:
                ident = int(item.get("id"))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                continue
            if ident < _MAX_UPLOAD_INDEX:
                declared.add(ident)
        uploaded: set[int] = set()
        for part in files:
            m = _FILES_PART.match(part.field)
            if not m:
                problems.append(f"{label}: multipart part {part.field!r} is not files[n]")
                continue
            index = int(m.group(1))
            uploaded.add(index)
            if attachments is not None and index not in declared:
                problems.append(f"{label}: {part.field} has no attachments[] entry with id {index}")
            if size_limit is not None and len(part.data) > size_limit:
                problems.append(
                    f"{label}: {part.field} ({part.filename}) is {len(part.data)} bytes, "
                    f"over the {size_limit} byte attachment_size_limit"
                )
        for index in sorted(declared - uploaded):
            problems.append(f"{label}: attachments[] id {index} has no files[{index}] part")
        if files and media != "multipart/form-data":
            problems.append(f"{label}: files sent without multipart/form-data")
        return problems

    # -- responses ----------------------------------------------------------------------

    def response_problems(self, method: str, path: str, status: int, body: Any) -> list[str]:
        """Check a response the fake produced against the operation's response schema."""
        op, _, _ = self.match(method, path)
        if op is None:
            return []
        code = str(status)
        candidates = [code, f"{code[0]}XX", "default"]
        chosen = next((c for c in candidates if c in op.response_codes), None)
        if chosen is None:
            return [f"{op.label}: status {status} not among {list(op.response_codes)}"]
        response = self.raw["paths"][op.template][method.lower()]["responses"][chosen]
        if "$ref" in response:
            response = self._schema_at(SPEC_URI + response["$ref"])
        content = response.get("content") or {}
        if "application/json" not in content:
            if body not in (None, b"", ""):
                return [f"{op.label}: status {status} must have no body"]
            return []
        if "$ref" in self.raw["paths"][op.template][method.lower()]["responses"][chosen]:
            ref = self.raw["paths"][op.template][method.lower()]["responses"][chosen]["$ref"]
            pointer = SPEC_URI + ref + "/content/application~1json/schema"
        else:
            pointer = _pointer(
                "paths",
                op.template,
                method.lower(),
                "responses",
                chosen,
                "content",
                "application/json",
                "schema",
            )
        validator = self.validator(pointer)
        return [f"{op.label}: response {status} {_describe(e)}" for e in validator.iter_errors(body)]

    # -- interactions -------------------------------------------------------------------

    def interaction_problems(self, payload: Mapping[str, Any]) -> list[str]:
        """Check an Interaction payload against :data:`INTERACTION_SCHEMA`."""
        validator = self.validator(INTERACTION_URI)
        label = f"interaction type {payload.get('type')}"
        problems = [f"{label}: {_describe(e)}" for e in validator.iter_errors(dict(payload))]
        if payload.get("type") == 4:
            focused = _focused_count(payload.get("data", {}).get("options", ()))
            if focused != 1:
                problems.append(f"{label}: autocomplete needs exactly one focused option, got {focused}")
        return problems


@functools.lru_cache(maxsize=1)
def load_spec(path: str | None = None) -> DiscordSpec:
    """The process-wide spec (parsed and indexed once)."""
    with open(path or SPEC_PATH, encoding="utf-8") as fh:
        return DiscordSpec(json.load(fh))


def validate_requests(records: Iterable[RequestLike], *, responses: bool = False) -> list[str]:
    """Problems of recorded requests against the spec (and, optionally, of their responses)."""
    spec = load_spec()
    problems: list[str] = []
    for rec in records:
        problems += spec.request_problems(
            rec.method,
            rec.path,
            query=rec.query,
            content_type=rec.content_type,
            body=rec.json,
            raw_text=rec.raw_text,
            files=rec.files,
            size_limit=rec.size_limit,
        )
        if responses and rec.status is not None and rec.status < 300:
            problems += spec.response_problems(rec.method, rec.path, rec.status, rec.response)
    return problems


def validate_interaction(payload: Mapping[str, Any]) -> list[str]:
    """Problems of an Interaction payload (not covered by the spec) per Discord's docs."""
    return load_spec().interaction_problems(payload)
