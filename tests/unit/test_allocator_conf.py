"""On CUDA the runtime uses expandable segments unless the user chose an allocator setting
(issue 12: the fragmentation reserve the plan assumes)."""

from __future__ import annotations

from framework.components.device import (
    ALLOCATOR_CONF_ENV,
    EXPANDABLE_SEGMENTS,
    configure_allocator,
)


def test_expandable_segments_by_default(monkeypatch):
    monkeypatch.delenv(ALLOCATOR_CONF_ENV, raising=False)
    assert configure_allocator() == EXPANDABLE_SEGMENTS
    import os

    assert os.environ[ALLOCATOR_CONF_ENV] == EXPANDABLE_SEGMENTS


def test_the_users_setting_is_kept(monkeypatch):
    monkeypatch.setenv(ALLOCATOR_CONF_ENV, "max_split_size_mb:128")
    assert configure_allocator() == "max_split_size_mb:128"
