"""Alias of `infra.embedded.emulator` for importers outside `infra` that still use this path (tests/runtime
imports `free_port` from `infra.emulator.process`). New code imports `infra.embedded.emulator`; this
package goes once nothing imports it."""
