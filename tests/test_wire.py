"""The RTMP wire vocabulary lives in one module, engine/wire.py.

The chunk codecs keep their own copies of the message types they act on (Set Chunk Size and
Abort change how the following bytes parse, inside the reader); these tests fail the day a copy
disagrees with wire.py, and the day another module defines its own ``MSG_*``/``CSID_*``/``UC_*``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import codec_implementations

from watchbuy.engine import wire

ROOT = Path(__file__).resolve().parents[1]
VOCABULARY_PREFIXES = ("MSG_", "CSID_", "UC_")


CHUNK_CODECS = codec_implementations("chunk")


@pytest.mark.parametrize("codec", list(CHUNK_CODECS.values()), ids=list(CHUNK_CODECS))
def test_chunk_codec_constants_match_wire(codec) -> None:
    shared = [name for name in dir(codec) if name.startswith(VOCABULARY_PREFIXES)]
    assert shared, f"{codec.__name__} exposes no wire constants to compare"
    for name in shared:
        assert hasattr(wire, name), f"{codec.__name__}.{name} is not in engine/wire.py"
        assert getattr(codec, name) == getattr(wire, name), name


def module_constants(path: Path) -> set[str]:
    """Names bound at module level by plain assignments in ``path``."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_no_other_module_defines_wire_constants() -> None:
    # The chunk codecs import theirs from wire.py too; the compiled one keeps C-level copies
    # (cdef enum) for speed, which its behaviour tests hold to the same values.
    allowed = {"wire.py"}
    sources = [p for p in (ROOT / "engine").glob("*.py") if p.name not in allowed]
    sources += [ROOT / "bench" / "recording.py"]
    offenders = {
        str(path.relative_to(ROOT)): sorted(n for n in module_constants(path)
                                           if n.startswith(VOCABULARY_PREFIXES))
        for path in sources
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_wire_values_are_distinct_within_each_family() -> None:
    for prefix in VOCABULARY_PREFIXES:
        values = {name: getattr(wire, name) for name in dir(wire) if name.startswith(prefix)}
        assert len(set(values.values())) == len(values), values
