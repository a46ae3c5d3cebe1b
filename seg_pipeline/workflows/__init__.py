"""What combines the library's layers; the Dagster assets and the CLI call only this.

Ingest, a training stage, predicting a split, the report, the champion gate, resolving model
references, and where files live.
"""
