"""Load pieces of the Res2CLIP authors' code from the local mirror, for numerical parity tests.

The mirror (a bare git directory) is read at test time and never copied into the repository; tests
using it skip where it is absent. Modules with imports unavailable here (their CLIP library, adeval)
are not imported whole: only the named top-level functions/constants are compiled from their source.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest

MIRROR = Path("/work/.mirror/hito2448+Res2CLIP/repo")
RESAD_MIRROR = Path("/work/.mirror/xcyao00+ResAD/repo")


def authors_source(path: str, mirror: Path = MIRROR) -> str:
    if not mirror.exists():
        pytest.skip(f"the authors' mirror {mirror} is not on this machine")
    result = subprocess.run(
        ["git", "-C", str(mirror), "show", f"HEAD:{path}"], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot read {path} from the authors' mirror: {result.stderr.strip()}")
    return result.stdout


def authors_module(path: str, tmp_dir: Path) -> types.ModuleType:
    """Import a self-contained file of theirs (only torch/stdlib imports) under a private name."""
    name = "res2clip_authors_" + path.replace("/", "_").removesuffix(".py")
    if name in sys.modules:
        return sys.modules[name]
    file = tmp_dir / f"{name}.py"
    file.write_text(authors_source(path))
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def authors_definitions(path: str, names: set[str], namespace: dict, mirror: Path = MIRROR) -> dict:
    """Compile only the top-level definitions `names` of their file into `namespace`."""
    tree = ast.parse(authors_source(path, mirror))
    keep = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name in names:
            keep.append(node)
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) in names for t in node.targets):
            keep.append(node)
    exec(compile(ast.Module(body=keep, type_ignores=[]), path, "exec"), namespace)
    return namespace
