"""Readers compiled from a parsed schema, for the flat records the worker decodes per event.

Why: the worker decodes every trade and collateral change on its event loop's one thread.
``fastavro.schemaless_reader`` costs about 3 us per such record (a file-like object and a walk
of the schema per call), a fifth of what the account path spends per event. A reader written out
for one schema (straight-line code, consecutive doubles read with one ``struct`` call) reads the
same bytes in about half that.

The ``.avsc`` files stay the source of truth: the reader is generated from the parsed schema,
field by field, and only for schemas it covers in full (records of primitives, enums and
``null``-unions of a primitive). Anything else gets ``None`` and stays with fastavro. A reader
only *accepts* what it is sure of: on any irregularity (a truncated body, a negative length, an
enum or union index out of range, an over-long varint) it raises, and the caller re-reads the
record with fastavro, whose error is the one reported. ``tests/contract/test_fastread.py``
checks both against each other on generated records and on damaged ones.
"""
from __future__ import annotations

import struct

_PRIMITIVE_STRUCT = {"double": "d", "float": "f"}
_VARINT = ("long", "int")


def _long(d: bytes, i: int) -> tuple[int, int]:
    """Zig-zag varint at ``i``: (value, next index). At most 10 bytes (64 bits)."""
    b = d[i]
    i += 1
    n = b & 0x7F
    shift = 7
    while b & 0x80:
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")
        b = d[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
    if n >> 64:
        raise ValueError("varint beyond 64 bits")
    return (n >> 1) ^ -(n & 1), i


def _kind(t) -> str | None:
    """What the generator makes of a field type: a primitive name, ``enum``, or None (not
    covered). Logical types (e.g. ``timestamp-millis`` read as millis) are not covered: the
    caller passes schemas where they are already the plain type."""
    if isinstance(t, str):
        return t if t in ("string", "double", "float", "long", "int", "boolean", "null") \
            else None
    if isinstance(t, dict):
        if t.get("logicalType"):
            return None
        if t.get("type") == "enum":
            return "enum"
        return _kind(t["type"]) if isinstance(t.get("type"), str) else None
    return None


def _emit_value(kind: str, var: str, lines: list[str], ind: str, consts: dict, t) -> None:
    """Code reading one value of ``kind`` at ``i`` into ``var`` (advancing ``i``)."""
    if kind == "string":
        lines += [f"{ind}n = d[i]",
                  f"{ind}if n < 0x80:",
                  f"{ind}    i += 1",
                  f"{ind}    n = (n >> 1) ^ -(n & 1)",
                  f"{ind}else:",
                  f"{ind}    n, i = _long(d, i)",
                  f"{ind}if n < 0:",
                  f"{ind}    raise ValueError('negative length')",
                  f"{ind}{var} = d[i:i + n].decode()",
                  f"{ind}i += n"]
    elif kind in _VARINT:
        lines.append(f"{ind}{var}, i = _long(d, i)")
    elif kind == "boolean":
        lines += [f"{ind}b = d[i]",
                  f"{ind}if b > 1:",
                  f"{ind}    raise ValueError('bad boolean')",
                  f"{ind}{var} = b == 1",
                  f"{ind}i += 1"]
    elif kind == "enum":
        sym = f"_sym{len(consts)}"
        consts[sym] = tuple(t["symbols"])
        lines += [f"{ind}n, i = _long(d, i)",
                  f"{ind}if not 0 <= n < {len(t['symbols'])}:",
                  f"{ind}    raise ValueError('enum index out of range')",
                  f"{ind}{var} = {sym}[n]"]
    elif kind in _PRIMITIVE_STRUCT:
        fmt = _PRIMITIVE_STRUCT[kind]
        name = f"_{fmt}1"
        consts[name] = struct.Struct("<" + fmt).unpack_from
        lines += [f"{ind}{var}, = {name}(d, i)",
                  f"{ind}i += {struct.calcsize(fmt)}"]
    elif kind == "null":
        lines.append(f"{ind}{var} = None")
    else:  # pragma: no cover - _kind filters every other kind out
        raise AssertionError(kind)


def compile_reader(schema: dict):
    """A function ``read(data, start) -> (record, end)`` for the parsed record ``schema``, or
    None when the schema has a field type it does not cover.

    ``end`` is the index after the record; the caller decides what trailing bytes mean."""
    if not isinstance(schema, dict) or schema.get("type") != "record":
        return None
    lines = ["def read(d, i):"]
    consts: dict = {"_long": _long}
    names: list[str] = []
    fields = schema["fields"]
    k = 0
    while k < len(fields):
        f = fields[k]
        var = f"f{k}"
        t = f["type"]
        if isinstance(t, list):  # a union: null and one covered type, in either order
            if len(t) != 2 or "null" not in t:
                return None
            other = t[1 - t.index("null")]
            kind = _kind(other)
            if kind is None or kind == "null":
                return None
            lines += ["    n = d[i]",
                      "    i += 1",
                      f"    if n == {2 * t.index('null')}:",
                      f"        {var} = None",
                      f"    elif n == {2 * (1 - t.index('null'))}:"]
            _emit_value(kind, var, lines, "        ", consts, other)
            lines += ["    else:",
                      "        raise ValueError('union index out of range')"]
            names.append(f["name"])
            k += 1
            continue
        kind = _kind(t)
        if kind is None:
            return None
        if kind in _PRIMITIVE_STRUCT:  # a run of fixed-size fields: one struct call
            run = k
            while run < len(fields) and _kind(fields[run]["type"]) in _PRIMITIVE_STRUCT:
                run += 1
            fmt = "".join(_PRIMITIVE_STRUCT[_kind(fields[j]["type"])] for j in range(k, run))
            name = f"_s{len(consts)}"
            consts[name] = struct.Struct("<" + fmt).unpack_from
            vs = ", ".join(f"f{j}" for j in range(k, run))
            lines += [f"    {vs}, = {name}(d, i)",
                      f"    i += {struct.calcsize('<' + fmt)}"]
            names += [fields[j]["name"] for j in range(k, run)]
            k = run
            continue
        _emit_value(kind, var, lines, "    ", consts, t)
        names.append(f["name"])
        k += 1
    items = ", ".join(f"{n!r}: f{j}" for j, n in enumerate(names))
    lines.append(f"    return {{{items}}}, i")
    namespace = dict(consts)
    exec(compile("\n".join(lines), f"<reader {schema.get('name')}>", "exec"), namespace)
    return namespace["read"]
