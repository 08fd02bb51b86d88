"""Scan cursors round-trip exactly, and anything else is refused instead of restarting a scan."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.errors import InvalidRequest
from kvstore.router import decode_cursor, encode_cursor


@given(st.text(min_size=1, max_size=200))
def test_every_cursor_we_hand_out_decodes_to_its_key(key):
    assert decode_cursor(encode_cursor(key)) == key


@pytest.mark.parametrize("cursor", ["@@@", "a", "dXNlci8xMw==", "dXNlci8x Mw", "%%", "ü"])
def test_a_cursor_we_never_handed_out_is_refused(cursor):
    with pytest.raises(InvalidRequest, match="next_cursor"):
        decode_cursor(cursor)
