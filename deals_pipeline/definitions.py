"""The module Dagster loads (`-m deals_pipeline.definitions`, workspace.yaml, [tool.dagster]).

The definitions themselves live in `deals_pipeline.defs`; this name stays so every command keeps working.
"""

from deals_pipeline.defs.definitions import defs

__all__ = ["defs"]
