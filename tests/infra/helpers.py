"""Readers for synthesized cdk.tf.json documents."""

from __future__ import annotations

from typing import Any


def resources(stack: dict, rtype: str) -> dict[str, dict[str, Any]]:
    return stack.get("resource", {}).get(rtype, {})


def one(stack: dict, rtype: str, contains: str = "") -> dict[str, Any]:
    matches = [body for name, body in resources(stack, rtype).items() if contains in name]
    assert len(matches) == 1, f"expected one {rtype} matching {contains!r}, found {len(matches)}"
    return matches[0]


def gpu_node_group(stack: dict) -> dict[str, Any]:
    return one(stack, "aws_eks_node_group", "gpu-pool")


def resource_types(stack: dict) -> set[str]:
    return set(stack.get("resource", {}))
