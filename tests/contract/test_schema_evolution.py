"""The .avsc files stay backward compatible with every released version in schemas/history."""
import io
import json
from pathlib import Path

import fastavro
import pytest

from schemas.codec import HERE, RECORDS, load_schemas

VERSIONS = sorted(p.name for p in (HERE / "history").iterdir() if p.is_dir())


def _default_record(parsed):
    """A record exercising every field with a value of its type (from the old schema)."""
    named = {}

    def val(t):
        if isinstance(t, str) and t in named:
            return val(named[t])
        if isinstance(t, dict) and t.get("name"):
            named.setdefault(t["name"], t)
        if isinstance(t, list):
            return val(t[-1])
        if isinstance(t, dict):
            lt = t.get("logicalType")
            if lt == "timestamp-millis":
                return 1_767_225_600_000
            if t["type"] == "record":
                return {f["name"]: val(f["type"]) for f in t["fields"]}
            if t["type"] == "enum":
                return t["symbols"][0]
            if t["type"] == "array":
                return [val(t["items"])]
            return val(t["type"])
        return {"string": "x", "double": 1.5, "long": 7, "int": 3, "boolean": True,
                "bytes": b"\x00\x01", "null": None}[t]
    return val(parsed)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", RECORDS)
def test_current_reader_decodes_old_writer(version, name):
    old = load_schemas(version)[name]
    new = load_schemas()[name]
    rec = _default_record(old)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, old, rec)
    buf.seek(0)
    out = fastavro.schemaless_reader(buf, old, new)  # raises SchemaResolutionError if broken
    assert set(out) >= set(rec)


@pytest.mark.parametrize("version", VERSIONS)
def test_new_fields_have_defaults(version):
    for name in RECORDS:
        old = {f["name"] for f in json.loads((HERE / "history" / version / f"{name}.avsc")
                                             .read_text())["fields"]}
        cur = json.loads((HERE / f"{name}.avsc").read_text())["fields"]
        added = [f["name"] for f in cur if f["name"] not in old and "default" not in f]
        assert not added, f"{name}: fields {added} added without a default break old data"


def test_every_field_is_documented():
    for p in Path(HERE).glob("*.avsc"):
        s = json.loads(p.read_text())
        assert s.get("doc") and s.get("namespace") == "io.riskpipe.v1", p.name

        def walk(rec):
            for f in rec["fields"]:
                assert f.get("doc"), f"{p.name}: field {f['name']} has no doc"
                t = f["type"]
                if isinstance(t, dict) and t.get("type") == "array" \
                        and isinstance(t["items"], dict) and t["items"].get("type") == "record":
                    walk(t["items"])
        walk(s)


def test_breaking_change_is_detected(tmp_path):
    """The check itself works: changing a field's type fails schema resolution."""
    old = load_schemas(VERSIONS[-1])["Trade"]
    broken = json.loads((HERE / "Trade.avsc").read_text())
    for f in broken["fields"]:
        if f["name"] == "quantity":
            f["type"] = "string"
    new = fastavro.parse_schema(broken)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, old, _default_record(old))
    buf.seek(0)
    with pytest.raises(Exception):
        fastavro.schemaless_reader(buf, old, new)
