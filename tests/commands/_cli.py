"""Helpers of the CLI tests."""

from __future__ import annotations

import pytest

from iseg import ISegPipeline


def forbid_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any model load fail the test (for checks that must come before it)."""

    def fail(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(ISegPipeline, "from_pretrained", fail)


def one_error_line(err: str) -> str:
    """The only stderr line, an ``iseg: error:`` line without a traceback."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("iseg: error: "), err
    assert "Traceback" not in err
    return lines[0]
