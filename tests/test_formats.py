"""Output formats (shared/formats.py) on a small hand-built result: the exact text of each, and
that independent readers (pyannote.database's RTTM loader, the ``srt`` and ``webvtt-py``
packages) read back the same turns. No model, no service."""

from __future__ import annotations

import io
import re

import pytest

from shared.errors import InputError
from shared.formats import (
    FORMATS,
    file_stem,
    speaker_label,
    srt_timestamp,
    to_rttm,
    to_srt,
    to_webvtt,
    turns,
    vtt_timestamp,
)
from shared.kinds import KINDS

# two speakers, one overlap, a turn past the hour, and one identified speaker (voiceprints)
RESULT = {
    "diarization_results": [
        {"start": 0.5, "end": 3.2, "speaker": "SPEAKER_00"},
        {"start": 2.9, "end": 5.0, "speaker": "SPEAKER_01", "identity": "Alice Smith"},
        {"start": 61.005, "end": 75.25, "speaker": "SPEAKER_00", "identity": None},
        {"start": 3599.999, "end": 3723.4, "speaker": "SPEAKER_01", "identity": "Alice Smith"},
    ],
    "segments_count": 4,
    "processing_time": 1.0,
    "audio_duration": 3724.0,
    "model_device": "cpu",
}

EXPECTED_RTTM = (
    "SPEAKER meeting 1 0.500 2.700 <NA> <NA> SPEAKER_00 <NA> <NA>\n"
    "SPEAKER meeting 1 2.900 2.100 <NA> <NA> Alice_Smith <NA> <NA>\n"
    "SPEAKER meeting 1 61.005 14.245 <NA> <NA> SPEAKER_00 <NA> <NA>\n"
    "SPEAKER meeting 1 3599.999 123.401 <NA> <NA> Alice_Smith <NA> <NA>\n"
)

EXPECTED_SRT = """\
1
00:00:00,500 --> 00:00:03,200
SPEAKER_00

2
00:00:02,900 --> 00:00:05,000
Alice Smith

3
00:01:01,005 --> 00:01:15,250
SPEAKER_00

4
00:59:59,999 --> 01:02:03,400
Alice Smith
"""

EXPECTED_VTT = """\
WEBVTT

00:00:00.500 --> 00:00:03.200
<v SPEAKER_00>SPEAKER_00</v>

00:00:02.900 --> 00:00:05.000
<v Alice Smith>Alice Smith</v>

00:01:01.005 --> 00:01:15.250
<v SPEAKER_00>SPEAKER_00</v>

00:59:59.999 --> 01:02:03.400
<v Alice Smith>Alice Smith</v>
"""

# what every format must give back: (start, end, who) with the identity where there is one
TURNS = [(0.5, 3.2, "SPEAKER_00"), (2.9, 5.0, "Alice Smith"), (61.005, 75.25, "SPEAKER_00"),
         (3599.999, 3723.4, "Alice Smith")]


def test_exact_text_of_each_format():
    assert to_rttm(RESULT, uri="meeting") == EXPECTED_RTTM
    assert to_srt(RESULT) == EXPECTED_SRT
    assert to_webvtt(RESULT) == EXPECTED_VTT
    kind = KINDS["diarize"]
    assert kind.formats == ("json", "rttm", "srt", "vtt")
    assert kind.render(RESULT, "srt") == EXPECTED_SRT and kind.render(RESULT, "vtt") == EXPECTED_VTT
    assert kind.render(RESULT, "rttm", uri="meeting") == EXPECTED_RTTM


def test_timestamp_syntax():
    assert srt_timestamp(0) == "00:00:00,000" and vtt_timestamp(0) == "00:00:00.000"
    assert srt_timestamp(3723.4) == "01:02:03,400" and vtt_timestamp(3723.4) == "01:02:03.400"
    assert srt_timestamp(59.9996) == "00:01:00,000"  # rounds to the millisecond, carrying over
    assert vtt_timestamp(86399.999) == "23:59:59.999" and vtt_timestamp(90000) == "25:00:00.000"
    assert srt_timestamp(-0.001) == "00:00:00,000"
    for stamp in (srt_timestamp(12.3456), vtt_timestamp(12.3456)):
        assert re.fullmatch(r"\d{2}:\d{2}:\d{2}[,.]\d{3}", stamp)


def test_speaker_is_the_identity_when_there_is_one():
    assert speaker_label({"speaker": "SPEAKER_03"}) == "SPEAKER_03"
    assert speaker_label({"speaker": "SPEAKER_03", "identity": None}) == "SPEAKER_03"
    assert speaker_label({"speaker": "SPEAKER_03", "identity": ""}) == "SPEAKER_03"
    assert speaker_label({"speaker": "SPEAKER_03", "identity": "Bob"}) == "Bob"
    assert speaker_label({"speaker": "SPEAKER_03", "identity": {"name": "Bob", "score": 0.8}}) == "Bob"

    class Segment:  # a pydantic segment reads the same way as its JSON
        start, end, speaker, identity = 1.0, 2.0, "SPEAKER_00", "Carol"

    assert turns([Segment()]) == [(1.0, 2.0, "Carol")]


def test_names_cannot_break_the_syntax():
    hostile = {"diarization_results": [
        {"start": 1.0, "end": 2.0, "speaker": "SPEAKER_00", "identity": "Ann <b>&\n\n2\n00:00 --> 99"},
        # a turn that rounds to no time at all is no cue (a cue must end after it starts)
        {"start": 3.0, "end": 3.0004, "speaker": "SPEAKER_01"},
    ]}
    vtt = to_webvtt(hostile)
    assert vtt == "WEBVTT\n\n00:00:01.000 --> 00:00:02.000\n<v Ann &lt;b&gt;&amp; 2 00:00 --&gt; 99>Ann &lt;b&gt;&amp; 2 00:00 --&gt; 99</v>\n"
    srt_text = to_srt(hostile)
    assert srt_text == "1\n00:00:01,000 --> 00:00:02,000\nAnn <b>& 2 00:00 -> 99\n"
    rttm = to_rttm(hostile, uri="a b")
    assert [len(line.split()) for line in rttm.splitlines()] == [10, 10]
    assert rttm.startswith("SPEAKER a_b 1 1.000 1.000 <NA> <NA> Ann_<b>&_2_00:00_-->_99 <NA> <NA>\n")


def test_no_speech_gives_empty_but_valid_files():
    empty = {"diarization_results": [], "segments_count": 0}
    assert to_rttm(empty) == "" and to_srt(empty) == "" and to_webvtt(empty) == "WEBVTT\n"


def test_formats_a_kind_does_not_offer_are_refused():
    assert KINDS["embedding"].formats == ("json",)
    for name in ("compare", "compare_embedding", "embedding"):
        with pytest.raises(InputError) as info:
            KINDS[name].check_format("srt")
        assert info.value.status_code == 422 and "json" in info.value.detail
    assert KINDS["embedding"].render({"embedding": [0.5]}, "json") == '{\n  "embedding": [\n    0.5\n  ]\n}\n'
    assert set(FORMATS) == {"json", "rttm", "srt", "vtt"}
    assert FORMATS["vtt"].media_type.startswith("text/vtt") and FORMATS["srt"].media_type.startswith("application/x-subrip")


def test_file_stems_are_safe():
    assert file_stem("meeting 2024.wav", "job") == "meeting_2024"
    assert file_stem('../../evil"\r\nX: 1.wav', "job") == "evil___X__1"
    assert file_stem(None, "job") == "job" and file_stem("...", "job") == "job"


# --- independent readers --------------------------------------------------------------------------
def read_rttm(text: str) -> list[tuple[float, float, str]]:
    """With pyannote.database's own loader (what pyannote.metrics users read RTTM with)."""
    import tempfile

    from pyannote.database.util import load_rttm

    with tempfile.NamedTemporaryFile("w", suffix=".rttm", delete=False) as fh:
        fh.write(text)
    (annotation,) = load_rttm(fh.name).values()
    return sorted((round(s.start, 3), round(s.end, 3), str(label)) for s, _, label in annotation.itertracks(yield_label=True))


def read_srt(text: str) -> list[tuple[float, float, str]]:
    import srt

    return [(c.start.total_seconds(), c.end.total_seconds(), c.content) for c in srt.parse(text, ignore_errors=False)]


def read_vtt(text: str) -> list[tuple[float, float, str]]:
    """With webvtt-py; the speaker is the cue's voice (``<v ...>``)."""
    import html

    import webvtt

    captions = webvtt.from_buffer(io.StringIO(text))
    return [(_seconds(c.start), _seconds(c.end), html.unescape(c.voice)) for c in captions]


def _seconds(stamp: str) -> float:
    h, m, rest = stamp.split(":")
    return round(int(h) * 3600 + int(m) * 60 + float(rest), 3)


def test_independent_readers_read_back_the_same_turns():
    assert read_rttm(to_rttm(RESULT, uri="meeting")) == sorted((s, e, w.replace(" ", "_")) for s, e, w in TURNS)
    assert read_srt(to_srt(RESULT)) == TURNS
    assert read_vtt(to_webvtt(RESULT)) == TURNS
