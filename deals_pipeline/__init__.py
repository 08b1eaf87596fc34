"""deals_pipeline: collect Keepa deals into DuckDB without ever paying twice for the same work."""

__version__ = "0.1.0"
