"""Backfill: one Keepa deal page per partition, processed in exactly-once chunks."""
