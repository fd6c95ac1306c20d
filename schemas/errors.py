"""Typed decoding errors. The pipeline turns each into a DeadLetter with ``error_type`` = the
class name and ``reason`` = the message (which names the offending field and value)."""
from __future__ import annotations


class SchemaError(ValueError):
    """Root of all contract errors."""

    def __init__(self, message: str, *, record: str | None = None, field: str | None = None,
                 value: object = None):
        super().__init__(message)
        self.record = record
        self.field = field
        self.value = value


class UnknownFingerprint(SchemaError):
    """The payload's schema fingerprint (or Confluent schema id) is not a known schema."""


class CorruptPayload(SchemaError):
    """Bad framing (wrong magic bytes) or a body that does not decode with its schema."""


class MissingField(SchemaError):
    """A required field is absent (encoding side) or null where a value is required."""


class OutOfDomain(SchemaError):
    """A field decodes but its value is outside its documented domain (NaN, price <= 0, ...)."""


class WrongRecordType(SchemaError):
    """A valid record of another type arrived where a specific type was expected."""
