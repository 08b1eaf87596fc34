"""How a benchmark scenario plugs into ``run_benchmarks.py``: a module in ``benchmarks/`` with ``SECTIONS``.

A scenario module (say ``benchmarks/economics.py``) defines::

    from sections import BenchContext, Section

    def measure(ctx: BenchContext) -> dict: ...          # run the scenario; small sizes when ctx.quick
    def render(result: dict) -> list[str]: ...           # markdown lines for RESULTS.md
    def check(result: dict) -> list[str]: ...            # what is broken (empty: fine); fails the run

    SECTIONS = [Section("economics", "Economics: tokens per stored deal", measure, render, check)]

``run_benchmarks.py`` imports every ``benchmarks/*.py`` except the harness files below, runs each
section after the built-in ones (``--only NAME`` to pick), appends its rendering to RESULTS.md, and
exits non-zero if a section raises or its check reports a problem, in ``--quick`` mode too: CI runs
``--quick``, so a benchmark that no longer runs fails CI instead of rotting.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

#: Files of the harness itself (not scenario modules).
HARNESS_FILES = frozenset({"run_benchmarks.py", "page_worker.py", "sections.py"})


@dataclass(frozen=True)
class BenchContext:
    """What a section gets: a scratch directory, quick mode, and the harness's progress log."""

    tmp: Path
    quick: bool
    log: Callable[[str], None]


def _no_problems(result: dict) -> list[str]:
    return []


@dataclass(frozen=True)
class Section:
    """One benchmark section: measure it, render it, and say what would make its figures meaningless."""

    name: str
    title: str
    measure: Callable[[BenchContext], dict]
    render: Callable[[dict], list[str]]
    check: Callable[[dict], list[str]] = field(default=_no_problems)


def discover(bench_dir: Path) -> list[Section]:
    """The sections of every scenario module in ``bench_dir``, in file-name order."""
    if str(bench_dir) not in sys.path:
        sys.path.insert(0, str(bench_dir))
    sections: list[Section] = []
    for path in sorted(bench_dir.glob("*.py")):
        if path.name in HARNESS_FILES or path.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise RuntimeError(f"cannot import benchmark module {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found = getattr(module, "SECTIONS", None)
        if not found or not all(isinstance(s, Section) for s in found):
            raise RuntimeError(f"{path.name} defines no SECTIONS list of sections.Section")
        sections.extend(found)
    names = [s.name for s in sections]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RuntimeError(f"benchmark section names used twice: {duplicates}")
    return sections
