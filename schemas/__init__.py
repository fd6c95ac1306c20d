"""The riskpipe event contract.

The ``*.avsc`` files in this directory are the source of truth; anyone can decode our topics
with nothing but those files (see ``ops/examples/liquidation_bot.py``). Released versions are
kept in ``schemas/history/v<N>/`` and a test fails if a change breaks backward compatibility.
"""
from .codec import (RECORDS, Codec, ConfluentCodec, crc64_avro, load_schema, load_schemas,
                    validate)
from .errors import (CorruptPayload, MissingField, OutOfDomain, SchemaError, UnknownFingerprint,
                     WrongRecordType)

__all__ = ["RECORDS", "Codec", "ConfluentCodec", "crc64_avro", "load_schema", "load_schemas",
           "validate", "CorruptPayload", "MissingField", "OutOfDomain", "SchemaError",
           "UnknownFingerprint", "WrongRecordType"]
