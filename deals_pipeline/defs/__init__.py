"""Everything Dagster: the code location's assets, jobs, sensors, checks and resources.

This package is the only one that imports Dagster. It is thin wiring over the plain packages
(keepa, simulator, budget, storage, and the backfill, upsert and enrichment services), which never
import it: `deals_pipeline_tests/test_layers.py` fails if one does, or if any import circle appears.
"""
