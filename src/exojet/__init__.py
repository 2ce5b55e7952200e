"""exojet: event-sourced LLM runners and a supervisor on NATS JetStream.

The repository keeps the contract's top-level folders (`bus/`, `runner/`, `supervisor/`,
`projections/`, `models/`, `cli/`); this package maps them under the one import name
`exojet` (each is a symlink here, copied into the wheel), so an installed exojet claims
no generic top-level name.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("exojet")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+unknown"
