"""Upsert: keep the newest deals fresh, batch sized from the learned refill rate."""
