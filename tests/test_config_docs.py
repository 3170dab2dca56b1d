"""docs/configuration.md is generated from diffalign/config.py (scripts/gen_config_docs.py) and must be current."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

from diffalign.config import _leaf_keys

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gen_config_docs.py"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_config_docs", module)  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(sys.modules["gen_config_docs"])
    return sys.modules["gen_config_docs"]


def test_committed_reference_is_current() -> None:
    committed = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == _generator().render(), (
        "docs/configuration.md is out of date with diffalign/config.py; run `python scripts/gen_config_docs.py`"
    )


def test_every_config_key_has_a_row() -> None:
    text = _generator().render()
    rows = {line.split("|")[1].strip().strip("`") for line in text.splitlines() if line.startswith("| `")}
    assert rows == set(_leaf_keys())


def test_comments_defaults_and_missing_md_references(tmp_path: Path) -> None:
    (tmp_path / "present.md").write_text("x\n")
    source = textwrap.dedent(
        '''
        """Module text with ``code``."""
        from __future__ import annotations
        from dataclasses import dataclass, field

        @dataclass
        class Part:
            """A part (notes/absent.md §2): what it is."""

            # above the field,
            # two lines
            size: int = 3  # and on its line
            names: list[str] | None = field(default_factory=lambda: ["a", "b"])
            # -- a group (gone.md section 4) -----
            rate: float = 1e-05  # see present.md (hidden.md §1.2)

        @dataclass
        class Config:
            part: Part = field(default_factory=Part)
        '''
    )
    path = tmp_path / "fake_config.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fake_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fake_config"] = module
    try:
        spec.loader.exec_module(module)
        gen = _generator()
        docs = gen.field_docs(module.Part)
        assert [(d.name, d.type, d.default, d.group) for d in docs] == [
            ("size", "int", "3", ""),
            ("names", "list[str] | None", '["a", "b"]', ""),
            ("rate", "float", "1e-5", "a group (gone.md section 4)"),
        ]
        assert docs[0].text == "above the field, two lines and on its line"
        assert gen.clean_text(docs[2].text, repo=tmp_path) == "see present.md"
        section = gen.section_markdown("part", module.Part)
    finally:
        del sys.modules["fake_config"]
    assert "A part: what it is." in section
    assert "| **a group** | | | |" in section
    assert "| `part.names` | `list[str] \\| None` | `[\"a\", \"b\"]` |  |" in section
