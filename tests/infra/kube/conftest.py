"""Fixtures for the Kubernetes objects: render inputs per standard environment, a loopback fake API.

Environments other than one applied in a test have no real stack outputs here, so render inputs use
`representative_outputs` (same keys as the synthesized stack's outputs — test_render checks that — with
placeholder account and IDs).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infra.catalog.environments import DEFAULT_ENVIRONMENTS_FILE, Environment, load_environments
from infra.catalog.prerequisites import PREREQUISITES
from infra.kube.objects import RenderInput
from tests.infra.kube.fake_api import FakeKubeAPI
from tests.infra.kube.inputs import STANDARD_ENVIRONMENTS, make_input


@pytest.fixture(scope="session")
def environments() -> dict[str, Environment]:
    return load_environments(DEFAULT_ENVIRONMENTS_FILE)


@pytest.fixture(scope="session")
def inputs(environments: dict[str, Environment]) -> dict[str, RenderInput]:
    return {name: make_input(environments[name]) for name in STANDARD_ENVIRONMENTS}


@pytest.fixture
def fake_api() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as api:
        api.crds |= {crd for prerequisite in PREREQUISITES for crd in prerequisite.crds}
        yield api
