"""``python -m seg_pipeline.export``: runs :func:`seg_pipeline.export.cli.main`."""

import sys

from seg_pipeline.export.cli import main

sys.exit(main())
