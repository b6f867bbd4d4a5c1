"""Strict request-body decoding for Litestar.

Litestar converts bodies with msgspec in lax mode, where `"2"` passes for an int. This
data-only DTO decodes the raw bytes strictly into the handler's `data` type instead, and
leaves the OpenAPI request body exactly as Litestar would document it.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import msgspec
from litestar.dto import AbstractDTO
from litestar.typing import FieldDefinition

from service import errors
from service.schemas import PATTERN_WORDS


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
            return decoder.decode(value)
        except msgspec.ValidationError as e:  # a DecodeError too: first
            raise errors.ValidationError(plain(str(e))) from e
        except msgspec.DecodeError as e:
            ends = ": it ends too early" if "truncated" in str(e) else ""
            raise errors.ValidationError(f"the body is not valid JSON{ends}") from e

    def decode_builtins(self, value: dict[str, Any]) -> Any:
        raise errors.ValidationError("the body must be JSON (application/json)")


# msgspec's (and Litestar's) validation messages, reworded for a client: which field,
# and what it must be, in words; never a regex or a type name of the code.
_AT = re.compile(r"(?P<what>.*?)(?: - at `\$\.?(?P<where>[^`]*)`)?", re.DOTALL)
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
