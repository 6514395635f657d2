"""CDK for Terraform constructs, one per AWS concept, in the style of the AWS CDK construct libraries.

Each construct takes a typed, frozen props dataclass (with defaults where a sensible one exists, and the
shared `AwsContext` for account, partition and region) and exposes what other constructs need as
attributes (`arn`, `name`, `security_group_id`, ...). `stacks/environment_stack.py` composes them.
Constructs read the catalog (names, labels, sizes) and nothing else of `infra`.
"""
