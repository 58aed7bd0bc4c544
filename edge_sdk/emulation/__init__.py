"""Desktop emulation of the device-cloud link (docs/design.md section 4).

Kept import-light on purpose: ``python -m edge_sdk --help`` and the emulate command
import this package, so nothing here pulls in torch or the proxy's asyncio code.
Import :mod:`edge_sdk.emulation.network` for link profiles and traces and
:mod:`edge_sdk.emulation.proxy` for the shaping TCP proxy.
"""
