"""Strict request-body decoding for Litestar.

Litestar converts bodies with msgspec in lax mode, where `"2"` passes for an int. This
data-only DTO decodes the raw bytes strictly into the handler's `data` type instead, and
leaves the OpenAPI request body exactly as Litestar would document it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec
from litestar.dto import AbstractDTO
from litestar.typing import FieldDefinition

from service import errors


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
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise errors.ValidationError(str(e)) from e

    def decode_builtins(self, value: dict[str, Any]) -> Any:
        raise errors.ValidationError("the body must be JSON (application/json)")
