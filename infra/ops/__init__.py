"""Operations on a deployed environment, through boto3: preflight, model weights, cost, status.

`aws` and `weights` import only boto3 and the standard library: the runtime image's init container runs
`python -m infra.ops.weights pull` without the infra extra (no cdktf, pydantic or rich). Everything else
here may use the environments file; the rich tables and progress bars live in `infra.ops.cli`.
"""
