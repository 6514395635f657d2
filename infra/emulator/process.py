"""Alias of `infra.embedded.emulator.process` (see the package docstring)."""

from infra.embedded.emulator.process import Emulator, EmulatorError, free_port, port_in_use

__all__ = ["Emulator", "EmulatorError", "free_port", "port_in_use"]
