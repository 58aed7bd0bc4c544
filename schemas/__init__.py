"""The wire contract between edge and cloud: FlatBuffers frames and tensor codecs.

Submodules (import them directly; this package stays import-light):
``schemas.frames`` (typed frames, `encode`/`decode`), ``schemas.codecs``
(tensor codecs), ``schemas.errors`` (`WireError`, `ErrorCode`),
``schemas.regen`` (regenerate ``_generated/`` from ``frames.fbs``).
"""
