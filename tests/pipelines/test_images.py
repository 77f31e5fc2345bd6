"""The container images, checked as far as a machine without a Docker engine allows.

The Dockerfiles cannot be built here, so these tests check what makes a build fail or an
image differ from the project: what they copy exists, every package the install needs is
copied, the extras exist, torch is the pinned release, and the tags match the components'.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from stratarec.components.images import BASE_IMAGE, TRAIN_IMAGE

pytestmark = pytest.mark.pipeline

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"Dockerfile": BASE_IMAGE, "Dockerfile.train": TRAIN_IMAGE}


def _instructions(name: str) -> list[tuple[str, str]]:
    text = (ROOT / "images" / name).read_text().replace("\\\n", " ")
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_existing_files_and_every_package(name):
    copies = [args.split()[:-1] for op, args in _instructions(name) if op == "COPY"]
    sources = {src for group in copies for src in group}
    for src in sources:
        assert (ROOT / src).exists(), f"{name} copies {src}, which is not in the repository"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = {d.split("/")[0] for d in pyproject["tool"]["setuptools"]["package-dir"].values()}
    assert package_dirs <= sources, f"{name} misses {sorted(package_dirs - sources)}: the install would not find them"
    assert {"pyproject.toml", "constraints.txt", "README.md"} <= sources


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_pinned_torch_and_existing_extras(name):
    runs = " ".join(args for op, args in _instructions(name) if op == "RUN")
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert re.findall(r"torch==(\S+)", runs) == [pinned]
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    asked = {e for group in re.findall(r'"\.\[([^\]]+)\]"', runs) for e in group.split(",")}
    assert asked and asked <= extras, f"{name} asks for extras {sorted(asked - extras)} that pyproject.toml lacks"
    assert "-c constraints.txt" in runs


@pytest.mark.parametrize(("name", "tag"), DOCKERFILES.items())
def test_build_command_tags_the_image_the_components_run_in(name, tag):
    assert f"-f images/{name} -t {tag} ." in (ROOT / "images" / name).read_text()
    assert [args for op, args in _instructions(name) if op == "USER"] == ["1000"]  # never root on a cluster
