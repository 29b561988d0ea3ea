"""JSON records read up to a large field stored last, cut in Redis.

A job record keeps its result last and a voiceprint its vector last, so a listing that shows
neither need not take them out of Redis: a poll of a batch of 1,000 finished diarizations read
104 MB of results it then skipped, a page of voiceprints 43 MB of vectors. ``RecordHeads`` reads
each record's first ``head_bytes`` with GETRANGE and cuts it before ``,"<field>":``, server-side.
"""

from __future__ import annotations

from typing import Any

# Each record's head (ARGV[1] bytes) cut before ARGV[2] (``,"<field>":``) and closed, for a record
# stored with that field last: its last other field (ARGV[3], ``"<key>":``) comes before it.
# False (nil to the caller) for any other: gone, stored by an earlier version with the field in
# the middle, or a head longer than ARGV[1]; the caller reads those whole. The markers are keys:
# inside a JSON string their quotes are escaped, so no value can hold them.
_SCRIPT = """
local heads = {}
for i, key in ipairs(KEYS) do
  local head = redis.call('GETRANGE', key, 0, tonumber(ARGV[1]) - 1)
  local at = string.find(head, ARGV[2], 1, true)
  local last = string.find(head, ARGV[3], 1, true)
  if at and last and last < at then
    heads[i] = string.sub(head, 1, at - 1) .. '}'
  else
    heads[i] = false
  end
end
return heads
"""


class RecordHeads:
    """``heads(keys)``: each record up to ``cut_before`` (a field name), or None to read it whole."""

    def __init__(self, client: Any, *, cut_before: str, last_before: str, head_bytes: int) -> None:
        self._script = client.register_script(_SCRIPT)
        self._args = [head_bytes, f',"{cut_before}":', f'"{last_before}":']

    def __call__(self, keys: list[str]) -> list[Any]:
        return list(self._script(keys=keys, args=self._args)) if keys else []
