"""Render inputs for tests: an environment's config + representative stack outputs (placeholder account and
IDs, the synthesized stack's output keys — test_render checks that)."""

from __future__ import annotations

from dataclasses import replace

from infra.catalog.environments import Environment
from infra.catalog.outputs import StackOutputs, representative_outputs
from infra.kube.objects import RenderInput
from infra.kube.render import render_input

STANDARD_ENVIRONMENTS = ("local", "dev", "staging", "prod")


def make_input(env: Environment, tag: str = "v1", **overrides) -> RenderInput:
    outputs = StackOutputs.from_mapping(representative_outputs(env))
    inp = render_input(
        env,
        outputs,
        image=f"{outputs.ecr_repository_url}:{tag}",
        model=env.model,
        version=tag,
    )
    return replace(inp, **overrides) if overrides else inp
