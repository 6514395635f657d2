"""MoE Fleet's infrastructure side: everything that provisions, loads, installs and watches an environment.

Packages by concern, in dependency order (each imports only from those above it; `runtime.contract` is the
one thing taken from the runtime):

- `catalog`: what the project is made of, as data: sizes, environments.toml, shared names and labels,
  alert thresholds, the stack outputs contract, exit codes. Standard library (and pydantic) only.
- `constructs`: the CDK for Terraform constructs, one per AWS concept (network, cluster, node pools,
  storage, KMS, IAM, identities, registry, monitoring, provider).
- `observability`: alert rules, the Grafana dashboard, Prometheus scrape configs, monitoring objects.
- `terraform`: the terraform runner, reading stack outputs, plan summaries.
- `kube`, `ops`: Kubernetes objects and their installer; boto3 operations (preflight, weights, cost, status).
- `cli`: the `moefleet` command line over all of the above.
- `embedded`: the emulated AWS (moto + patches) and the demo that runs everything on it.

`stacks/` (the cdktf app) composes the constructs; nothing in `catalog` or `constructs` imports from
`ops`, `kube`, `cli`, `embedded` or `stacks`.
"""
