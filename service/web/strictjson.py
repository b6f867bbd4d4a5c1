"""Strict request-body decoding for Litestar, and the door check of every string.

Litestar converts bodies with msgspec in lax mode, where `"2"` passes for an int. This
data-only DTO decodes the raw bytes strictly into the handler's `data` type instead, and
leaves the OpenAPI request body exactly as Litestar would document it.

Every string a request brings (body, path, query) is checked for what PostgreSQL's text
cannot hold: a NUL character or an unpaired surrogate. Whatever the API acknowledges must
be storable.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import msgspec
from litestar import Request
from litestar.dto import AbstractDTO
from litestar.typing import FieldDefinition

from service.core import errors
from service.core.schemas import PATTERN_WORDS

# PostgreSQL's text holds neither; msgspec turns `\u0000` into a NUL (and a lone
# surrogate escape, which it refuses today, would become a lone surrogate).
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
_WHY = "text with a NUL character or an unpaired surrogate cannot be stored"


def _unstorable(value: Any, where: str) -> str | None:
    """Where in a decoded body the first unstorable string is, or None."""
    if isinstance(value, str):
        return where if _UNSTORABLE.search(value) else None
    if isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            found = _unstorable(getattr(value, name), f"{where}.{name}")
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _unstorable(item, f"{where}[{i}]")
            if found:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _unstorable(key, f"{where}.{key}") or _unstorable(item, f"{where}.{key}")
            if found:
                return found
    return None


def storable(text: str) -> bool:
    """Whether PostgreSQL's text can hold this string."""
    return _UNSTORABLE.search(text) is None


def check_body(raw: bytes, decoded: Any) -> None:
    # Such a character can only arrive as a `\u` escape (raw ones are malformed JSON or
    # UTF-8): a body without one is not walked at all.
    if b"\\u" in raw:
        where = _unstorable(decoded, "$")
        if where:
            raise errors.ValidationError(
                f"{_WHY} (at `{where}`)", errors=[{"key": where, "message": _WHY, "source": "body"}]
            )


async def check_params(request: Request[Any, Any, Any]) -> None:
    """Litestar's before-request hook: the path and query parameters of every route."""
    # The ASGI path is already percent-decoded: it holds every path parameter.
    if _UNSTORABLE.search(request.scope["path"]):
        raise errors.ValidationError(f"{_WHY} (in the path)")
    # The query is decoded as UTF-8 with replacement (no surrogates); a NUL comes only as
    # `%00`, so most queries are not parsed here at all.
    if b"%00" in request.scope.get("query_string", b""):
        for name, value in request.query_params.multi_items():
            if _UNSTORABLE.search(value):
                raise errors.ValidationError(f"{_WHY} (query parameter `{name}`)")


class StrictJSON(AbstractDTO[Any]):
    _decoders: ClassVar[dict[str, msgspec.json.Decoder[Any]]] = {}
    _by_handler: ClassVar[dict[Any, msgspec.json.Decoder[Any]]] = {}

    @classmethod
    def create_for_field_definition(
        cls, field_definition: FieldDefinition, handler_id: str, backend_cls: Any = None
    ) -> None:
        # Once per handler at start-up: the decoder is built once and reused.
        cls._decoders[handler_id] = msgspec.json.Decoder(field_definition.annotation, strict=True)

    @classmethod
    def create_openapi_schema(
        cls, field_definition: FieldDefinition, handler_id: str, schema_creator: Any
    ) -> Any:
        return schema_creator.for_field_definition(field_definition)

    @classmethod
    def is_supported_model_type_field(cls, field_definition: FieldDefinition) -> bool:
        return False  # never a return DTO

    @classmethod
    def generate_field_definitions(cls, model_type: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def detect_nested_field(cls, field_definition: FieldDefinition) -> bool:
        return False

    def decode_bytes(self, value: bytes) -> Any:
        handler = self.asgi_connection.route_handler
        decoder = self._by_handler.get(handler)
        if decoder is None:
            # Litestar rebuilds handler_id from the handler's layers on every access: a
            # string per request on the hold path. Looked up once per handler instead.
            decoder = self._by_handler[handler] = self._decoders[handler.handler_id]
        try:
            decoded = decoder.decode(value)
        except msgspec.ValidationError as e:  # a DecodeError too: first
            raise errors.ValidationError(plain(str(e))) from e
        except msgspec.DecodeError as e:
            ends = ": it ends too early" if "truncated" in str(e) else ""
            raise errors.ValidationError(f"the body is not valid JSON{ends}") from e
        except UnicodeDecodeError as e:  # msgspec's own, for a string's bytes
            raise errors.ValidationError("the body is not valid UTF-8") from e
        check_body(value, decoded)
        return decoded

    def decode_builtins(self, value: dict[str, Any]) -> Any:
        raise errors.ValidationError("the body must be JSON (application/json)")


# msgspec's (and Litestar's) validation messages, reworded for a client: which field,
# and what it must be, in words; never a regex or a type name of the code.
_AT = re.compile(r"(?P<what>.*?)(?: - at `\$\.?(?P<where>[^`]*)`)?", re.DOTALL)
_FIELD_FIRST = re.compile(r"`(\w+)` (.*)", re.DOTALL)
_TYPES = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "object": "a JSON object",
    "array": "a list",
    "null": "null",
    "datetime": "an RFC 3339 time",
}
_UNITS = {"str": "character", "array": "item", "object": "field"}
_REWORDS: list[tuple[re.Pattern[str], Any]] = [
    (
        re.compile(r"Expected `str` matching regex '(.*)'"),
        lambda m: "must be " + PATTERN_WORDS.get(m[1].replace("\\\\", "\\"), "in another format"),
    ),
    (
        re.compile(r"Expected `(\w+)` of length ([<>]=) (\d+)"),
        lambda m: f"must be {_type(m[1])} of {_bound(m[2])} {_count(int(m[3]), _UNITS.get(m[1]))}",
    ),
    (
        re.compile(r"Expected `(\w+)` ([<>]=?) (-?[\d.]+)"),
        lambda m: f"must be {_type(m[1])}, {_bound(m[2])} {m[3]}",
    ),
    (
        re.compile(r"Expected `(\w+)`, got `(\w+)`"),
        lambda m: f"must be {_type(m[1])}, not {_type(m[2])}",
    ),
    (re.compile(r"Object contains unknown field `(.*)`"), lambda m: f"unknown field `{m[1]}`"),
    (re.compile(r"Object missing required field `(.*)`"), lambda m: f"`{m[1]}` is required"),
    (re.compile(r"Invalid enum value (.*)"), lambda m: f"{m[1]} is not one of the allowed values"),
    (
        re.compile(r"Invalid RFC3339 encoded datetime"),
        lambda m: "must be an RFC 3339 time such as 2026-12-01T19:00:00Z",
    ),
]


def plain(message: str, subject: str = "the body") -> str:
    """A validation message in plain words, led by the field it is about (by `subject`
    when it is about the whole value)."""
    parts = _AT.fullmatch(message)
    what, where = (parts["what"], parts["where"]) if parts else (message, None)
    # A struct's own check names its field first (schemas): msgspec points at the struct.
    if where and (field := _FIELD_FIRST.fullmatch(what)):
        where, what = f"{where}.{field[1]}", field[2]
    for pattern, reword in _REWORDS:
        if found := pattern.fullmatch(what):
            what = reword(found)
            break
    if where:
        return f"`{where}`: {what}"
    return f"{subject} {what}".strip() if what.startswith("must") else what


def _type(name: str) -> str:
    return _TYPES.get(name, f"`{name}`")


def _bound(op: str) -> str:
    return {">=": "at least", "<=": "at most", ">": "more than", "<": "less than"}[op]


def _count(n: int, unit: str | None) -> str:
    if unit is None:
        return str(n)
    return f"{n} {unit}" + ("" if n == 1 else "s")
