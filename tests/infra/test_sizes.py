from __future__ import annotations

import pytest

from infra.catalog.sizes import (
    INSTANCE_TYPES,
    SIZES,
    SizeName,
    SizeRequirementError,
    allowed_instance_types,
    check_instance_type,
)


@pytest.mark.parametrize("size", list(SizeName))
def test_default_instance_meets_its_size(size: SizeName) -> None:
    spec = SIZES[size]
    assert check_instance_type(spec, spec.default_instance_type).name == spec.default_instance_type
    assert spec.rationale and spec.source_hardware


def test_seed_tiers_as_requirements() -> None:
    assert SIZES[SizeName.DEVTEST].requirements.total_gpus == 1
    assert SIZES[SizeName.MEDIUM].requirements.gpus_per_replica == 4
    large = SIZES[SizeName.LARGE]
    assert large.requirements.total_gpus == 16 and large.gpu_nodes() == 2  # 2 × p5.48xlarge
    assert large.uses_efa and large.uses_placement_group and large.uses_local_nvme_cache


@pytest.mark.parametrize(
    ("size", "instance", "reason"),
    [
        (SizeName.DEVTEST, "g5.xlarge", "24 GB per GPU"),
        (SizeName.DEVTEST, "g6e.2xlarge", "64 GiB host memory"),
        (SizeName.MEDIUM, "g6e.12xlarge", "48 GB per GPU"),
        (SizeName.LARGE, "p5.4xlarge", r"1 GPU\(s\) per node"),
        (SizeName.DEVTEST, "x9.large", "not in the GPU catalog"),
    ],
)
def test_overrides_that_break_requirements_are_rejected(size: SizeName, instance: str, reason: str) -> None:
    with pytest.raises(SizeRequirementError, match=reason):
        check_instance_type(SIZES[size], instance)


def test_alternatives_are_priced_and_allowed() -> None:
    for spec in SIZES.values():
        allowed = allowed_instance_types(spec)
        for alternative in spec.alternatives:
            assert alternative in allowed
            assert INSTANCE_TYPES[alternative].usd_per_hour > 0
