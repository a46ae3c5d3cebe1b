"""seg_pipeline: raster tiles in, trained, evaluated and ensembled segmentation models out.

The package is a pure library (``seg_pipeline.data``, ``.training``, ``.inference``,
``.evaluation``, ``.tracking``) under a thin Dagster layer (``seg_pipeline.defs``).

``dagster job execute -m seg_pipeline`` loads this module and looks for a ``Definitions``
object in it. Importing the Dagster layer costs a second or two and pulls Dagster into
notebooks that only want the library, so ``defs`` is attached only when Dagster itself is
already imported (always the case when the Dagster CLI, webserver or code server loads us).
Library users can ``from seg_pipeline.defs.definitions import defs`` explicitly.
"""

from __future__ import annotations

import sys

__version__ = "0.1.0"

if "dagster" in sys.modules:  # loaded by a Dagster process: expose the Definitions
    from seg_pipeline.defs.definitions import defs  # noqa: F401
