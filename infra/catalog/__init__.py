"""The catalog: what the project is made of, as data every other package reads and none redefines.

`sizes` (deployment sizes, instance types, pod profiles, default models), `environments`
(environments.toml, validated), `thresholds` (alert thresholds), `names` (names, labels and identities
shared by stacks, installer and operations), `outputs` (the stack outputs contract), `exit_codes`.
Imports nothing from the rest of `infra`; everything but `environments` is standard library only.
"""
