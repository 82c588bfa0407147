"""The ShareGPT format module: conversations [{from, value}] read as chat messages; bad turns named."""
from __future__ import annotations

import pytest

from lorakit.train.data.formats import sharegpt


def test_sharegpt_turns_become_messages_and_render_as_chat():
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}], "id": 7}
    got = sharegpt.validate(row)
    assert got == {"id": 7, "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "a"}]}
    assert sharegpt.detect(row) and not sharegpt.detect({"messages": []})
    assert sharegpt.FORMAT.render is sharegpt.chat.render


@pytest.mark.parametrize("turns, message", [
    ([], "conversations: empty"),
    ("hi", "conversations: expected a list"),
    ([{"from": "bot", "value": "x"}], "conversations[0].from: unknown role 'bot'"),
    ([{"from": "human", "value": 3}], "conversations[0].value: expected a string, got int"),
    ([{"from": "human", "value": "q"}], "messages: no assistant message"),
])
def test_bad_conversations(turns, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        sharegpt.validate({"conversations": turns})
