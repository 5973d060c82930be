"""The floors of `unimm` (docs/DESIGN.md, "Layers"): no module imports a floor above its own, and no two modules
import each other, directly or around a circle. Imports inside functions count (a lazy import is still a
dependency); imports under `if TYPE_CHECKING:` do not (they never run). `scripts/import_layers.py` prints the same
picture."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def layers():
    spec = importlib.util.spec_from_file_location("unimm_import_layers", ROOT / "scripts" / "import_layers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_no_module_imports_a_floor_above_its_own(layers):
    picture = layers.import_picture(ROOT)
    assert len(picture.edges) > 100  # the walk found the package
    assert not picture.upward, "imports that run up a floor (move the definition down, see docs/DESIGN.md):\n" + \
        "\n".join(str(edge) for edge in picture.upward)


def test_no_import_cycle_between_modules(layers):
    picture = layers.import_picture(ROOT)
    described = [" ; ".join(str(edge) for edge in layers.cycle_path(group, picture.edges)) for group in picture.cycles]
    assert not picture.cycles, "import cycles:\n" + "\n".join(described)


def test_every_floor_is_a_package_and_every_package_has_a_floor(layers):
    floors = {name for height in layers.FLOORS for name in height}
    packages = {path.parent.name for path in (ROOT / "unimm").glob("*/__init__.py")}
    modules = {path.stem for path in (ROOT / "unimm").glob("*.py") if path.stem != "__init__"}
    assert (packages | modules) - floors == set(), "a package of unimm without a floor in scripts/import_layers.py"
    assert floors <= packages | modules


def test_the_design_document_states_the_same_floors(layers):
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    order = [name for height in layers.FLOORS for name in height]
    positions = [design.index(f"`unimm/{name}") for name in order]
    # the "Layers" section lists the floors bottom to top, in the order the checker enforces
    layers_section = design.index("## 1. Layers")
    assert all(p > layers_section for p in positions) and positions == sorted(positions), order


def _write(root: Path, module: str, text: str) -> None:
    path = root.joinpath(*module.split(".")).with_suffix(".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in path.relative_to(root).parents:
        if str(parent) != ".":
            (root / parent / "__init__.py").touch()
    path.write_text(text)


def test_the_checker_names_an_upward_import_and_a_cycle(layers, tmp_path):
    """The checker itself on a small tree: an upward import inside a function, a two-module cycle, a type-only
    import (ignored), a relative import and an import of a name from a package (resolved to its submodule)."""
    _write(tmp_path, "unimm.utils.helpers", "def f():\n    from unimm.cli.program import run\n")
    _write(tmp_path, "unimm.cli.program", "from unimm.utils import helpers\nrun = 1\n")
    _write(tmp_path, "unimm.llm.a", "from .b import x\ny = 1\n")
    _write(tmp_path, "unimm.llm.b", "import unimm.llm.a\nx = 1\n")
    _write(tmp_path, "unimm.tokenizer.types", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                              "    from unimm.data.images import Image\n")
    _write(tmp_path, "unimm.data.images", "from unimm.tokenizer import types\n")
    picture = layers.import_picture(tmp_path)
    assert [(e.source, e.target) for e in picture.upward] == [("unimm.utils.helpers", "unimm.cli.program")]
    assert "unimm/utils/helpers.py:2" in str(picture.upward[0])
    assert picture.cycles == [["unimm.cli.program", "unimm.utils.helpers"], ["unimm.llm.a", "unimm.llm.b"]]
    walk = layers.cycle_path(picture.cycles[1], picture.edges)
    assert [(e.source, e.target) for e in walk] == [("unimm.llm.a", "unimm.llm.b"), ("unimm.llm.b", "unimm.llm.a")]
    report = picture.report()
    assert "1 upward imports; 2 import cycles" in report and "unimm.llm.b -> unimm.llm.a" in report
    assert ("unimm.data.images", "unimm.tokenizer.types") in {(e.source, e.target) for e in picture.edges}
