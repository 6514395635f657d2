"""`moefleet`, the operator's command line (`main`), and `python -m infra.cli.push` (`make push`).

One module per group of subcommands (`plan_summary`, `operations`, `weights`, `kubernetes`), sharing
`common`: one error type (`CliError`), the exit codes of `infra.catalog.exit_codes`, the shared options
and the one environment lookup. Standard library only at import time, so `--help` is fast.
"""
