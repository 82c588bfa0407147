"""The data formats registry: every format module is found, rows dispatch to the right one."""
from __future__ import annotations

import pytest

from lorakit.train.data import formats


def test_registry_finds_every_format_module_in_detection_order():
    assert list(formats.FORMATS) == ["chat", "alpaca", "text"]
    assert formats.known_fields() == "'instruction'/'output' (Alpaca), 'messages' (chat) or 'text'"


@pytest.mark.parametrize("row, kind", [({"messages": [], "text": "x"}, "chat"), ({"instruction": "a"}, "alpaca"),
                                       ({"output": "a", "text": "b"}, "alpaca"), ({"text": "t"}, "text"),
                                       ({"other": 1}, None)])
def test_row_kind_dispatches_by_priority(row, kind):
    assert formats.row_kind(row) == kind


def test_validate_row_goes_through_the_format():
    assert formats.validate_row({"instruction": "i", "output": "o"}, "alpaca")["input"] == ""
    with pytest.raises(ValueError, match="text: expected a string"):
        formats.validate_row({"text": 3}, "text")
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        formats.validate_row({}, "csv")
    with pytest.raises(ValueError, match="expected a JSON object"):
        formats.validate_row([1], "chat")


def test_render_segments_of_text_and_alpaca_rows():
    assert formats.render_segments({"text": "hello"}) == [("hello", True)]
    segs = formats.render_segments({"instruction": "Say hi", "input": "", "output": "hi"}, template="alpaca")
    assert [t for _, t in segs] == [False, True] and segs[1][0] == "hi"
