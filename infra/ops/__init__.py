"""Operations on a deployed environment, through boto3: preflight, model weights, cost, status.

`aws` and `weights` import only boto3, the standard library and `infra.catalog.exit_codes`: the runtime
image's init container runs `python -m infra.ops.weights pull` without the infra extra (no cdktf, pydantic
or rich). Everything else here may use the environments file; the tables and progress bars that present
these operations live in `infra.cli`.
"""
