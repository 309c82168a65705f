"""Packaging: the dependency floors in pyproject.toml are versions the tests run with, every third-party
module the library imports is declared, the licence metadata is PEP 639's, the package ships its
``py.typed`` marker and the shipped model, and the shipped model loads from a zipped install.

Fast: reads metadata and sources, imports jax/optax without compiling; the zip check is one subprocess
that loads the shipped weights (no compiled program)."""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tomllib
import zipfile
from importlib import resources
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RUNTIME = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
EXTRAS = {k: [Requirement(r) for r in v] for k, v in PYPROJECT["project"]["optional-dependencies"].items()}
#: what the dev extra installs: its own requirements and those of the extras it names (ssdkit[serve])
DEV = [r for r in EXTRAS["dev"] if r.name != "ssdkit"] + [
    x for r in EXTRAS["dev"] if r.name == "ssdkit" for extra in sorted(r.extras) for x in EXTRAS[extra]]

#: third-party modules the library imports only when they are installed (an ImportError is handled there)
OPTIONAL_IMPORTS = {
    "matplotlib": "the bench extra: plots (ssdkit.bench, the training loss curve)",
    "huggingface_hub": "only to fetch a tokenizer by Hub id (models/mamba2/tokenizer.py)",
}
#: what the code relies on from jax (newer than older floors had): each must exist in the tested series
JAX_APIS = ["set_mesh", "shard_map", "sharding.get_abstract_mesh", "sharding.use_abstract_mesh"]


def _floor(req: Requirement) -> Version:
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert len(floors) == 1, f"{req}: expected one floor (>=, == or ~=)"
    return floors[0]


def _installed(name: str) -> Version:
    try:
        return Version(importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{name} is declared in pyproject.toml but not installed: pip install -e '.[dev]'")


@pytest.mark.parametrize("req", RUNTIME + DEV, ids=str)
def test_installed_versions_satisfy_the_declared_ranges(req):
    """Every floor is at most what is installed (and tested), every cap above it: a floor raised past the
    tested version, or a test run on a version the metadata excludes, fails here."""
    got = _installed(req.name)
    assert req.specifier.contains(got, prereleases=True), f"installed {req.name} {got} is outside {req}"
    assert _floor(req) <= got


def test_jax_floor_is_the_tested_series():
    """The jax floor names the minor series the suite runs on (jax changes APIs between minor releases):
    a floor left behind when the tested jax moves on fails here, as does a jax without the APIs we use."""
    import jax

    (req,) = [r for r in RUNTIME if r.name == "jax"]
    floor, got = _floor(req), _installed("jax")
    assert floor.release[:2] == got.release[:2], (
        f"pyproject.toml asks for {req} but the tests run jax {got}: the code is tested on the {got.major}."
        f"{got.minor} series only; make the floor jax>={got.major}.{got.minor}.{got.micro}")
    for api in JAX_APIS:
        obj = jax
        for part in api.split("."):
            assert hasattr(obj, part), f"jax {got} has no jax.{api}, which the library uses"
            obj = getattr(obj, part)


def test_optax_floor_has_the_tree_namespace():
    import optax

    assert hasattr(optax, "tree") and hasattr(optax.tree, "norm"), "optax.tree.norm needs optax>=0.2.5"
    assert _floor(next(r for r in RUNTIME if r.name == "optax")) >= Version("0.2.5")


def _library_imports() -> dict[str, set[str]]:
    """Top-level third-party module -> the library files that import it (stdlib and ours left out)."""
    found: dict[str, set[str]] = {}
    for root in (ROOT / "ssdkit", ROOT / "models"):
        for file in root.rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.partition(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("__future__", "ssdkit", "models"):
                        found.setdefault(top, set()).add(str(file.relative_to(ROOT)))
    return found


#: the modules of an extra: what only they import is declared in that extra (and they are imported lazily)
EXTRA_MODULES = {"serve": {"models/server.py"}}


def test_library_imports_are_declared_runtime_dependencies():
    """ml_dtypes (imported by the checkpoint readers) must be declared, and a test-only package (chex,
    torch, transformers, ...) must not be needed by the library; what only the server imports is in the
    serve extra."""
    declared = {canonicalize_name(r.name) for r in RUNTIME}
    providers = importlib.metadata.packages_distributions()
    undeclared = {}
    for module, files in sorted(_library_imports().items()):
        if module in OPTIONAL_IMPORTS:
            continue
        dists = {canonicalize_name(d) for d in providers.get(module, [module])}
        extra = [name for name, owners in EXTRA_MODULES.items() if files <= owners]
        allowed = declared | {canonicalize_name(r.name) for name in extra for r in EXTRAS[name]}
        if not dists & allowed:
            undeclared[module] = sorted(files)
    assert not undeclared, f"imported by the library but not in [project].dependencies: {undeclared}"
    assert "chex" not in declared and "chex" in {canonicalize_name(r.name) for r in EXTRAS["dev"]}


def test_licence_metadata_is_spdx():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not the deprecated {text = ...} table
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    (setuptools,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert _floor(setuptools) >= Version("77")  # the first setuptools that reads PEP 639's fields


def test_package_ships_py_typed_and_the_pretrained_model():
    assert resources.files("ssdkit").joinpath("py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["ssdkit"]
    from ssdkit.models.mamba2.pretrained import DEFAULT

    model = resources.files("ssdkit.models") / "pretrained" / DEFAULT
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training.json", "generation_config.json"):
        assert model.joinpath(name).is_file(), name


def _zip_package(dest: Path) -> Path:
    """The installed ssdkit (ssdkit.models included, with its data) as one zip archive, as zipimport reads it."""
    import ssdkit
    import ssdkit.models

    archive = dest / "ssdkit.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        tops = {"ssdkit": Path(ssdkit.__file__).parent, "ssdkit/models": Path(ssdkit.models.__file__).parent}
        for prefix, top in tops.items():
            for file in sorted(top.rglob("*")):
                if file.is_file() and "__pycache__" not in file.parts and not (
                        prefix == "ssdkit" and file.relative_to(top).parts[0] == "models"):
                    zf.write(file, f"{prefix}/{file.relative_to(top).as_posix()}")
    return archive


def test_shipped_model_loads_from_a_zipped_install(tmp_path):
    """Imported from a zip archive (no files on disk), the shipped model's folder is copied to a
    temporary directory once per process: the path exists with every file intact, the model loads, and
    the copy is gone when the process exits."""
    archive = _zip_package(tmp_path)
    from ssdkit.models.mamba2.pretrained import DEFAULT

    folder = resources.files("ssdkit.models") / "pretrained" / DEFAULT
    script = f"""
import hashlib, sys
sys.path.insert(0, {str(archive)!r})
from ssdkit.models import mamba2
from ssdkit.models.mamba2 import pretrained
assert pretrained.__file__.startswith({str(archive)!r}), pretrained.__file__
path = mamba2.pretrained_path()
assert path.is_dir() and mamba2.pretrained_path() == path  # one copy per process
for f in sorted(path.iterdir()):
    print(f.name, hashlib.sha256(f.read_bytes()).hexdigest())
shipped = mamba2.load_pretrained()
assert shipped.path == path and shipped.cfg.d_model > 0 and shipped.tokenizer.get_vocab_size() > 256
assert shipped.training
print("PATH", path)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    copied = dict(line.split(" ") for line in lines if line and not line.startswith("PATH "))
    expected = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.iterdir() if f.is_file()}
    assert copied == expected
    (path,) = [line.removeprefix("PATH ") for line in lines if line.startswith("PATH ")]
    assert not Path(path).exists() and not Path(path).parent.exists()  # removed at exit
