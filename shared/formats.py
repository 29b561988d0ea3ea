"""A job's result in the formats people use: pure functions over the result body, torch-free.

Every kind's result is JSON (the body of its synchronous endpoint). A diarization result can
also be given as

* **RTTM** (the NIST format pyannote.metrics and dscore read): one ``SPEAKER`` line per turn;
* **SRT** (SubRip): numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, the speaker as the text;
* **WebVTT**: a ``WEBVTT`` header, cues ``HH:MM:SS.mmm --> HH:MM:SS.mmm`` whose text is the
  speaker in a voice span, ``<v SPEAKER_00>SPEAKER_00</v>``, so players show who speaks and
  tools that read voices (``<v>``) get the speaker.

A turn's speaker is its ``identity`` when the result names one (voiceprint identification),
else its diarization label ``speaker``. Which kind offers which format is declared with the
kind (``shared/kinds.py``: ``JobKind.renderers``); the API (``GET /jobs/{id}/result?format=``)
and the CLI both render through here.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping

FormatName = Literal["json", "rttm", "srt", "vtt"]


@dataclass(frozen=True)
class OutputFormat:
    name: str
    media_type: str
    suffix: str
    description: str


FORMATS: dict[str, OutputFormat] = {
    f.name: f
    for f in (
        OutputFormat("json", "application/json", ".json", "the result body"),
        OutputFormat("rttm", "text/plain; charset=utf-8", ".rttm", "NIST RTTM, one SPEAKER line per turn"),
        OutputFormat("srt", "application/x-subrip; charset=utf-8", ".srt", "SubRip subtitles, one cue per turn"),
        OutputFormat("vtt", "text/vtt; charset=utf-8", ".vtt", "WebVTT, one cue per turn in a <v speaker> span"),
    )
}
FORMAT_NAMES: tuple[str, ...] = tuple(FORMATS)


# --- turns --------------------------------------------------------------------------------------
def _field(segment: Any, name: str) -> Any:
    # a dict first: a stored result's turns are dicts, and typing.Mapping's isinstance check took
    # a third of the time of rendering 100,000 of them
    if type(segment) is dict or isinstance(segment, Mapping):
        return segment.get(name)
    return getattr(segment, name, None)


def speaker_label(segment: Any) -> str:
    """Who speaks in a turn: its ``identity`` when identification named one, else ``speaker``.

    ``identity`` is read as a name, or as an object with a ``name``; an empty or absent one
    falls back to the diarization label.

    The label is one line of printable text (:func:`one_line`), whatever the result holds: a
    name stored before labels were checked, or imported, is rendered into files people open in
    players, editors and terminals. A name with nothing left falls back as an empty one does.
    """
    identity = _field(segment, "identity")
    if isinstance(identity, Mapping) or (identity is not None and not isinstance(identity, str)):
        identity = _field(identity, "name")
    if isinstance(identity, str) and _name(identity):
        return _name(identity)
    return _name(str(_field(segment, "speaker"))) or "unknown"


@functools.lru_cache(maxsize=1024)
def _name(text: str) -> str:
    # one_line of a speaker's name, once per name: a result has a few speakers over thousands of
    # turns, and checking every character of every turn's name again was most of a render's time
    return one_line(text)


# bidi embeddings, overrides, isolates and marks: they reorder what follows them on screen, so
# "\u202eBob.wav" reads as another name than the file holds (the voiceprint label check refuses
# the same characters at the edge)
_BIDI_CONTROLS = dict.fromkeys(map(ord, "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"))


def one_line(text: str) -> str:
    """``text`` as one line of printable text: control characters (C0 and C1: NUL, a terminal's
    ESC sequences) become spaces, bidi controls go, and every run of whitespace, line breaks
    included (a blank line ends an SRT/WebVTT cue), becomes one space."""
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text.translate(_BIDI_CONTROLS))
    return " ".join(text.split())


# letters and a symbol drawn as nothing: the Hangul fillers (placeholders of an incomplete
# syllable, Unicode's default-ignorable letters) and the blank Braille pattern. A name of them
# alone ("\u3164", "\u2800\u2800") passed for visible, a letter or a symbol, and was stored and
# shown as a blank name: a label listed as an empty cell and written as a blank speaker into
# subtitles, a job's file name as a blank row
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def visible(c: str) -> bool:
    """Whether ``c`` shows as something: a letter, number, punctuation or symbol, and not one drawn
    as nothing; a format character (zero-width space, BOM, joiners), a combining mark without its
    base or a space does not."""
    return unicodedata.category(c)[0] in "LNPS" and c not in _BLANK_GLYPHS


def file_name(text: str, limit: int = 255) -> str | None:
    """A file name as a record shows it: one line of printable text (:func:`one_line`), at most
    ``limit`` long, or None when nothing visible is left. A name of zero-width spaces, joiners or
    a BOM alone (``"\u200b\ufeff"``) was kept and shown as a blank row in listings and on the
    page, where a name-less job shows its id; voiceprint labels are refused for the same."""
    name = one_line(text)[:limit]
    return name if any(visible(c) for c in name) else None


def turns(body: Mapping[str, Any] | Iterable[Any]) -> list[tuple[float, float, str]]:
    """(start, end, speaker) of a diarization result body (or of its list of segments); each
    diarized speaker under a name of its own (:func:`_distinct_names`)."""
    segments = body.get("diarization_results", []) if isinstance(body, Mapping) else body
    found = [(float(_field(s, "start")), float(_field(s, "end")), str(_field(s, "speaker")), speaker_label(s))
             for s in segments]
    names = _distinct_names((speaker, label) for _, _, speaker, label in found)
    return [(start, end, names[speaker, label]) for start, end, speaker, label in found]


def _written(name: str) -> str:
    # a name as every format writes it: RTTM's fields are split on whitespace (written "_"), and
    # SubRip's arrows are written "->", so "Bob Smith" and "Bob_Smith" are one name in RTTM
    return _rttm_field(_SRT_ARROW.sub("->", name))


# what pandas reads as a missing value by default (its STR_NA_VALUES), which is how
# pyannote.database's load_rttm, the RTTM reader of pyannote.metrics, reads every field
_READ_AS_MISSING = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
    "NULL", "NaN", "None", "n/a", "nan", "null",
})


def _rttm_field(text: str) -> str:
    """``text`` as one RTTM field, as pyannote.database's reader (pandas) reads it back: its
    whitespace written ``_`` (fields are split on it); ``"`` written ``'`` (pandas takes a field
    that starts with one for a quoted one, and a speaker named ``"Bob`` made the next two lines
    part of his name: 3 turns read as 1); and a ``_`` after a word that pandas reads as missing (a
    speaker named "NA", "None" or "null" was read back as NaN, five of them as one speaker, and a
    file named "NA.wav" gave an RTTM whose every line the reader dropped, its uri NaN)."""
    field = "_".join(text.split()).replace('"', "'")
    return f"{field}_" if field in _READ_AS_MISSING else field


def _distinct_names(pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """The name each (diarized speaker, name) pair is written under, no two speakers under one.

    A voiceprint's label is the client's choice: one labelled "SPEAKER_01" that named diarization's
    SPEAKER_00 beside an unnamed SPEAKER_01, two people enrolled as "Alex", or "Bob Smith" and
    "Bob_Smith" (one name in RTTM) wrote two speakers under one name, and every reader of the file
    (pyannote.metrics, dscore, a player's voice list) took them for one. A speaker written under
    its own diarization label keeps it; a named one keeps its name unless a speaker before it has
    it, and is then written ``name (SPEAKER_xx)``. The JSON result is not concerned: it has both
    ``speaker`` and ``identity``."""
    order = list(dict.fromkeys(pairs))
    # unnamed speakers first: their labels are the diarization's own, unique among themselves
    order.sort(key=lambda pair: pair[1] != _name(pair[0]))
    holder: dict[str, str] = {}  # written name -> the speaker written under it
    names: dict[tuple[str, str], str] = {}
    for speaker, name in order:
        chosen, n = name, 1
        while holder.setdefault(_written(chosen), speaker) != speaker:
            n += 1
            chosen = f"{name} ({_name(speaker) or 'unknown'})" + (f" {n - 1}" if n > 2 else "")
        names[speaker, name] = chosen
    return names


# --- timestamps ---------------------------------------------------------------------------------
def _clock(seconds: float, separator: str) -> str:
    ms = max(0, int(round(seconds * 1000)))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def srt_timestamp(seconds: float) -> str:
    """``HH:MM:SS,mmm`` (SubRip: a comma before the milliseconds)."""
    return _clock(seconds, ",")


def vtt_timestamp(seconds: float) -> str:
    """``HH:MM:SS.mmm`` (WebVTT: a full stop before the milliseconds; hours always written)."""
    return _clock(seconds, ".")


def _cues(body: Mapping[str, Any] | Iterable[Any]) -> list[tuple[float, float, str]]:
    # a cue must end after it starts: a turn that rounds to no time at all is no cue
    return [(s, e, label) for s, e, label in turns(body) if round(e * 1000) > round(s * 1000)]


# --- the formats --------------------------------------------------------------------------------
def to_rttm(body: Mapping[str, Any] | Iterable[Any], uri: str = "audio") -> str:
    """RTTM lines: ``SPEAKER <uri> 1 <start> <duration> <NA> <NA> <speaker> <NA> <NA>``.

    Fields are separated by spaces, so spaces in the file name or a speaker's name become ``_``;
    a name that RTTM readers take for a missing value is written with a ``_`` after it
    (:func:`_rttm_field`).
    """
    uri = _rttm_field(one_line(uri) or "audio")
    return "".join(
        f"SPEAKER {uri} 1 {start:.3f} {end - start:.3f} <NA> <NA> {_rttm_field(label)} <NA> <NA>\n"
        for start, end, label in turns(body)
    )


# the arrow of a timing line as SubRip readers take it: "-->", and for lenient ones (the srt
# package, editors) "- >", "-- >", "--->"... Replacing "-->" once left "--->" as "-->"
_SRT_ARROW = re.compile(r"-[ -]+>")


def to_srt(body: Mapping[str, Any] | Iterable[Any], uri: str = "audio") -> str:
    """SubRip: ``N``, ``start --> end``, the speaker; cues separated by a blank line. A name's
    arrow (``-->``, ``--->``, ``- >``...) is written ``->``: a line with one is a timing line."""
    blocks = [
        f"{n}\n{srt_timestamp(start)} --> {srt_timestamp(end)}\n{_SRT_ARROW.sub('->', label)}\n"
        for n, (start, end, label) in enumerate(_cues(body), start=1)
    ]
    return "\n".join(blocks)


def _vtt_escape(text: str) -> str:
    # WebVTT cue text and a voice span's annotation: &, < and > as character references
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_webvtt(body: Mapping[str, Any] | Iterable[Any], uri: str = "audio") -> str:
    """WebVTT: the ``WEBVTT`` header, then ``start --> end`` and ``<v speaker>speaker</v>`` per cue."""
    blocks = []
    for start, end, label in _cues(body):
        name = _vtt_escape(label)
        # a name's last "-" as a character reference in the span's annotation: "Ann--" closed by
        # the span's ">" wrote "<v Ann-->", and a cue line holding "-->" is a timing line to
        # every WebVTT reader (the cue was lost; webvtt-py raised TypeError on the whole file)
        voice = f"{name[:-1]}&#45;" if name.endswith("-") else name
        blocks.append(f"{vtt_timestamp(start)} --> {vtt_timestamp(end)}\n<v {voice}>{name}</v>\n")
    return "WEBVTT\n\n" + "\n".join(blocks) if blocks else "WEBVTT\n"


# what a diarization result renders to besides JSON (JobKind.renderers)
DIARIZATION_RENDERERS = {"rttm": to_rttm, "srt": to_srt, "vtt": to_webvtt}


def file_stem(filename: str | None, fallback: str) -> str:
    """A safe stem for a file name or an RTTM uri made from an uploaded file's name."""
    stem = (filename or "").rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in stem).strip("._")
    return safe[:100] or fallback


def own_stem(filename: str | None) -> str | None:
    """The uploaded file's own stem, in any script, as one line of visible text (:func:`file_name`:
    no control or bidi characters), at most 100 characters; None when nothing is left. What a
    download's ``filename*`` offers (``Réunion`` where :func:`file_stem` has ``R_union``, and
    ``会议`` where it has nothing and falls back to the job's id)."""
    name = file_name((filename or "").rsplit("/", 1)[-1].rsplit("\\", 1)[-1])
    if name is None:
        return None
    stem = (name.rsplit(".", 1)[0] if "." in name else name).strip(" .")[:100]
    return stem if any(visible(c) for c in stem) else None
