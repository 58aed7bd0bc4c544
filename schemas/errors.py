"""The one exception type of the wire layer and its codes.

`ErrorCode` mirrors `enum ErrorCode` in ``frames.fbs`` value for value (a test
checks it against the generated code), so a code can travel inside an `Error`
frame and mean the same thing on both sides. `WireError` is the only exception
`schemas.frames.decode` lets out: a hostile or corrupt frame must never surface
as an IndexError, struct.error or numpy error that a server loop would not
expect.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ErrorCode", "WireError"]


class ErrorCode(IntEnum):
    """Error codes shared by the decoder and the `Error` frame (append only)."""

    UNKNOWN = 0
    BAD_IDENTIFIER = 1
    UNSUPPORTED_VERSION = 2
    MALFORMED = 3
    LIMIT_EXCEEDED = 4
    BAD_TENSOR = 5
    UNAUTHORIZED = 6
    UNKNOWN_MODEL = 7
    MODEL_MISMATCH = 8
    DUPLICATE_STEP = 9
    UNKNOWN_STEP = 10
    PROTOCOL = 11
    SERVER_BUSY = 12
    INTERNAL = 13


class WireError(Exception):
    """A frame could not be accepted; `.code` says why in schema terms."""

    def __init__(self, code: ErrorCode | int, message: str) -> None:
        try:
            code = ErrorCode(code)
        except ValueError:
            code = ErrorCode.UNKNOWN
        super().__init__(f"{code.name}: {message}")
        self.code: ErrorCode = code
        self.message: str = message

    def __reduce__(self):  # keep it picklable for multiprocessing test runners
        return (type(self), (int(self.code), self.message))
