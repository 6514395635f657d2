"""The error our emulator handlers raise: an AWS error code and message, rendered by each protocol's
handler (JSON `__type` for FSx, EC2 query XML for EC2)."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message
