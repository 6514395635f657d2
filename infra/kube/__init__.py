"""Kubernetes objects for the runtime and its monitoring, rendered in Python from an environment's stack
outputs and its size, validated against the cluster's OpenAPI schemas, and applied with the `kubernetes`
client (`moefleet render`, `moefleet install`), plus the image push to the environment's registry.

Modules: `objects` (one function per object), `render` (the whole set, in apply order, and YAML), `schema`
(OpenAPI/CRD validation), `installer` (server-side apply, rollout wait, rollback), `push` (ECR login and
docker push). Names, ports and paths come from `runtime.contract`; node labels, taints, namespace and
service account from `infra.catalog.names`; sizes from `infra.catalog.sizes`; the stack's outputs from
`infra.catalog.outputs`. The command-line side lives in `infra.cli`.
"""
