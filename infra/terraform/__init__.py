"""The real terraform binary, driven from Python: `runner` (init/plan/apply/output in a working folder),
`outputs` (an applied stack's outputs, read into the catalog's typed contract) and `plan_summary` (what a
reviewer needs from `terraform show -json`, standard library only)."""
