"""`gateway run` tunes the garbage collector from its settings."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway.service import tune_gc
from gateway.settings import Settings


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.usefixtures("restore_gc")
def test_threshold_and_freeze_follow_the_setting() -> None:
    tune_gc(Settings(gc_threshold=12_345))
    assert gc.get_threshold()[0] == 12_345
    assert gc.get_freeze_count() > 0


@pytest.mark.usefixtures("restore_gc")
def test_zero_keeps_pythons_threshold() -> None:
    gc.set_threshold(700, 10, 10)
    tune_gc(Settings(gc_threshold=0))
    assert gc.get_threshold() == (700, 10, 10)
