"""The seed page is the contract: every config field and subtask of LSST's ImageDifferenceTask must exist in
``ImageDifferenceConfig`` with the same name, type and default (54 names: 42 fields + 12 subtasks)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lsst.pex.config as pexConfig
import pytest

SEED = Path(__file__).resolve().parents[1] / ".." / "shared" / "seed" / "ImageDifferenceTask.txt"


def _seed_text() -> str:
    for path in (SEED,):
        if path.exists():
            return path.read_text()
    pytest.skip("seed page not found")


def parse_seed(text: str) -> tuple[dict, dict]:
    """Return ``(subtasks, fields)`` parsed from the seed page.

    subtasks: name -> (field type, default target dotted name or default registry key)
    fields: name -> (field type text, default value or None, data type or None)
    """
    lines = [ln.strip() for ln in text.splitlines()]
    start_sub = lines.index("Retargetable subtasks")
    start_fields = lines.index("Configuration fields")
    end = lines.index("Python API reference")

    def blocks(lo: int, hi: int):
        i = lo + 1
        while i < hi:
            while i < hi and not lines[i]:
                i += 1
            if i >= hi:
                break
            name = lines[i]
            j = i + 1
            info: dict[str, str] = {}
            while j < hi:
                if lines[j] in ("Default", "Data type", "Field type", "Choices"):
                    key = lines[j]
                    j += 1
                    while j < hi and not lines[j]:
                        j += 1
                    info[key] = lines[j]
                    j += 1
                    if key == "Choices":  # skip the choice list up to the doc
                        while j < hi and (lines[j].startswith("'") or lines[j].startswith("lsst.") or not lines[j]):
                            j += 1
                    continue
                if not lines[j]:
                    j += 1
                    continue
                # the doc string ends the block
                info["doc"] = lines[j]
                j += 1
                break
            yield name, info
            i = j

    subtasks = {n: (i["Field type"], i.get("Default")) for n, i in blocks(start_sub, start_fields)}
    fields = {n: (i["Field type"], i.get("Default"), i.get("Data type"), i.get("doc")) for n, i in blocks(start_fields, end)}
    return subtasks, fields


def test_seed_parses_to_54_names():
    subtasks, fields = parse_seed(_seed_text())
    assert len(subtasks) == 12
    assert len(fields) == 42


def test_every_seed_field_matches_config():
    from diffim.tasks.image_difference import ImageDifferenceConfig

    subtasks, fields = parse_seed(_seed_text())
    config = ImageDifferenceConfig()
    checked = 0
    for name, (ftype, default, dtype, doc) in fields.items():
        assert name in ImageDifferenceConfig._fields, f"missing config field {name}"
        field = ImageDifferenceConfig._fields[name]
        if ftype.endswith(" Field"):
            pytype = {"str": str, "int": int, "bool": bool, "float": float}[ftype.split()[0]]
            assert isinstance(field, pexConfig.Field) and field.dtype is pytype, name
            assert getattr(config, name) == ast.literal_eval(default), name
            assert type(getattr(config, name)) is pytype, name
            # the doc string is the seed's, word for word (the page may wrap it differently)
            assert re.sub(r"\s+", "", field.doc) == re.sub(r"\s+", "", doc), name
        else:
            assert ftype == "ConfigField", name
            assert isinstance(field, pexConfig.ConfigField), name
            assert dtype.rsplit(".", 1)[-1] in field.dtype.__name__, name
        checked += 1
    for name, (ftype, default) in subtasks.items():
        assert name in ImageDifferenceConfig._fields, f"missing subtask {name}"
        field = ImageDifferenceConfig._fields[name]
        if ftype == "ConfigurableField":
            assert isinstance(field, pexConfig.ConfigurableField), name
            assert field.target.__name__ == default.rsplit(".", 1)[-1], name
        else:
            assert "RegistryField" in ftype
            assert isinstance(field, pexConfig.RegistryField), name
            assert getattr(config, name).name == ast.literal_eval(default)
            assert set(field.registry) >= {"al", "zogy"}
        checked += 1
    assert checked == 54
