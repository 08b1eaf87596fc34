"""Plain-Python Keepa layer: wire models, typed errors, Keepa time, and the HTTP client. No Dagster."""
