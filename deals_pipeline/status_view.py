"""Rendering System Health as rich tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def render(health: dict[str, Any], db_path: str) -> None:
    console = Console()
    table = Table(title=f"deals_pipeline System Health ({db_path})", show_header=True, header_style="bold")
    table.add_column("area")
    table.add_column("metric")
    table.add_column("value", justify="right")
    d, b, t, u = health["deals"], health["backfill"], health["tokens"], health["upsert"]
    eta = "-" if b["eta_hours"] is None else (f">= {b['eta_hours']}" if b.get("eta_is_lower_bound") else f"{b['eta_hours']}")
    rows = [
        ("clock", "timeline", health["clock"]["description"]),
        ("clock", "now on that timeline", health["clock"]["now"][:16].replace("T", " ") + " UTC"),
        ("deals", "stored / enriched / filtered", f"{d['stored']} / {d['enriched']} / {d['filtered']}"),
        ("backfill", "pages done / total", f"{b['pages_done']} / {b['pages_total_text']}"
         + (" (complete)" if b["complete"] else "")),
        ("backfill", "in-flight page (chunks done)",
         "-" if b["in_flight_page"] is None else f"{b['in_flight_page']} ({b['in_flight_chunks']})"),
        ("backfill", "chunks done / total", f"{b['chunks_done']} / {b['chunks_total']}"),
        ("backfill", "failed chunks", str(len(b["failed_chunks"]))),
        ("backfill", "quarantined chunks (retry-quarantined)", str(len(b.get("quarantined_chunks", [])))),
        ("backfill", "ETA (hours at learned rate)", eta),
        ("tokens", "spent (actual, ledger)", str(t["spent_total"])),
        ("tokens", "per stored deal", str(t["per_stored_deal"])),
        ("tokens", "balance at last server response", str(t["server_balance"])),
        ("tokens", "projected balance now", str(t["projected_balance"])),
        ("tokens", "learned refill rate (/min), cap", f"{t['refill_rate_per_min']}, {t['cap']}"),
        ("tokens", "recharging", str(t["recharging"])),
        ("tokens", f"split of the last {t['share']['share_window_min']} min: upsert / backfill of refill",
         f"{t['share']['share_upsert_of_refill']:.2f} / {t['share']['share_backfill_of_refill']:.2f}"),
        ("upsert", "runs (ok)", f"{u['runs']} ({u['runs_ok']})"),
        ("upsert", "watermark", "-" if u["watermark"] is None else u["watermark"]["text"]),
        ("upsert", "newest deal age (min)", str(u["newest_deal_age_minutes"])),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for wait in health["waits"]:
        console.print(f"[yellow]{wait['owner']}[/yellow] {wait['line']}")
    for failure in b["failed_chunks"][:10]:
        console.print(f"[red]failed[/red] page {failure['page']} chunk {failure['chunk']} "
                      f"(attempts {failure['attempts']}): {failure['error']}")
