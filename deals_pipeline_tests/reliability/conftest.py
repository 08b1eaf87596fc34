"""Fixtures of the reliability suite: in-process stacks on the recording simulator."""

from __future__ import annotations

import functools

import pytest

from deals_pipeline_tests.reliability._support import RecordingSimulator


@pytest.fixture
def rec_stack(make_stack):
    """The suite's ``make_stack`` on a :class:`RecordingSimulator` (optionally over an existing DB file)."""
    return functools.partial(make_stack, simulator_cls=RecordingSimulator)
