"""Kubernetes objects for the runtime and its monitoring, rendered in Python from an environment's stack
outputs and its size, validated against the cluster's OpenAPI schemas, and applied with the `kubernetes`
client (`moefleet render`, `moefleet install`).

Modules: `outputs` (what the stack hands over), `objects` (one function per object), `render` (the whole
set, in apply order, and YAML), `schema` (OpenAPI/CRD validation), `installer` (server-side apply, rollout
wait, rollback), `cli` (the two subcommands). Names, ports and paths come from `runtime.contract`,
node labels and taints from `infra.labels`, sizes from `infra.sizes`, identities from `infra.workloads`.
"""
