"""kinoray: text-to-video generation at scale on Ray, in bulk (Ray Data) and online (Ray Serve).

The public face: `KinorayConfig` (the one config schema), `LocalPipeline` (the three stages in
this process), `run_job` (a bulk job) and `build_app` (the Serve application builder). They are
imported on first use, so `import kinoray` loads neither Ray nor torch.
"""

from __future__ import annotations

from importlib import import_module, metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kinoray.deployments.app import build_app
    from kinoray.models.config import KinorayConfig
    from kinoray.models.local import LocalPipeline
    from kinoray.pipelines.job import run_job

try:
    __version__ = metadata.version("kinoray")
except metadata.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

_PUBLIC = {
    "KinorayConfig": "kinoray.models.config",
    "LocalPipeline": "kinoray.models.local",
    "run_job": "kinoray.pipelines.job",
    "build_app": "kinoray.deployments.app",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'kinoray' has no attribute {name!r}")


__all__ = ["KinorayConfig", "LocalPipeline", "__version__", "build_app", "run_job"]
