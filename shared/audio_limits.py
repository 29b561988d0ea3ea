"""What a container header says about an upload, read without decoding a sample.

The API checks it before a job is queued and the worker again before it decodes: both refuse
what would tie a worker up for hours (too long, a rate so low that resampling multiplies it).
No torch: soundfile and PyAV read headers only.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, TypeVar, Union

from shared.errors import AudioDecodeError, AudioTooLongError

if TYPE_CHECKING:
    from shared.probe_sandbox import ProbeLimits

# below this no speech is left (telephony is 8 kHz); a 1 Hz WAV of 28 KB is 3.9 h once resampled
MIN_SAMPLE_RATE = 4_000
# the highest rate real recorders use: anything above is a forged header, which the worker's
# decoder refuses too (engine/audio.py); refused here, the client hears it at submit
MAX_SAMPLE_RATE = 768_000
# At most this many channels in the audio stream decoded. Every channel is decoded before the
# down-mix, so a decoder's work is channels x rate per second of audio, which the duration limit
# and the job's time limit (a second per second of audio) do not see: 10 s of 255-channel Ogg Opus
# (589 KB; Opus and Vorbis take 255) took 9.7 s of CPU and 16 s of a 2-core worker to decode, so an
# hour of it (about 200 MB) ran out its job's whole time limit in the decoder. Multitrack recorders
# write up to 64 (MADI, a 64-channel Dante recorder), as MAX_STREAMS allows 64 streams; 64-channel
# Opus decodes at a quarter of a second per second of audio
MAX_CHANNELS = 64
# The duration limit is also one of decoding work. Every channel is decoded at its own rate before
# the down-mix to 16 kHz mono, so a second of audio costs the decoder its rate x channels in
# samples: 8-channel 384 kHz FLAC took 49 ms of CPU per second of audio, 16 times 48 kHz stereo
# (2.9 ms), and a day of it (a small upload where it is silent) took 70 min of a worker's CPU
# where a day of a usual recording takes 4. A file may cost what the limit's length of the widest
# common recording costs: 8 tracks at 48 kHz (multitrack podcast and meeting recorders), 17 min
# of CPU for 24 h here; a file that is wider or faster is held to the same work (8-channel
# 384 kHz: 3 h; 64 channels at 768 kHz: 11 min)
WORK_SAMPLES_PER_S = 8 * 48_000


def decode_work_factor(sample_rate: int | None, channels: int | None) -> float:
    """How many seconds of the limit a second of this stream counts for (1 up to 8 x 48 kHz)."""
    if not sample_rate or not channels:
        return 1.0
    return max(1.0, sample_rate * channels / WORK_SAMPLES_PER_S)


def check_decode_work(duration: float, sample_rate: int | None, channels: int | None, max_duration: float,
                      hint: str = "") -> None:
    """Refuse (413) a file whose decoding is more work than ``max_duration`` of the widest common
    recording (``WORK_SAMPLES_PER_S``), however short it is."""
    factor = decode_work_factor(sample_rate, channels)
    if factor > 1.0 and duration * factor > max_duration:
        raise AudioTooLongError(
            f"audio is {duration:.0f} s of {channels} channels at {sample_rate} Hz: decoding it is the work of "
            f"{duration * factor:.0f} s of 8-channel 48 kHz audio, and the limit is {max_duration:.0f} s{hint}; "
            "mix it down to fewer channels or a lower sample rate first"
        )


# What the synchronous endpoints add to their 413: the same file may be submitted as a job, whose
# limit is longer (AUDIO_ANALYSIS_MAX_AUDIO_SECONDS). Said whichever way the length was found: from
# the header at submit (api/dispatch.py) or while the worker decoded it (worker/tasks.py)
SYNC_HINT = "; submit it to /jobs/* instead (asynchronous, longer limit)"


class NotAudioError(AudioDecodeError):
    """415: neither libsndfile nor FFmpeg (its audio demuxers, :data:`DEMUXERS`) opens the file
    as audio, or what FFmpeg opens holds no audio stream (a video without sound). The worker's
    decoder (engine/audio.py ``_read_pyav``) makes the same two calls and refuses such a file in
    these words; the header check says it at submit instead of queueing a job to fail."""

    @classmethod
    def unreadable(cls, why: str) -> NotAudioError:
        return cls(f"not a decodable audio file ({why})")

    @classmethod
    def no_audio_stream(cls) -> NotAudioError:
        return cls("file has no audio stream")


# libsndfile's frame count for a stream of unknown length is SF_COUNT_MAX (2**63 - 1); no real
# header declares anywhere near 2**62 frames (FLAC's own field holds 36 bits). The engine's
# decoder reads such a stream block by block (engine/audio.py)
UNKNOWN_FRAMES = 1 << 62


# The FFmpeg demuxers asked to read a header: containers that hold their own audio. FFmpeg's
# autodetection also picks demuxers that open other things named inside the file: an SDP
# description (``v=0 ... m=audio 5004 RTP/AVP``) made the API bind UDP ports and wait 10 s for
# RTP packets per upload, a concat list (``ffconcat version 1.0 / file sub/x.wav``) read a file
# relative to the process's working directory, and HLS or DASH playlists name URLs. None of
# them is a recording. A format missing here is not audio to the header check: refused at submit
# (415, NotAudioError) unless libsndfile reads it, as the worker's decoder, which keeps to the
# same list, refuses it. ``format_whitelist`` takes the demuxers' short names.
DEMUXERS = (
    "aac", "ac3", "aiff", "amr", "amrnb", "amrwb", "ape", "asf", "au", "avi", "caf", "dsf", "dts", "dtshd", "eac3",
    "flac", "flv", "gsm", "ircam", "loas", "matroska", "mlp", "mov", "mp3", "mpc", "mpc8", "mpeg", "mpegts",
    "nistsphere", "nut", "ogg", "oma", "qcp", "rm", "shn", "sox", "spdif", "tak", "truehd", "tta", "voc", "w64",
    "wav", "wv", "xwma",
)
# At most this many streams in a container. An MP4's tracks may all point at the same samples,
# and FFmpeg's MP4 demuxer looks through every track for each packet it returns, whichever
# stream is asked for: 999 tracks over one 10 min, 8 kHz AAC (a 20 MB upload) took 95 s to
# decode instead of 0.3 s, and 2.7 s of the API's header check (1000 is FFmpeg's own limit).
# Recorders write a few audio tracks, broadcast MOVs up to 16 with a video and a timecode track.
MAX_STREAMS = 64
# what av.open takes to keep to them (engine/audio.py's decoder may pass the same); a file with
# more streams fails to open (ENOMEM), in a millisecond
PYAV_OPTIONS = {"container_options": {"format_whitelist": ",".join(DEMUXERS), "max_streams": str(MAX_STREAMS)}}


@functools.cache
def pyav_options() -> dict[str, Any]:
    """What every ``av.open`` of an upload takes: :data:`PYAV_OPTIONS`, and FFmpeg's audio
    decoders as the only decoders it may open while it reads the header.

    Opening a file, FFmpeg decodes the first frames of every stream whose parameters the header
    leaves out (``avformat_find_stream_info``): a video stream's picture too. A MOV of one second
    of audio and a 16000 x 16000 PNG picture (817 KB) took 735 MB and 3 s of the API's header
    check, and each of 64 such streams (MAX_STREAMS) adds as much: one upload of 50 MB could take
    tens of GB from the API, and then from the worker's decoder. No picture is ever decoded now;
    a video's audio track is read as before. (FFmpeg opens each stream's decoder with the
    container's ``codec_whitelist``, streams found while reading packets (MPEG-TS) included.)"""
    import av

    decoders = set()
    for name in av.codecs_available:
        try:
            codec = av.Codec(name, "r")
        except Exception:  # noqa: BLE001 - an encoder only
            continue
        if codec.type == "audio":
            decoders.add(codec.name)
    options = PYAV_OPTIONS["container_options"]
    return {"container_options": {**options, "codec_whitelist": ",".join(sorted(decoders))}}


# At most this many edit-list entries (elst) in an MP4/MOV, all tracks together. FFmpeg's MP4
# demuxer builds each track's index of packets once per edit that covers them, when the file is
# opened (header check and decoder alike): 100000 edits each playing the same 60 s of 8 kHz AAC,
# a 1.3 MB upload, took 1.1 GB to open and decoded to 69 days. Recorders write one or two edits
# a track (an empty one for a start offset, one for the media less its encoder delay).
MAX_EDITS = 128
# boxes an MP4's header may hold (_mp4_header): recorders write a few dozen, a fragmented MP4 its
# moov before its fragments (where the walk stops)
_MAX_BOXES = 100_000
# boxes FFmpeg's MP4 demuxer reads the boxes within, as it does the top level's: it takes a box
# for what its type says wherever it lies (a trak or an elst in a udta is still read). cmov, a
# compressed moov (QuickTime 3), is refused: its edits are out of sight (1 KB of zlib held 20000)
_MP4_PARENTS = {
    b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf", b"udta", b"meta", b"ilst", b"wave", b"mvex",
    b"traf", b"tref", b"sinf", b"schi", b"clip", b"matt", b"imap", b"gmhd", b"tapt", b"cmov", b"mdra", b"rmra",
}
# FFmpeg reads boxes nested up to 10 deep; a sample description (stsd) is a few hundred bytes
_MAX_DEPTH = 12
_MAX_STSD = 16 << 20
# top-level boxes that hold media or fragments, not the header
_MP4_PAYLOADS = {b"mdat", b"free", b"skip", b"wide", b"junk", b"sidx", b"emsg", b"prft", b"mfra", b"pdin"}
# At most this many packets in the index FFmpeg's MP4 demuxer builds of a file, all tracks
# together (more than the file's size in bytes is refused as well: every packet has data in the
# file). Opening the file (header check and decoder alike), FFmpeg sizes a track's index by the
# count its stsz declares, not by the samples the file holds (mov_build_index, libavformat 62):
# an AVIndexEntry of 24 bytes and a time-to-sample entry of 12 (mov_merge_tts_data) a sample,
# filled as far as stts and stsc declare samples, 36 bytes in all; and each trun of a fragment
# adds its declared count the same way when it is read (mov_read_trun, which reads no bytes
# for a sample when the trun gives none of its fields). A 7.5 KB MP4 declaring 20 million
# samples of 8 bytes took 753 MB to open (60 million 2.2 GB; FFmpeg stops near 178 million, 4.3 GB
# a track, of up to 64 tracks), and one trun of 20 million samples 755 MB. 10 million is 360 MB:
# 24 h of 96 kHz AAC (8.1 million packets; 48 kHz 4.1 million), or of a 60 fps video's track
# beside 48 kHz audio (9.2 million). Uncompressed sound (one stts entry of duration 1) is indexed
# a chunk's 1024 samples or more a packet instead (_pcm_entries), whatever stsz declares.
MAX_INDEX_ENTRIES = 10_000_000
# FFmpeg's own ceiling on a track's index: UINT_MAX / sizeof(AVIndexEntry)
_FFMPEG_MAX_ENTRIES = 0xFFFFFFFF // 24
# the fewest samples a packet of uncompressed sound covers in mov_build_index: 1024 samples
# (or whole frames of a codec's samples_per_frame below 160, at least 865 of them), else one
# frame of 160 or more (GSM's 160)
_PCM_PACKET_SAMPLES = 160
# boxes of a fragmented MP4's fragments (moof, traf, trun... and the mdat between them), walked
# for their trun counts: 1,000,000 are some 150,000 fragments, a day of 0.5 s fragments or an
# hour of one a packet; the walk reads a moof's boxes from one read (about 1 s per million)
_MAX_FRAGMENT_BOXES = 1_000_000
# a moof read whole: a fragment's trun holds up to 16 bytes a sample
_MAX_MOOF = 64 << 20
# hdlr types FFmpeg reads a track's kind from (mov_read_hdlr); the last read is the kind
_AUDIO_HANDLERS = {b"soun", b"m1a "}
_OTHER_HANDLERS = {b"vide", b"subp", b"clcp"}


class _Mp4Track:
    """What FFmpeg's index of one track (trak) is built from, as declared: the largest of each
    count (FFmpeg keeps the first or the last of a repeated box; the largest bounds either)."""

    def __init__(self) -> None:
        self.samples = 0  # stsz / stz2 sample_count: the index's size, but for chunked sound
        self.chunks = 0  # stco / co64 entries the box holds
        self.stsc: list[tuple[int, int]] = []  # (body, end) of each stsc
        self.audio = False  # a sound hdlr was read for it
        self.other = False  # another kind's hdlr was read for it, or one in its stsd
        self.unit_stts: bool | None = None  # every stts is one entry of duration 1
        self.nested = False


def check_mp4_edits(fh: BinaryIO) -> None:
    """Refuse (415) an MP4/MOV whose edit lists FFmpeg would expand past :data:`MAX_EDITS`, or
    whose sample tables and fragments declare more packets than :func:`_index_limit` lets its
    index hold; anything else passes. Reads the boxes' headers and sample-table counts only (a
    recorder's header is a few KB to a few MB), from ``fh``'s start, and leaves ``fh`` there."""
    try:
        edits, entries, size = _mp4_header(fh)
    finally:
        fh.seek(0)
    if edits > MAX_EDITS:
        raise AudioDecodeError(f"MP4 file holds {edits} edit-list entries; at most {MAX_EDITS} are supported")
    if entries > _index_limit(size):
        raise AudioDecodeError(
            f"MP4 file declares {entries} samples in {size} bytes; at most one a byte and "
            f"{MAX_INDEX_ENTRIES} in all are supported (its sample tables or fragments are forged)")


def _index_limit(size: int) -> int:
    """Packets FFmpeg may index for an MP4 of ``size`` bytes: one a byte (a packet's data is in
    the file), and :data:`MAX_INDEX_ENTRIES` at most."""
    return min(size, MAX_INDEX_ENTRIES)


def _mp4_header(fh: BinaryIO) -> tuple[int, int, int]:
    """What FFmpeg would build from ``fh`` taken as an MP4: its edit-list entries, the packets
    its index would hold (every track's, and every fragment's), and the file's size (0, 0 for
    anything that is not one)."""
    import struct

    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    visited = 0
    tracks: list[_Mp4Track] = []
    open_traks = 0

    def boxes(start: int, end: int):
        """(type, body start, body end) of the boxes in [start, end), as FFmpeg walks them: any
        type, until a length that cannot be one. Anything but an MP4 ends at its first bytes,
        read as a length beyond the file ("RIFF", "fLaC", "OggS", "ID3" are over 1 GB)."""
        nonlocal visited
        at = start
        while at + 8 <= end:
            fh.seek(at)
            length, kind = struct.unpack(">I4s", fh.read(8))
            visited += 1
            if visited > _MAX_BOXES:
                raise AudioDecodeError(f"MP4 file's header holds more than {_MAX_BOXES} boxes")
            body = at + 8
            if length == 1:
                (length,) = struct.unpack(">Q", fh.read(8))
                body += 8
            elif length == 0:
                length = end - at
            if length < body - at:
                return
            yield kind, at, body, min(at + length, end)
            at += length

    def full_box(body: int, stop: int) -> bool:
        fh.seek(body)
        return stop - body >= 4 and fh.read(4) == b"\0\0\0\0"

    def fields(body: int, stop: int, count: int) -> tuple[int, ...] | None:
        """The first ``count`` 32-bit fields of a box's body, or None where it is shorter."""
        if stop - body < 4 * count:
            return None
        fh.seek(body)
        return struct.unpack(f">{count}I", fh.read(4 * count))

    def scan(body: int, stop: int) -> int:
        """Edit entries anywhere in a sample description (stsd): FFmpeg reads the boxes after
        each entry's fixed fields, whose length depends on the codec, so its bytes are searched."""
        if stop - body > _MAX_STSD:
            raise AudioDecodeError(f"MP4 file's sample description is over {_MAX_STSD >> 20} MB")
        fh.seek(body)
        data = fh.read(stop - body)
        if data.find(b"cmov") >= 4:
            raise AudioDecodeError("MP4 file's header is compressed (cmov), which is not supported")
        if tracks and data.find(b"hdlr") >= 4:
            tracks[-1].other = True  # a track kind FFmpeg may read from it: not surely sound
        total, at = 0, data.find(b"elst")
        while at >= 4:
            length = struct.unpack(">I", data[at - 4 : at])[0]
            version, count = struct.unpack(">B3xI", data[at + 4 : at + 12].ljust(8, b"\0"))
            room = min(length, len(data) - (at - 4)) - 16
            total += min(count, max(0, room) // (20 if version == 1 else 12))
            at = data.find(b"elst", at + 4)
        return total

    def table(kind: bytes, body: int, stop: int) -> None:
        """A sample table's counts, for the track FFmpeg reads it for (the last one opened)."""
        track = tracks[-1]
        if kind in (b"stsz", b"stz2") and (head := fields(body, stop, 3)):
            track.samples = max(track.samples, head[2])
        elif kind in (b"stco", b"co64") and (head := fields(body, stop, 2)):
            # FFmpeg reads as many offsets as declared, past the box up to the file's end
            held = (size - body - 8) // (4 if kind == b"stco" else 8)
            track.chunks = max(track.chunks, min(head[1], held))
        elif kind == b"stsc":
            track.stsc.append((body, stop))
        elif kind == b"stts":
            head = fields(body, stop, 4)
            unit = head is not None and head[1] == 1 and head[2] > 0 and head[3] == 1
            track.unit_stts = unit if track.unit_stts is None else track.unit_stts and unit
        elif kind == b"hdlr" and open_traks and (head := fields(body, stop, 3)):
            handler = head[2].to_bytes(4, "big")
            track.audio = track.audio or handler in _AUDIO_HANDLERS
            track.other = track.other or handler in _OTHER_HANDLERS

    def edits(start: int, end: int, top: bool = False, depth: int = 0) -> int:
        nonlocal open_traks
        total = 0
        seen_moov = False
        if depth > _MAX_DEPTH:
            return 0  # FFmpeg refuses boxes nested deeper than 10
        for kind, at, body, stop in boxes(start, end):
            if top and kind == b"moof" and seen_moov:
                fragments(at, end)  # read as the file plays, after the moov
                break
            if top and kind in _MP4_PAYLOADS:
                continue
            seen_moov = seen_moov or kind == b"moov"
            if kind == b"cmov":
                raise AudioDecodeError("MP4 file's header is compressed (cmov), which is not supported")
            if kind == b"elst" and stop - body >= 8:
                fh.seek(body)
                version, count = struct.unpack(">B3xI", fh.read(8))
                # FFmpeg reads entries while the box has bytes for them
                total += min(count, (stop - body - 8) // (20 if version == 1 else 12))
            elif kind == b"stsd":
                total += scan(body, stop)
            elif kind == b"trak":
                # a new stream: FFmpeg builds its index where its trak ends
                if open_traks:  # a trak in a trak: FFmpeg reads the rest for the inner one
                    tracks[-1].nested = True
                tracks.append(_Mp4Track())
                tracks[-1].nested = open_traks > 0
                open_traks += 1
                try:
                    total += edits(body, stop, depth=depth + 1)
                finally:
                    open_traks -= 1
            elif kind in _MP4_PARENTS:
                # a meta box may start with a version and flags (ISO) or not (QuickTime)
                total += edits(body + 4 if kind == b"meta" and full_box(body, stop) else body, stop, depth=depth + 1)
            elif tracks and kind in (b"stsz", b"stz2", b"stco", b"co64", b"stsc", b"stts", b"hdlr"):
                table(kind, body, stop)
        return total

    declared = 0  # the fragments' trun counts

    def fragments(start: int, end: int) -> None:
        """Every trun's sample count in the fragments from ``start`` on: FFmpeg adds each to its
        index as it reads the fragment, its samples' fields read past the box, to the file's end
        where they run out (mov_read_trun). A moof is read whole and its boxes walked there."""
        nonlocal declared
        walked = 0
        at = start
        while at + 8 <= end:
            fh.seek(at)
            head = fh.read(16)
            if len(head) < 8:
                return
            length, kind = struct.unpack(">I4s", head[:8])
            header = 8
            if length == 1 and len(head) == 16:
                (length,) = struct.unpack(">Q", head[8:16])
                header = 16
            elif length == 0:
                length = end - at
            if length < header:
                return
            walked += 1
            if kind == b"moof":
                if length > _MAX_MOOF:
                    raise AudioDecodeError(f"MP4 file's fragment header is over {_MAX_MOOF >> 20} MB")
                fh.seek(at + header)
                data = fh.read(length - header)
                walked += _moof_samples(data, counts := [])
                declared += sum(counts)
            if walked > _MAX_FRAGMENT_BOXES:
                raise AudioDecodeError(f"MP4 file's fragments hold more than {_MAX_FRAGMENT_BOXES} boxes")
            at += length

    edit_count = edits(0, size, top=True)
    return edit_count, declared + sum(_track_entries(fh, track) for track in tracks), size


def _moof_samples(data: bytes, counts: list[int], depth: int = 0) -> int:
    """Boxes walked in a moof's (or a traf's) body ``data``; each trun's declared sample count
    is appended to ``counts``. FFmpeg reads a trun wherever a moof holds it (it takes a box for
    what its type says), so every box with children that FFmpeg reads is looked into."""
    import struct

    walked, at = 0, 0
    while at + 8 <= len(data) and depth <= _MAX_DEPTH:
        length, kind = struct.unpack_from(">I4s", data, at)
        header = 8
        if length == 1 and at + 16 <= len(data):
            (length,) = struct.unpack_from(">Q", data, at + 8)
            header = 16
        elif length == 0:
            length = len(data) - at
        if length < header:
            break
        walked += 1
        body = data[at + header : at + length]
        if kind == b"trun" and len(body) >= 8:
            counts.append(struct.unpack_from(">I", body, 4)[0])
        elif kind in _MP4_PARENTS or kind == b"moof":
            walked += _moof_samples(body, counts, depth + 1)
        at += length
    return walked


def _track_entries(fh: BinaryIO, track: _Mp4Track) -> int:
    """Packets FFmpeg's index of ``track`` holds (mov_build_index). Uncompressed sound (a sound
    track whose one stts entry has a duration of 1) is indexed by chunks, a packet of at least
    _PCM_PACKET_SAMPLES samples or a chunk's rest: its stsz counts samples (an hour of 48 kHz
    PCM declares 172.8 million, 10 min of it took 54 MB to open, as 10 s did), and that count
    sizes nothing. Any other track is indexed a sample a packet, as many as stsz declares."""
    import struct

    if not (track.unit_stts and track.audio and not track.other and not track.nested):
        return track.samples
    runs: list[tuple[int, int]] = []
    for body, stop in track.stsc:
        if stop - body > _MAX_STSD:
            return _FFMPEG_MAX_ENTRIES  # far more runs than any writer's
        fh.seek(body)
        data = fh.read(stop - body)
        if len(data) < 8:
            continue
        declared = struct.unpack_from(">I", data, 4)[0]
        if 12 * declared > len(data) - 8:
            return _FFMPEG_MAX_ENTRIES  # FFmpeg reads the runs past the box: bytes of anything
        runs.extend((first, count) for first, count, _ in struct.iter_unpack(">III", data[8 : 8 + 12 * declared]))
    if not runs or not track.chunks:
        return 0  # FFmpeg indexes none of it
    # FFmpeg counts the packets with the runs' first chunks, wrapping where one lies past the
    # chunks there are; every writer's run starts at a chunk of the track, in order
    firsts = [first for first, _ in runs]
    if firsts[0] != 1 or any(b <= a for a, b in zip(firsts, firsts[1:])) or firsts[-1] > track.chunks:
        return _FFMPEG_MAX_ENTRIES
    most = max(count for _, count in runs)
    return track.chunks * max(1, -(-most // _PCM_PACKET_SAMPLES))


# At most this many chunks in a WAV (RIFF, RIFX, RF64, BW64) that FFmpeg opens. Its WAV demuxer
# walks every chunk of the file when it opens it, before the audio and after it, a seek each: a
# WAV of 8-byte empty chunks around one second of audio, which libsndfile gives up on ("no data
# chunk"), took 31 s of the API's CPU at submit for 64 MB (0.3 s a MB through the upload's Python
# file object; 0.1 s a MB for the worker's decoder), so a 1 GB upload was minutes of the API's
# core where a WAV's header is read in a millisecond. Recorders write a dozen chunks (fmt, fact,
# bext, iXML, LIST, cue, JUNK padding...); libsndfile, which reads them first, is not concerned.
MAX_RIFF_CHUNKS = 1024


def check_riff_chunks(fh: BinaryIO) -> None:
    """Refuse (415) a WAV whose chunks FFmpeg would walk past :data:`MAX_RIFF_CHUNKS`; anything
    else passes. Reads chunk headers only, from ``fh``'s start, and leaves ``fh`` there."""
    try:
        chunks = _riff_chunks(fh)
    finally:
        fh.seek(0)
    if chunks > MAX_RIFF_CHUNKS:
        raise AudioDecodeError(f"WAV file holds more than {MAX_RIFF_CHUNKS} chunks; "
                               "a recording holds a few (fmt, data and some metadata)")


def _riff_chunks(fh: BinaryIO) -> int:
    """Chunks FFmpeg's WAV demuxer (libavformat/wavdec.c) would walk in ``fh``, counted up to
    one past :data:`MAX_RIFF_CHUNKS` (0 for anything that is not a WAV): the same walk, from
    the first chunk after the RIFF header (RF64's ds64 read first) to the end of the file,
    stopping where it stops (a data chunk of unknown length)."""
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    # FFmpeg is given the file from behind its ID3v2 tags (ffmpeg_input)
    start = id3_end(fh)
    fh.seek(start)
    head = fh.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX", b"RF64", b"BW64") or head[8:12] != b"WAVE":
        return 0
    order = "big" if head[:4] == b"RIFX" else "little"
    wide = head[:4] in (b"RF64", b"BW64")
    at, data_size = start + 12, None
    if wide:  # ds64 first: the 64-bit sizes, the data chunk's among them
        ds64 = fh.read(28)
        if len(ds64) < 28 or ds64[:4] != b"ds64":
            return 0
        data_size = int.from_bytes(ds64[16:24], "little")
        at += 8 + int.from_bytes(ds64[4:8], "little")
    chunks = 0
    while chunks <= MAX_RIFF_CHUNKS:
        fh.seek(at)
        header = fh.read(8)
        if len(header) < 8:
            break
        chunks += 1
        tag, length = header[:4], int.from_bytes(header[4:8], order)
        following = at + 8 + length
        if tag == b"data":
            if wide:
                following = at + 8 + (data_size or 0)
            if (head[:4] != b"RF64" and length == 0) or (not wide and length == 0xFFFFFFFF):
                break  # the data runs to the end of the file: FFmpeg looks no further
        if following >= size:
            break
        # chunks start at even offsets from the RIFF header's
        at = following + ((following - start) & 1)
    return chunks


def wav_data_unsized(fh: BinaryIO) -> bool:
    """Whether ``fh`` is a WAV (RIFF or RIFX) whose data chunk declares 0 bytes and yet has bytes
    behind its header: what a recorder writing to a stream leaves (it cannot go back to fill the
    sizes in; FFmpeg's ``-f wav pipe:`` writes 0xFFFFFFFF, others 0). libsndfile takes such a
    chunk for no samples (a length of 0 s, then "audio holds no samples" in the worker); FFmpeg's
    WAV demuxer reads it to the end of the file, as the header check (``_probe``) and the
    decoder (engine/audio.py) then do. Walks the chunk headers (at most MAX_RIFF_CHUNKS) from
    ``fh``'s start, and leaves ``fh`` there."""
    try:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(0)
        head = fh.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
            return False
        order = "big" if head[:4] == b"RIFX" else "little"
        at = 12
        for _ in range(MAX_RIFF_CHUNKS):
            fh.seek(at)
            header = fh.read(8)
            if len(header) < 8:
                return False
            length = int.from_bytes(header[4:8], order)
            if header[:4] == b"data":
                return length == 0 and at + 8 < size
            at += 8 + length + (length & 1)
        return False
    finally:
        fh.seek(0)


# What a Matroska/WebM file's metadata may hold. Opening one, FFmpeg's Matroska demuxer reads
# every level-1 element before the first Cluster, and those its SeekHead points at wherever they
# lie, into lists of structures, then turns the tags into the container's metadata: after each Tag
# it converts the whole metadata dictionary again (ff_metadata_conv, libavformat 62), and each
# insertion searches it from the start, so n tags of distinct names cost about n**3 steps. 2,000
# tags of one short name each (a 67 KB upload) held the API's header check 13 s, 10,000 (211 KB)
# over half an hour, a core each, and the job was queued for the worker to open it again. Empty
# elements cost as much memory as full ones: 60 MB of empty Tag elements took 1.25 GB to open,
# Chapters' and Cues' about 22 and 8 times their size. Writers put a Tag per track and one for the
# file (mkvmerge: 8 statistics tags a track, 520 for 64 tracks), a few chapters and a cue a
# cluster (24 h: about 17,000, 0.4 MB).
MAX_MKV_TAGS = 128  # Tag elements, each a conversion of the whole dictionary
MAX_MKV_SIMPLE_TAGS = 1024  # SimpleTag elements, nested ones included: the dictionary's entries
MAX_MKV_TAGS_BYTES = 256 << 10  # Tags elements together, walked element by element here
MAX_MKV_METADATA_BYTES = 4 << 20  # SeekHead, Info, Tracks, Chapters, Tags and Attachments' lists
MAX_MKV_CUES_BYTES = 8 << 20  # Cues: 8 bytes of index a byte (and 1 s to open 13 MB of them)
MAX_MKV_SEEKHEAD_BYTES = 64 << 10  # a SeekHead, read whole here: a writer's names a few elements
# Seek entries of all SeekHeads together, parsed here (about 4 us each: 4 MB of them in 64
# SeekHeads pointing at each other took 0.8 s of the API's thread); a writer's name a dozen
# elements (one that indexes every Cluster is held to 3,600 by the SeekHead's size)
MAX_MKV_SEEK_ENTRIES = 8192
_EBML, _SEGMENT, _CLUSTER = 0x1A45DFA3, 0x18538067, 0x1F43B675
_SEEKHEAD, _SEEK, _SEEK_ID, _SEEK_POSITION = 0x114D9B74, 0x4DBB, 0x53AB, 0x53AC
_TAGS, _TAG, _SIMPLE_TAG, _CUES, _ATTACHMENTS = 0x1254C367, 0x7373, 0x67C8, 0x1C53BB6B, 0x1941A469
_MKV_METADATA = {_SEEKHEAD, 0x1549A966, 0x1654AE6B, 0x1043A770, _TAGS, _CUES}  # + Info, Tracks, Chapters
# level-1 elements FFmpeg's demuxer reads through a SeekHead (matroska_execute_seekhead), at most
_MKV_MAX_LEVEL1 = 255
# level-1 elements ahead of the first Cluster, walked here one header read each (and by FFmpeg):
# a writer puts a dozen there (SeekHead, Void, Info, Tracks, Tags, Cues, Chapters, Attachments);
# 1 GB of 5-byte empty elements would be 200 million reads of the API's thread (0.24 s a MB)
MAX_MKV_LEVEL1 = 1024
# the children of an EBML header of unknown size, read one by one to find where it ends (7 are
# written: EBMLVersion, EBMLReadVersion, EBMLMaxIDLength, EBMLMaxSizeLength, DocType and its versions)
_EBML_HEADER_IDS = {0x4286, 0x42F7, 0x42F2, 0x42F3, 0x4282, 0x4287, 0x4285, 0x4281, 0xEC, 0xBF}
_MAX_EBML_HEADER_ELEMENTS = 64


def _ebml_vint(data: bytes, at: int, *, keep_marker: bool) -> tuple[int, int] | None:
    """(value, length) of the EBML variable-length integer at ``data[at:]``; None where there is
    none (a first byte of 0, or the data ends). An element size of all ones (unknown) is -1."""
    if at >= len(data) or data[at] == 0:
        return None
    length = 9 - data[at].bit_length()
    if at + length > len(data):
        return None
    value = int.from_bytes(data[at : at + length], "big")
    if keep_marker:
        return value, length
    value &= (1 << (7 * length)) - 1
    return (-1 if value == (1 << (7 * length)) - 1 else value), length


def check_matroska(fh: BinaryIO) -> None:
    """Refuse (415) a Matroska/WebM file whose metadata FFmpeg would take more than a moment or
    more than a few hundred MB to read (:data:`MAX_MKV_TAGS` and the rest); anything else passes.
    Reads the element headers of the first Segment's level-1 elements, and of its Tags, from
    ``fh``'s start, and leaves ``fh`` there."""
    try:
        found = _matroska_metadata(fh)
    finally:
        fh.seek(0)
    if found is not None:
        _refuse_matroska(*found)


def _refuse_matroska(tags: int, simple: int, tag_bytes: int, metadata: int, cues: int) -> None:
    if tags > MAX_MKV_TAGS or simple > MAX_MKV_SIMPLE_TAGS or tag_bytes > MAX_MKV_TAGS_BYTES:
        raise AudioDecodeError(
            f"Matroska file's tags are over {MAX_MKV_TAGS} tags, {MAX_MKV_SIMPLE_TAGS} names or "
            f"{MAX_MKV_TAGS_BYTES >> 10} KB, which is all that is supported")
    if metadata > MAX_MKV_METADATA_BYTES or cues > MAX_MKV_CUES_BYTES:
        raise AudioDecodeError(
            f"Matroska file's metadata is {metadata} bytes and its cues {cues}; at most "
            f"{MAX_MKV_METADATA_BYTES >> 20} MB and {MAX_MKV_CUES_BYTES >> 20} MB are supported")


def _matroska_metadata(fh: BinaryIO) -> tuple[int, int, int, int, int] | None:
    """(Tag elements, SimpleTag elements, bytes of Tags, bytes of the other metadata elements,
    bytes of Cues) FFmpeg would read opening ``fh``: the first Segment's level-1 elements up to
    its first Cluster (what follows is read as the file plays, or where a SeekHead points), and
    those its SeekHeads point at, at most 255 of them as FFmpeg. None for anything that is not a
    Matroska file. Raises AudioDecodeError (415) as soon as a count passes its limit (what
    :func:`check_matroska` refuses), or past :data:`MAX_MKV_LEVEL1` elements before the first
    Cluster: what is walked here is bounded whatever the file's size."""
    fh.seek(0, os.SEEK_END)
    size = fh.tell()

    def header(at: int) -> tuple[int, int, int] | None:
        """(id, body start, body end) of the element at ``at``; end -1 for an unknown size."""
        fh.seek(at)
        head = fh.read(12)
        ident = _ebml_vint(head, 0, keep_marker=True)
        if ident is None or ident[1] > 4:
            return None
        length = _ebml_vint(head, ident[1], keep_marker=False)
        if length is None:
            return None
        body = at + ident[1] + length[1]
        return ident[0], body, (-1 if length[0] < 0 else body + length[0])

    first = header(0)
    if first is None or first[0] != _EBML:
        return None
    after = first[2]
    if after < 0:
        # an EBML header of unknown size, which FFmpeg opens: it ends at the first element that
        # is not one of its own (ebml_parse's end of an unknown-size level), the Segment
        after, read = first[1], 0
        while (child := header(after)) is not None and child[0] in _EBML_HEADER_IDS and child[2] >= 0:
            read += 1
            if read > _MAX_EBML_HEADER_ELEMENTS:
                raise AudioDecodeError(f"Matroska file's EBML header holds more than {_MAX_EBML_HEADER_ELEMENTS} "
                                       "elements; a writer's holds 7")
            after = child[2]
    segment = header(after)
    if segment is None or segment[0] != _SEGMENT:
        return None
    start, end = segment[1], size if segment[2] < 0 else min(segment[2], size)
    counts = {"tags": 0, "simple": 0, "tag_bytes": 0, "metadata": 0, "cues": 0, "seeks": 0}

    def walk_tags(at: int, stop: int, depth: int) -> None:
        # every element of a Tags element, to the depth FFmpeg reads (EBML_MAX_DEPTH, 16)
        while at < stop and depth <= 16 and counts["tags"] <= MAX_MKV_TAGS \
                and counts["simple"] <= MAX_MKV_SIMPLE_TAGS:
            found = header(at)
            if found is None or found[2] < 0:
                return
            ident, body, close = found
            if ident in (_TAG, _SIMPLE_TAG):
                counts["tags" if ident == _TAG else "simple"] += 1
                walk_tags(body, min(close, stop), depth + 1)
            at = close

    def seek_entries(body: int, close: int):
        # (SeekID, SeekPosition) of a SeekHead (at most MAX_MKV_SEEKHEAD_BYTES, read whole)
        fh.seek(body)
        data, at = fh.read(close - body), 0
        while at < len(data):
            ident = _ebml_vint(data, at, keep_marker=True)
            length = _ebml_vint(data, at + ident[1], keep_marker=False) if ident else None
            if ident is None or length is None or length[0] < 0:
                break
            inner, stop = at + ident[1] + length[1], at + ident[1] + length[1] + length[0]
            if ident[0] == _SEEK:
                counts["seeks"] += 1
                if counts["seeks"] > MAX_MKV_SEEK_ENTRIES:
                    raise AudioDecodeError(f"Matroska file's SeekHeads hold more than {MAX_MKV_SEEK_ENTRIES} "
                                           "entries; a writer's name a dozen elements")
                fields: dict[int, int] = {}
                while inner < min(stop, len(data)):
                    kid = _ebml_vint(data, inner, keep_marker=True)
                    klen = _ebml_vint(data, inner + kid[1], keep_marker=False) if kid else None
                    if kid is None or klen is None or klen[0] < 0:
                        break
                    value = data[inner + kid[1] + klen[1] : inner + kid[1] + klen[1] + klen[0]]
                    fields[kid[0]] = int.from_bytes(value[:8], "big")
                    inner += kid[1] + klen[1] + klen[0]
                if _SEEK_ID in fields and _SEEK_POSITION in fields:
                    yield fields[_SEEK_ID], fields[_SEEK_POSITION]
            at = stop

    seen: set[int] = set()
    pending: list[int] = []
    queued: set[int] = set()  # seen or pending: at most _MKV_MAX_LEVEL1 positions, as FFmpeg

    def refuse_past_limits() -> None:
        _refuse_matroska(counts["tags"], counts["simple"], counts["tag_bytes"], counts["metadata"], counts["cues"])

    def element(at: int) -> int | None:
        """Count the level-1 element at ``at``; where the next one starts (None: stop walking)."""
        found = header(at)
        if found is None:
            return None
        ident, body, close = found
        if close < 0:
            return None  # a Cluster of unknown length, or anything FFmpeg cannot skip
        close = min(close, end)
        if at in seen or len(seen) >= _MKV_MAX_LEVEL1 and ident != _CLUSTER:
            return close
        if ident == _CLUSTER:
            return None  # FFmpeg stops here; what lies behind it is reached through a SeekHead
        seen.add(at)
        queued.add(at)
        if ident == _TAGS:
            counts["tag_bytes"] += close - body
            if counts["tag_bytes"] <= MAX_MKV_TAGS_BYTES:
                walk_tags(body, close, 0)
        elif ident == _CUES:
            counts["cues"] += close - body
        elif ident in _MKV_METADATA or ident == _ATTACHMENTS:
            # an attachment's data is one buffer; its list of files is counted in the same way
            counts["metadata"] += close - body if ident != _ATTACHMENTS else min(close - body, 64 << 10)
            if ident == _SEEKHEAD and close - body > MAX_MKV_SEEKHEAD_BYTES:
                raise AudioDecodeError(f"Matroska file's SeekHead is {close - body} bytes; at most "
                                       f"{MAX_MKV_SEEKHEAD_BYTES >> 10} KB is supported")
            if ident == _SEEKHEAD:
                for kind, position in seek_entries(body, close):
                    if kind != _CLUSTER and start + position < end and start + position not in queued \
                            and len(queued) < _MKV_MAX_LEVEL1:
                        queued.add(start + position)
                        pending.append(start + position)
        refuse_past_limits()
        return close

    at: int | None = start
    walked = 0
    while at is not None and at < end:
        walked += 1
        if walked > MAX_MKV_LEVEL1:
            raise AudioDecodeError(f"Matroska file holds more than {MAX_MKV_LEVEL1} elements before its "
                                   "audio; a writer puts a dozen there")
        at = element(at)
    while pending:
        element(pending.pop())
    return counts["tags"], counts["simple"], counts["tag_bytes"], counts["metadata"], counts["cues"]


# At most this many frames in the ID3v2 tags at a file's start. FFmpeg reads those tags for every
# container it opens (avformat_open_input), and puts each text frame into the file's metadata, a
# dictionary that each insertion searches from its start: n frames of distinct names (TXXX) cost
# n**2 steps. ID3 ahead of AAC (which libsndfile does not read) held the API's header check 3.7 s
# for 20,000 frames (370 KB), 17.8 s for 40,000 (730 KB), and a tag may be 256 MB; the job was
# queued (202). Taggers write a few dozen frames (a podcast's chapters, CHAP, one frame each).
MAX_ID3_FRAMES = 1024
# At most this many ID3v2 tags one after another at a file's start, which FFmpeg reads (or skips)
# one by one before any container: 1 GB of 10-byte empty tags is 100 million, and walking them
# took the API's thread 0.14 s a MB (check_id3) and 0.08 s (check_ape). A file has one, a file
# re-tagged by a careless tool a few.
MAX_ID3_TAGS = 64


def _id3_tags(fh: BinaryIO):
    """(offset, 10-byte header) of each ID3v2 tag one after another at ``fh``'s start, as FFmpeg
    finds them (ff_id3v2_match, ff_id3v2_tag_len: a footer flagged in any version); raises
    AudioDecodeError (415) past :data:`MAX_ID3_TAGS`."""
    at, tags = 0, 0
    while True:
        fh.seek(at)
        head = fh.read(10)
        size = _id3_size(head)
        if size is None:
            return
        tags += 1
        if tags > MAX_ID3_TAGS:
            raise AudioDecodeError(f"the file begins with more than {MAX_ID3_TAGS} ID3 tags; a tagger writes one")
        yield at, head
        at += size


def _id3_size(head: bytes) -> int | None:
    """The whole size of the ID3v2 tag whose header ``head`` begins with (ff_id3v2_tag_len: a
    footer flagged in any version), None where it begins with none (ff_id3v2_match)."""
    if len(head) < 10 or head[:3] != b"ID3" or 0xFF in head[3:5] or any(b & 0x80 for b in head[6:10]):
        return None
    return 10 + _syncsafe(head[6:10]) + (10 if head[5] & 0x10 else 0)


def id3_end(fh: BinaryIO) -> int:
    """Where the ID3v2 tags one after another at ``fh``'s start end (as :func:`_id3_tags` finds
    them), 0 where there are none or where they run past the file's end (a truncated file, left
    to FFmpeg as it is). Leaves ``fh`` at its start."""
    end = 0
    try:
        for at, head in _id3_tags(fh):
            end = at + _id3_size(head)  # type: ignore[operator]  (a tag's header: never None)
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
    finally:
        fh.seek(0)
    return end if end < size else 0


def xing_count(fh: BinaryIO) -> tuple[float, int] | None:
    """(seconds, bytes) an MP3's Xing/Info header counts (frames x samples per frame / rate, and
    the bytes of its frames), where the first frame behind its ID3v2 tags holds one that counts
    both; None otherwise. Reads that frame only, and leaves ``fh`` where it was. libsndfile (mpg123)
    takes the count for the file's length, and FFmpeg too unless the file is over 1/16 larger
    than the bytes it counts (then FFmpeg estimates from the bitrate: MP3s joined with cat)."""
    where = fh.tell()
    try:
        fh.seek(id3_end(fh))  # where FFmpeg is given the file (ffmpeg_input)
        frame = fh.read(4 + 32 + 20)
    finally:
        fh.seek(where)
    if len(frame) < 56 or frame[0] != 0xFF or frame[1] & 0xE0 != 0xE0:
        return None
    version, layer = (frame[1] >> 3) & 3, (frame[1] >> 1) & 3  # version 3: MPEG-1, 2: MPEG-2, 0: 2.5
    rate = (44100, 48000, 32000, 0)[(frame[2] >> 2) & 3]
    if layer != 1 or version == 1 or not rate:  # Layer III only (the Xing header's own)
        return None
    rate >>= {3: 0, 2: 1, 0: 2}[version]
    mono = frame[3] >> 6 == 3
    side = (17 if mono else 32) if version == 3 else (9 if mono else 17)
    tag = frame[4 + side : 4 + side + 16]
    if tag[:4] not in (b"Xing", b"Info") or int.from_bytes(tag[4:8], "big") & 3 != 3:
        return None
    seconds = int.from_bytes(tag[8:12], "big") * (1152 if version == 3 else 576) / rate
    return seconds, int.from_bytes(tag[12:16], "big")


class _After:
    """A binary file read from ``start`` on, as a file of its own (offsets, its size): what
    FFmpeg is given of a file behind its ID3v2 tags (:func:`ffmpeg_input`)."""

    def __init__(self, fh: BinaryIO, start: int) -> None:
        self.fh, self.start = fh, start
        fh.seek(start)

    def read(self, size: int = -1) -> bytes:
        return self.fh.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            offset = self.start + max(0, offset)
        return self.fh.seek(offset, whence) - self.start

    def tell(self) -> int:
        return self.fh.tell() - self.start


def ffmpeg_input(fh: BinaryIO) -> BinaryIO:
    """What FFmpeg opens of ``fh`` (the header check's :func:`ffmpeg_header` and the worker's
    decoder alike): the file from behind its leading ID3v2 tags, else ``fh`` itself.

    FFmpeg tells a container from the first MB it reads (PROBE_BUF_MAX), and looks behind an ID3
    tag only where the tag ends within it: an AAC (ADTS) podcast behind 1 MB of tag (its cover
    art) was taken for an MP3 with no frames of its own, which passed the header check without a
    sample rate and with a length of 130 s for 300 s, and failed in the worker ("audio stream
    holds no samples", 415). The name of a file gave FFmpeg the answer where it had ``.aac``; an
    upload, stored under a key of its own, has none. The tags are of no use here (FFmpeg skipped
    them as it read the header, their cover art was one more stream to open)."""
    start = id3_end(fh)
    return _After(fh, start) if start else fh


def check_id3(fh: BinaryIO) -> None:
    """Refuse (415) a file whose leading ID3v2 tags hold more than :data:`MAX_ID3_FRAMES` frames;
    anything else passes. Reads the frames' headers, from ``fh``'s start, and leaves ``fh`` there."""
    try:
        frames = _id3_frames(fh)
    finally:
        fh.seek(0)
    if frames > MAX_ID3_FRAMES:
        raise AudioDecodeError(f"the file's ID3 tags hold more than {MAX_ID3_FRAMES} frames; "
                               "a tagger writes a few dozen")


def _syncsafe(data: bytes) -> int:
    value = 0
    for byte in data:
        value = (value << 7) | (byte & 0x7F)
    return value


def _id3_frames(fh: BinaryIO) -> int:
    """Frames of the ID3v2 tags one after another at ``fh``'s start, as FFmpeg reads them (all of
    them, ff_id3v2_read_dict), counted up to one past :data:`MAX_ID3_FRAMES`."""
    frames = 0
    for at, head in _id3_tags(fh):
        if frames > MAX_ID3_FRAMES:
            break
        if head[3] not in (2, 3, 4):
            continue  # FFmpeg skips a version it cannot read
        version, flags, end = head[3], head[5], at + 10 + _syncsafe(head[6:10])
        inner = at + 10
        if flags & 0x40 and version >= 3:  # an extended header: its length first
            fh.seek(inner)
            length = fh.read(4)
            if len(length) == 4:
                inner += _syncsafe(length) if version == 4 else int.from_bytes(length, "big") + 4
        width = 6 if version == 2 else 10
        pos = inner  # each frame's header read on its own: a tag may be 256 MB
        while pos + width <= end and frames <= MAX_ID3_FRAMES:
            fh.seek(pos)
            data = fh.read(width)
            if len(data) < width or data[0] == 0:
                break
            frames += 1
            if version == 2:
                size = int.from_bytes(data[3:6], "big")
            elif version == 4:
                size = _syncsafe(data[4:8])
            else:
                size = int.from_bytes(data[4:8], "big")
            pos += width + size
    return frames


# At most this many frames in a Monkey's Audio (APE) file. Opening one, FFmpeg's APE demuxer makes
# a table of every frame its header declares, and an index entry of each, about 60 bytes a frame
# from a seek table of 4: an 80 MB upload declaring 20 million frames of one sample took 1.2 GB of
# the API's header check and passed it as 21 min of audio (queued, 202, for the worker to open
# again); FFmpeg's ceiling is near 67 million frames, 4 GB. Encoders write frames of 73,728 samples
# (9,216 before version 3.95): a day of 48 kHz is 56,000 frames (450,000 of the old ones).
MAX_APE_FRAMES = 2_000_000


def check_ape(fh: BinaryIO) -> None:
    """Refuse (415) an APE file that declares more than :data:`MAX_APE_FRAMES` frames; anything
    else passes. Reads its header (behind any ID3v2 tags), from ``fh``'s start, and leaves ``fh``
    there."""
    import struct

    try:
        at = id3_end(fh)  # FFmpeg skips the ID3v2 tags ahead of it
        fh.seek(at)
        head = fh.read(16)
        if len(head) < 16 or head[:4] != b"MAC ":
            return
        version = struct.unpack_from("<H", head, 4)[0]
        if version >= 3980:  # a descriptor, then the header: totalframes at its 12th byte
            fh.seek(at + struct.unpack_from("<I", head, 8)[0] + 12)
        else:
            fh.seek(at + 24)
        field = fh.read(4)
    finally:
        fh.seek(0)
    frames = struct.unpack("<I", field)[0] if len(field) == 4 else 0
    if frames > MAX_APE_FRAMES:
        raise AudioDecodeError(f"APE file declares {frames} frames; at most {MAX_APE_FRAMES} are supported")


# an Ogg page: a 27-byte header, up to 255 lacing values, up to 255 x 255 bytes of body
_OGG_MAX_PAGE = 27 + 255 + 255 * 255
# An Ogg stream's comment header (Vorbis, Opus, Theora, Speex; Ogg FLAC's VORBIS_COMMENT):
# FFmpeg puts each comment in a dictionary it searches from its start for every one it adds, so a
# header of 40,000 short comments (a 480 KB upload, chained behind 3 s of audio so that the
# worker's decoder gives it to FFmpeg) took 12.6 s of the worker's CPU to decode, quadratic (10,000
# 0.5 s; a 16 MB header about 4 h), under a job time limit of hours for a chain's unknown length;
# and libsndfile, which reads the header in the API's own process, held twice its size (a 100 MB
# comment: 204 MB; a 1 GB upload would take the API past its 2 GB). Taggers write a few dozen
# comments, and a cover picture of a few MB at most (METADATA_BLOCK_PICTURE); an audiobook two a
# chapter (CHAPTERnnn, CHAPTERnnnNAME: up to 999 chapters). 4096 comments cost FFmpeg 0.27 s
# (1024: 0.17 s, 8192: 1.04 s, 16,384: 2.3 s), so a book of 999 chapters passes
MAX_OGG_COMMENTS = 4096
MAX_OGG_COMMENT_BYTES = 16 << 20
# pages walked for a stream's header packets: libogg writes a 16 MB header in some 4000 pages;
# one byte a page, the walk would take seconds of the API's CPU before the size refused it
_MAX_OGG_HEADER_PAGES = 8192
# an Ogg page header whose flags mark the beginning of a stream (version 0, flag 0x02)
OGG_BOS = re.compile(rb"OggS\x00[\x02\x03\x06\x07]")
_OGG_SEARCH = 1 << 20


def ogg_link_starts(fh: BinaryIO, most: int | None = None, *, streams: bool = False) -> list[int] | None:
    """Where an Ogg file's links start: each beginning-of-stream page that does not follow
    another (a link multiplexing several streams opens with one such page per stream; with
    ``streams``, each of those too), searched for a MB at a time, not walked (a GB of 28-byte
    pages would be 38 million steps of Python). None where there are more than ``most``. Leaves
    ``fh`` at its start."""
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    starts: list[int] = []
    grouped_until = -1  # where the last beginning-of-stream page ends
    at = 0
    try:
        while at < size:
            fh.seek(at)
            chunk = fh.read(_OGG_SEARCH + 27 + 255)
            for found in OGG_BOS.finditer(chunk, 0, _OGG_SEARCH + 5):
                page = at + found.start()
                head = chunk[found.start() : found.start() + 27 + 255]
                if len(head) < 27 or len(head) < 27 + head[26]:
                    fh.seek(page)
                    head = fh.read(27 + 255)
                    if len(head) < 27 or len(head) < 27 + head[26]:
                        continue
                if streams or page != grouped_until:
                    starts.append(page)
                    if most is not None and len(starts) > most:
                        return None
                grouped_until = page + 27 + head[26] + sum(head[27 : 27 + head[26]])
            at += _OGG_SEARCH
    finally:
        fh.seek(0)
    return starts


def check_ogg_comments(fh: BinaryIO, *, every_link: bool = False) -> None:
    """Refuse (415) an Ogg file where a stream's comment header (each stream of its first link,
    or with ``every_link`` of every link, as FFmpeg reads them decoding a chain) declares more
    than :data:`MAX_OGG_COMMENTS` comments or is over :data:`MAX_OGG_COMMENT_BYTES`; anything
    else passes. Walks the pages of the streams' headers only (``every_link``: searches the whole
    file for streams, a MB at a time); leaves ``fh`` at its start. At most :data:`MAX_STREAMS`
    streams a link are looked at: FFmpeg opens no file of more."""
    try:
        fh.seek(0)
        if fh.read(4) != b"OggS":
            return
        starts = (ogg_link_starts(fh, streams=True) if every_link else _ogg_first_streams(fh)) or [0]
        for start in starts:
            count = _ogg_comments(fh, start)
            if count > MAX_OGG_COMMENTS:
                raise AudioDecodeError(f"the Ogg file's comment header declares {count} comments; at most "
                                       f"{MAX_OGG_COMMENTS} are supported (a tagger writes a few dozen)")
    finally:
        fh.seek(0)


def _ogg_first_streams(fh: BinaryIO) -> list[int]:
    """Where the beginning-of-stream pages that open an Ogg file lie (one a stream of its first
    link, a skeleton's or a video's before the audio's), at most :data:`MAX_STREAMS` of them."""
    starts: list[int] = []
    at = 0
    while len(starts) < MAX_STREAMS:
        fh.seek(at)
        head = fh.read(27)
        if len(head) < 27 or head[:4] != b"OggS" or not head[5] & 0x02:
            break
        starts.append(at)
        lacing = fh.read(head[26])
        at += 27 + len(lacing) + sum(lacing)
    return starts


def _ogg_comments(fh: BinaryIO, start: int) -> int:
    """The comments that the comment header (second packet) of the stream whose first page is at
    ``start`` declares; 0 where it is not one of a codec FFmpeg reads comments of, or the pages
    end or break before it does. Refuses a header over :data:`MAX_OGG_COMMENT_BYTES`."""
    packets: list[bytes] = []
    packet = bytearray()
    serial: bytes | None = None
    at = start
    for _ in range(_MAX_OGG_HEADER_PAGES):
        if len(packets) == 2:
            break
        fh.seek(at)
        head = fh.read(27)
        if len(head) < 27 or head[:4] != b"OggS":
            return 0  # the pages break: the decoders' own trouble
        lacing = fh.read(head[26])
        if len(lacing) < head[26]:
            return 0
        size = sum(lacing)
        serial = head[14:18] if serial is None else serial
        if head[14:18] == serial:
            data = fh.read(size)
            offset = 0
            for length in lacing:
                packet += data[offset : offset + length]
                offset += length
                if len(packet) > MAX_OGG_COMMENT_BYTES:
                    raise AudioDecodeError(f"the Ogg file's header packets are over {MAX_OGG_COMMENT_BYTES >> 20} MB, "
                                           "which is all that is supported")
                if length < 255:
                    packets.append(bytes(packet))
                    packet.clear()
                    if len(packets) == 2:
                        break
        at += 27 + len(lacing) + size
        if at - start > MAX_OGG_COMMENT_BYTES + (1 << 20):  # other streams' pages between: not a header
            return 0
    else:
        if len(packets) < 2:
            raise AudioDecodeError(f"the Ogg file's header packets are spread over more than {_MAX_OGG_HEADER_PAGES} "
                                   "pages, which is all that is supported")
    first, comments = packets
    if comments.startswith((b"\x03vorbis", b"\x81theora")):
        body = comments[7:]
    elif comments.startswith(b"OpusTags"):
        body = comments[8:]
    elif first.startswith(b"\x7fFLAC") and comments[:1] and comments[0] & 0x7F == 4:  # a VORBIS_COMMENT block
        body = comments[4:]
    elif first.startswith(b"Speex   "):
        body = comments
    else:
        return 0
    if len(body) < 4:
        return 0
    vendor = int.from_bytes(body[:4], "little")
    return int.from_bytes(body[4 + vendor : 8 + vendor], "little") if len(body) >= 8 + vendor else 0


# a native FLAC's start: "fLaC" and the header of its STREAMINFO block (type 0, 34 bytes; the
# last-block flag set or not), which no other FLAC block or frame begins with
_FLAC_START = re.compile(rb"fLaC[\x00\x80]\x00\x00\x22")
# what flac_starts reads at once
_FLAC_SEARCH_CHUNK = 1 << 20
# at most this many FLACs joined are found (and decoded), as of an Ogg's links
MAX_FLAC_PARTS = 1001


def flac_starts(fh: BinaryIO) -> list[int] | None:
    """Where each FLAC of a native FLAC file begins ("fLaC"), where it holds more than one: files
    joined with cat; None for one FLAC alone, or anything but a FLAC. At most
    :data:`MAX_FLAC_PARTS` are given. Searches the file a MB at a time (as :func:`ogg_chained`
    searches for a second link) from ``fh``'s start, and leaves ``fh`` there.

    libsndfile decodes a FLAC to its STREAMINFO's sample count and stops: recordings of 3 s and
    5 s joined were taken for 3 s by the API, the worker's time limit and the decoder alike, and
    analysed as their first 3 s without a word (FFmpeg decodes their frames on, but not across a
    change of rate or channels: 3 s at 16 kHz mono and 5 s at 44.1 kHz stereo decoded to 8.9 s).
    The decoder decodes each with libsndfile (engine/audio.py), and the header check sums their
    lengths (:func:`flac_joined_seconds`)."""
    try:
        at = id3_end(fh)
        fh.seek(at)
        if not _FLAC_START.match(fh.read(8)):
            return None
        starts = [at]
        at += 4
        while len(starts) < MAX_FLAC_PARTS:
            fh.seek(at)
            buf = fh.read(_FLAC_SEARCH_CHUNK)
            found = _FLAC_START.search(buf)
            if found:
                starts.append(at + found.start())
                at += found.start() + 4
                continue
            if len(buf) < _FLAC_SEARCH_CHUNK:
                break
            at += len(buf) - 7  # a start across two reads
        return starts if len(starts) > 1 else None
    finally:
        fh.seek(0)


def flac_joined_seconds(fh: BinaryIO, starts: list[int]) -> float | None:
    """The lengths of FLACs joined (``starts``: :func:`flac_starts`) together, as their STREAMINFO
    blocks count them and libsndfile decodes them; None where one does not say (a count of 0: an
    encoder writing to a pipe), or where there may be more than were found. Leaves ``fh`` at its
    start."""
    if len(starts) >= MAX_FLAC_PARTS:
        return None
    total = 0.0
    try:
        for at in starts:
            fh.seek(at + 8)
            info = fh.read(34)
            if len(info) < 34:
                return None
            fields = int.from_bytes(info[10:18], "big")
            rate, samples = fields >> 44, fields & ((1 << 36) - 1)
            if not rate or not samples:
                return None
            total += samples / rate
        return total
    finally:
        fh.seek(0)


def ogg_chained(fh: BinaryIO) -> bool:
    """Whether ``fh`` is an Ogg file of more than one link or stream: its last page belongs to
    another logical stream than its first (a chained Ogg: files joined with cat, a radio stream's
    dump; or one multiplexing several streams), or, where they are the same, a second link starts
    in it (files joined whose streams share a serial number: one file twice, a writer that numbers
    every stream alike). Reads the first page's header and the last page, then searches the file
    for a second link (a MB at a time, 0.09 s per 100 MB) where those do not tell, from ``fh``'s
    start, and leaves ``fh`` there.

    libsndfile decodes such a file to the end of its first link only and reports one link's
    length (or none): two recordings of 7 s and 3 s joined were taken for 7 s by the API, the
    worker's time limit and the decoder alike, and `cat a.ogg a.ogg` decoded to half its length.
    Its length is unknown; FFmpeg decodes every link (engine/audio.py)."""
    try:
        fh.seek(0)
        head = fh.read(27)
        if len(head) < 27 or head[:4] != b"OggS":
            return False
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - _OGG_MAX_PAGE))
        tail = fh.read(_OGG_MAX_PAGE)
    finally:
        fh.seek(0)
    at = len(tail)
    while (at := tail.rfind(b"OggS", 0, at)) >= 0:
        # the last page is the one whose header and lacing add up to the end of the file
        if tail[at + 4 : at + 5] == b"\0" and at + 27 <= len(tail):
            segments = tail[at + 26]
            lacing = tail[at + 27 : at + 27 + segments]
            if len(lacing) == segments and at + 27 + segments + sum(lacing) == len(tail):
                if tail[at + 14 : at + 18] != head[14:18]:
                    return True
                break
    return ogg_link_starts(fh, most=1) is None


# ADTS (raw AAC) sampling_frequency_index -> Hz (ISO/IEC 14496-3, table 1.18; 13 to 15 reserved)
_ADTS_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
# an ADTS stream's frames are walked a MB at a time (a frame is at most 8 KB)
_ADTS_CHUNK = 1 << 20
# what FFmpeg's ADTS demuxer resyncs to past bytes that are not a frame: 12 bits set
_ADTS_SYNC = re.compile(rb"\xff[\xf0-\xff]")
# a stream of more frames than this has no length the count gives (unknown, as a damaged one's):
# each costs 0.25 us of Python holding the GIL, and a day at 96 kHz is 8.1 million of them (54 MB
# of 7-byte frames: 2.0 s a count). 1M frames: 6 h at 44.1 or 48 kHz, 0.26 s
_MAX_ADTS_FRAMES = 1 << 20
# ID3v2 tags among an ADTS stream's frames (episodes joined, each with its tag; HLS's timed
# metadata) are skipped by FFmpeg's demuxer and by the count, up to this many
_MAX_ADTS_TAGS = 1024
# what follows an ADTS stream's last frame is searched for a sync word up to this size (an ID3v1
# tag, an APE tag with its cover art); more is taken for unknown unsearched, since the search
# costs CPU per byte (2.7 ms a MB on 0xFF-rich filler: 2.8 s for a 1 GB upload of one frame
# and filler)
_MAX_ADTS_TRAILER = 1 << 20
# how far a header check without a limit of its own (probe) counts an ADTS stream: 48 h (and no
# more than _MAX_ADTS_FRAMES)
ADTS_COUNT_S = 48 * 3600.0


@dataclass(frozen=True)
class AdtsLength:
    """What a walk over a raw AAC (ADTS) stream's frames found: the ``seconds`` they hold; where
    the walk stopped past its ``up_to``, ``at_least`` (the stream is longer); None where something
    that is not a frame lies among them (damage, files joined): a length not known."""

    seconds: float | None
    at_least: bool = False


def adts_length(fh: BinaryIO, up_to: float = ADTS_COUNT_S) -> AdtsLength | None:
    """The length of a raw AAC (ADTS) stream, counted from its frames' headers: each gives its
    length in bytes, its sample rate and its blocks of 1024 samples. None where ``fh``, behind its
    ID3v2 tags (where FFmpeg opens it, :func:`ffmpeg_input`), does not begin with an ADTS frame.
    Reads from ``fh``'s start and leaves ``fh`` there.

    An ADTS stream has no header of its own, and FFmpeg estimates its length from the bitrate of
    its first frames: a 300 s podcast opening on 10 s of digital silence (frames of 11 bytes, where
    speech takes 600) was estimated at 12,295 s and refused by a synchronous call (413, limit
    1800 s); 100 loud frames and then quiet ones made 1900 s pass as 70 s. Counted, the length is
    exact. The walk stops once it counted past ``up_to`` (the caller's limit): a frame holds at
    least 1024 samples at 96 kHz, so it reads at most 94 frames a second of ``up_to`` and a MB of
    frames more, at 0.25 us a frame (the synchronous limit's 1800 s of the smallest frames: 0.1 s),
    and at most :data:`_MAX_ADTS_FRAMES` (0.3 s): a longer stream's length is unknown (a day of
    96 kHz frames took 2.0 s of the API's GIL to count). A last frame cut short ends the stream,
    and so does what follows the last frame where FFmpeg finds no frame in it either (no sync
    word: an ID3v1 or APE tag at the file's end); an ID3v2 tag among the frames is skipped, as
    FFmpeg's demuxer skips it; anything else that is not a frame (a tag between episodes joined
    with cat, damage: FFmpeg resyncs past it and decodes on, 60 s + an ID3v1 tag + 600 s decoded
    660 s where the count said 60 s) leaves the length unknown, as a header that states none:
    the decoder then holds the file to the limit as it decodes (engine/audio.py), as it held an
    estimate, which an uploader could make as short as they liked."""
    rates = _ADTS_RATES
    try:
        at = id3_end(fh)
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(at)
        if not _adts_frame(fh.read(7)):
            return None
        blocks = [0] * len(rates)  # blocks of 1024 samples at each rate
        tags = 0
        while True:
            fh.seek(at)
            buf = fh.read(_ADTS_CHUNK)
            n, i = len(buf), 0
            while i + 7 <= n:
                b1, b2 = buf[i + 1], buf[i + 2]
                length = ((buf[i + 3] & 3) << 11) | (buf[i + 4] << 3) | (buf[i + 5] >> 5)
                if buf[i] != 0xFF or b1 & 0xF6 != 0xF0 or b2 & 0x3C > 0x30 or length < (7 if b1 & 1 else 9):
                    break  # not a frame (sync, layer, a reserved rate, a length under its header)
                if i + length > n:
                    break  # it ends in the next read, or past the file's end
                blocks[(b2 >> 2) & 15] += (buf[i + 6] & 3) + 1
                i += length
            at += i
            seconds = sum(count * 1024 / rate for count, rate in zip(blocks, rates))
            if seconds > up_to:
                return AdtsLength(seconds, at_least=True)
            if sum(blocks) > _MAX_ADTS_FRAMES:  # at least one block a frame
                return AdtsLength(None)
            if i and n == _ADTS_CHUNK:
                continue  # a frame across the end of this read
            if at >= size:
                return AdtsLength(seconds)
            fh.seek(at)
            rest = fh.read(16)
            if len(rest) < 7 or _adts_frame(rest, past=size - at):
                return AdtsLength(seconds)  # a last frame cut short: not decoded
            tag = _id3_size(rest)
            if tag is not None and tags < _MAX_ADTS_TAGS:
                tags += 1
                at += tag
                continue  # the frames go on behind it
            if size - at <= _MAX_ADTS_TRAILER and not _adts_sync_in(fh, at, size):
                return AdtsLength(seconds)  # tags at the end (ID3v1, APE), where no frame follows
            return AdtsLength(None)
    finally:
        fh.seek(0)


def _adts_sync_in(fh: BinaryIO, start: int, end: int) -> bool:
    """Whether ``fh``'s bytes from ``start`` to ``end`` hold an ADTS sync word anywhere, as
    FFmpeg's demuxer looks for one past what is not a frame (it resyncs there and decodes on):
    where none, nothing after the last frame is decoded (an ID3v1 or APE tag at the file's end)."""
    at = start
    while True:
        fh.seek(at)
        buf = fh.read(min(_ADTS_CHUNK, end - at))
        if _ADTS_SYNC.search(buf):
            return True
        if at + len(buf) >= end or len(buf) < 2:
            return False
        at += len(buf) - 1  # its last byte read again: a sync word across two reads


def _adts_frame(head: bytes, past: int | None = None) -> bool:
    """Whether ``head`` begins with an ADTS frame's header (and, given ``past``, one longer than
    the ``past`` bytes left in the file)."""
    if len(head) < 7 or head[0] != 0xFF or head[1] & 0xF6 != 0xF0 or head[2] & 0x3C > 0x30:
        return False
    length = ((head[3] & 3) << 11) | (head[4] << 3) | (head[5] >> 5)
    if length < (7 if head[1] & 1 else 9):
        return False
    return past is None or length > past


# AC-3 (ATSC A/52) frame sizes: the bitrate (kbps) each frmsizecod's pair stands for, and the
# sample rates of fscod 0 to 2
_AC3_KBPS = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 576, 640)
_AC3_RATES = (48000, 44100, 32000)
# at most this many frames are counted, about 1.1 us of Python each holding the GIL (0.3 s), as
# for ADTS: 2.3 h of 1536-sample frames at 48 kHz (what encoders write), 23 min of E-AC-3's
# shortest; a longer stream's length is unknown
_MAX_DOLBY_FRAMES = 1 << 18


def _dolby_frame(head: bytes) -> tuple[int, int, int, bool] | None:
    """(bytes, samples, sample rate, adds time) of the AC-3 or E-AC-3 frame whose header
    ``head`` (6 bytes) begins with, or None where it is not one. A dependent E-AC-3 substream
    (more channels of the same time), or an independent one past the first, adds no time."""
    if len(head) < 6 or head[0] != 0x0B or head[1] != 0x77:
        return None
    bsid = head[5] >> 3
    fscod = head[4] >> 6
    if bsid <= 10:  # AC-3
        code = head[4] & 0x3F
        if fscod == 3 or code >= 2 * len(_AC3_KBPS):
            return None
        rate, kbps = _AC3_RATES[fscod], _AC3_KBPS[code >> 1]
        words = 2 * kbps if rate == 48000 else 3 * kbps if rate == 32000 else kbps * 1536 * 1000 // (rate * 16) + (code & 1)
        return 2 * words, 1536, rate, True
    if bsid <= 16:  # E-AC-3
        size = 2 * ((((head[2] & 7) << 8) | head[3]) + 1)
        if size < 6:  # shorter than its own header
            return None
        if fscod == 3:
            fscod2 = (head[4] >> 4) & 3
            if fscod2 == 3:
                return None
            rate, blocks = _AC3_RATES[fscod2] // 2, 6
        else:
            rate, blocks = _AC3_RATES[fscod], (1, 2, 3, 6)[(head[4] >> 4) & 3]
        independent = head[2] >> 6 in (0, 2) and (head[2] >> 3) & 7 == 0
        return size, 256 * blocks, rate, independent
    return None


def dolby_length(fh: BinaryIO, up_to: float = ADTS_COUNT_S) -> AdtsLength | None:
    """The length of a raw AC-3 or E-AC-3 stream counted from its frames' headers, as
    :func:`adts_length` counts an ADTS stream's (None where ``fh``, behind its ID3v2 tags, does
    not begin with such a frame). Reads from ``fh``'s start and leaves ``fh`` there.

    FFmpeg estimates such a stream's length from its first frames' bitrate: one second at 640 kbps
    and 120 s at 32 kbps behind it read as 7 s (E-AC-3; AC-3 12 s) and decoded to 121 s, and with
    20 min behind it 61 s: a job's duration budget and time limit went by the estimate. The walk
    stops once it counted past ``up_to``; anything among the frames that is not one (damage,
    streams joined with a tag between them: FFmpeg resyncs past it and decodes on), more than
    :data:`_MAX_DOLBY_FRAMES` frames, or bytes after the last frame, leave the length unknown:
    the decoder then holds the file to the limit as it decodes (engine/audio.py)."""
    try:
        at = id3_end(fh)
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(at)
        if _dolby_frame(fh.read(6)) is None:
            return None
        seconds, frames = 0.0, 0
        while True:
            fh.seek(at)
            buf = fh.read(_ADTS_CHUNK)
            n, i = len(buf), 0
            while i + 6 <= n:
                frame = _dolby_frame(buf[i : i + 6])
                if frame is None or i + frame[0] > n:
                    break  # not a frame, or one that ends in the next read (or past the file's end)
                length, samples, rate, adds = frame
                if adds:
                    seconds += samples / rate
                frames += 1
                if frames > _MAX_DOLBY_FRAMES:
                    return AdtsLength(None)
                i += length
            at += i
            if seconds > up_to:
                return AdtsLength(seconds, at_least=True)
            if i and n == _ADTS_CHUNK:
                continue  # a frame across the end of this read
            fh.seek(at)
            frame = _dolby_frame(fh.read(6))
            if at < size and (frame is None or frame[0] <= size - at):
                return AdtsLength(None)  # not a frame, or a frame FFmpeg resyncs to past it
            # the end, or a last frame cut short (not decoded). Frames none of which adds time
            # (dependent or further substreams alone): no length this count could give
            return AdtsLength(seconds if seconds else None)
    finally:
        fh.seek(0)


# AMR's storage format (RFC 4867, section 5): a magic line, then frames of 20 ms (160 samples at
# 8 kHz, AMR-WB 320 at 16 kHz), each a header byte whose frame type (bits 3 to 6) alone fixes its
# size in bytes, header included: FFmpeg's amrnb_packed_size and amrwb_packed_size
# (libavformat/amrdec.c). Every type has a size, so every byte is a frame's start to FFmpeg's
# demuxer; a comfort-noise frame (SID, 6 bytes) or an empty one (NO_DATA, 1 byte) is a 20 ms of
# silence that discontinuous transmission (DTX) writes in a speaker's pauses
_AMR_MAGIC = {b"#!AMR\n": "nb", b"#!AMR-WB\n": "wb"}
_AMR_SIZES = {
    "nb": (13, 14, 16, 18, 20, 21, 27, 32, 6, 1, 1, 1, 1, 1, 1, 1),
    "wb": (18, 24, 33, 37, 41, 47, 51, 59, 61, 6, 1, 1, 1, 1, 1, 1),
}
# runs of 1-byte frames (NO_DATA, and the types no mode uses), skipped in one step of the regex
# engine: a day of DTX pause is 4.3 million of them (4.3 MB), 0.4 s frame by frame in Python
_AMR_EMPTY_RUN = {
    kind: re.compile(b"[" + re.escape(bytes(b for b in range(256) if sizes[(b >> 3) & 15] == 1)) + b"]+")
    for kind, sizes in _AMR_SIZES.items()
}
# FFmpeg's AMR demuxers: "amr" (with the magic line), "amrnb" and "amrwb" (headerless frames)
_AMR_DEMUXERS = {"amr": None, "amrnb": "nb", "amrwb": "wb"}
# at most this many frames are counted, about 0.12 us of Python each holding the GIL (a run of
# 1-byte frames costs one step): 11.6 h of 20 ms frames, 0.24 s of 12.2 kbps or SID frames and
# 0.39 s of SID and NO_DATA frames taking turns, the costliest; a longer stream's length is
# unknown, as an ADTS stream's past its own cap
_MAX_AMR_FRAMES = 1 << 21


def amr_length(fh: BinaryIO, up_to: float = ADTS_COUNT_S, kind: str | None = None) -> AdtsLength | None:
    """The length of an AMR file, counted from its frames' header bytes (``kind`` "nb" or "wb"
    for headerless frames, FFmpeg's ``amrnb``/``amrwb`` demuxers; None: the magic line says).
    None where ``fh``, behind its ID3v2 tags (where FFmpeg opens it), is not such a file. Reads
    from ``fh``'s start and leaves ``fh`` there.

    FFmpeg estimates an AMR file's length from the bitrate of the frames it read while opening
    it, and AMR changes its bitrate frame by frame (the "adaptive" in its name; discontinuous
    transmission writes 1-byte frames in pauses): a 10 min call that opened on 2 s of DTX silence
    was estimated at 2,743 s and refused by a synchronous call (413, limit 1800 s), and 1 s at
    12.2 kbps before 600 s at 4.75 kbps passed as 326 s. Every frame is 20 ms, so the count is
    the length FFmpeg's demuxer reads (a last frame cut short is not a packet). The walk stops
    once past ``up_to``, and after :data:`_MAX_AMR_FRAMES` frames (then unknown)."""
    try:
        at = id3_end(fh)
        fh.seek(at)
        head = fh.read(9)
        if kind is None:
            magic = next((m for m in _AMR_MAGIC if head.startswith(m)), None)
            if magic is None:
                return None
            kind, at = _AMR_MAGIC[magic], at + len(magic)
        sizes, empty = _AMR_SIZES[kind], _AMR_EMPTY_RUN[kind]
        frames = 0
        while True:
            fh.seek(at)
            buf = fh.read(_ADTS_CHUNK)
            n, i = len(buf), 0
            while i < n:
                size = sizes[(buf[i] >> 3) & 15]
                if size == 1:
                    run = empty.match(buf, i).end()  # type: ignore[union-attr]  (buf[i] is one)
                    frames += run - i
                    i = run
                    continue
                if i + size > n:
                    break  # it ends in the next read, or past the file's end (not a packet)
                i += size
                frames += 1
            at += i
            if frames / 50 > up_to:
                return AdtsLength(frames / 50, at_least=True)
            if frames > _MAX_AMR_FRAMES:
                return AdtsLength(None)
            if n < _ADTS_CHUNK or not i:
                # the file's end (a last frame cut short is dropped by FFmpeg too). Frames that
                # hold no time at all: no length this count could give
                return AdtsLength(frames / 50 if frames else None)
    finally:
        fh.seek(0)


def _amr_counter(demuxer: str) -> Callable[[BinaryIO, float], AdtsLength | None]:
    kind = _AMR_DEMUXERS[demuxer]
    return lambda fh, up_to: amr_length(fh, up_to, kind)


# FFmpeg's demuxers of raw streams whose length it estimates from the first frames' bitrate, and
# the walks that count it instead (_counted)
_COUNTED: dict[str, Callable[[BinaryIO, float], AdtsLength | None]] = {
    "aac": adts_length, "ac3": dolby_length, "eac3": dolby_length,
    **{demuxer: _amr_counter(demuxer) for demuxer in _AMR_DEMUXERS},
}


@dataclass(frozen=True)
class AudioInfo:
    """What a container header declares, read without decoding a sample."""

    duration: float | None
    sample_rate: int | None
    channels: int | None = None
    # ``duration`` is where a count stopped, past the limit it was given: the audio is longer
    at_least: bool = False
    # the FFmpeg demuxer that read the header ("aac" for a raw AAC/ADTS stream, "mp3", ...);
    # None where libsndfile read it
    demuxer: str | None = None


Source = Union[str, os.PathLike, BinaryIO]
_T = TypeVar("_T")


class _FromSettings:
    """The sandbox's limits as the process's settings have them (``Settings.probe_limits``)."""

    def __repr__(self) -> str:
        return "FROM_SETTINGS"


FROM_SETTINGS: Any = _FromSettings()


def _sandbox(sandbox: ProbeLimits | None | _FromSettings) -> ProbeLimits | None:
    if isinstance(sandbox, _FromSettings):
        from shared.settings import get_settings

        return get_settings().probe_limits()
    return sandbox


def probe(source: Source, sandbox: ProbeLimits | None | _FromSettings = FROM_SETTINGS, *,
          up_to: float = ADTS_COUNT_S) -> AudioInfo | None:
    """Duration and sample rate from the header (libsndfile, else FFmpeg); None if unreadable
    (not audio: :func:`audio_header` refuses it instead). An MP4 that FFmpeg could not open in
    bounded memory is refused (:func:`check_mp4_edits`), as :func:`audio_header` refuses it."""
    try:
        return audio_header(source, sandbox, up_to=up_to)
    except NotAudioError:
        return None


def audio_header(source: Source, sandbox: ProbeLimits | None | _FromSettings = FROM_SETTINGS, *,
                 up_to: float = ADTS_COUNT_S) -> AudioInfo | None:
    """Duration and sample rate from the header (libsndfile, else FFmpeg). Raises
    :class:`NotAudioError` (415) where neither opens the file as audio or it has no audio stream;
    None only where the header went unread (a path that cannot be opened, an in-memory upload
    past the sandbox's ``_MAX_BYTES``, an error of PyAV's own rather than FFmpeg's refusal): the
    worker's decoder then answers for the file.

    ``source`` is a path or a seekable binary file (an upload as the API received it, read from
    its start and left there). FFmpeg reads the header in a child process held to ``sandbox``'s
    limits (:mod:`shared.probe_sandbox`; a file it cannot read within them is refused, 415); None
    reads it in this process (the settings' ``probe_sandbox=false``). libsndfile's formats (WAV,
    FLAC, Ogg) are read here and never reach FFmpeg.

    A raw AAC (ADTS) stream's length is counted from its frames, up to ``up_to`` seconds (the
    caller's limit: :func:`adts_length`), not taken from FFmpeg's estimate.
    """
    sandbox = _sandbox(sandbox)
    if hasattr(source, "read"):
        try:
            check_containers(source)  # type: ignore[arg-type]
            return _counted(source, _probe(source, sandbox), up_to)  # type: ignore[arg-type]
        finally:
            source.seek(0)
    try:
        fh = open(source, "rb")
    except OSError:
        return None  # nothing to read (a path gone): unread, not refused
    with fh:
        check_containers(fh)
    info = _probe(source, sandbox)
    if info is None or info.demuxer not in _COUNTED:  # opened again only for a raw stream's count
        return info
    try:
        with open(source, "rb") as fh:
            return _counted(fh, info, up_to)
    except OSError:
        return info


def _counted(fh: BinaryIO, info: AudioInfo | None, up_to: float) -> AudioInfo | None:
    """``info`` with the length of a raw AAC (ADTS) stream counted from its frames (None where
    they cannot all be counted), in place of FFmpeg's estimate from its first frames' bitrate.

    Only where FFmpeg read the file as ADTS (its ``aac`` demuxer), which is what the decoder will
    read: a 2400 s MP3 behind the 7 bytes of one empty ADTS frame is still an MP3 to FFmpeg
    (2400 s, refused by a synchronous call's 1800 s), but the count found a frame and then
    something else, took the length for unknown, and the file passed the header check, its
    DurationBudget and its job's time limit with no length at all."""
    if info is None or info.demuxer not in _COUNTED:
        return info
    fh.seek(0)
    counted = _COUNTED[info.demuxer](fh, up_to)
    if counted is None:
        return info
    return replace(info, duration=counted.seconds, at_least=counted.at_least)


def check_containers(fh: BinaryIO) -> None:
    """Refuse (415), from their headers alone, the containers FFmpeg would read into far more
    than their size: MP4 sample tables (:func:`check_mp4_edits`), Matroska metadata, ID3v2
    frames, APE frame tables. Each reads from ``fh``'s start and leaves ``fh`` there. The one
    list for the header check (:func:`probe`) and the worker's decoder (engine/audio.py)."""
    check_mp4_edits(fh)
    check_matroska(fh)
    check_id3(fh)
    check_ape(fh)
    check_ogg_comments(fh)  # the first link's: the decoder checks every link before FFmpeg reads a chain
    behind = ffmpeg_input(fh)
    if behind is not fh:
        # FFmpeg is given the file from behind its ID3 tags (ffmpeg_input), where an MP4 or a
        # Matroska file opens as it does at a file's start: checked there too
        try:
            check_mp4_edits(behind)  # type: ignore[arg-type]
            check_matroska(behind)  # type: ignore[arg-type]
        finally:
            fh.seek(0)


def _probe(source: Source, sandbox: ProbeLimits | None = None) -> AudioInfo | None:
    import soundfile as sf

    def rewind() -> None:
        if hasattr(source, "seek"):
            source.seek(0)

    mp3 = False
    try:
        rewind()
        with sf.SoundFile(source) as snd:
            if snd.frames == 0 and snd.format == "WAV" and _read_of(source, wav_data_unsized):
                raise ValueError("a WAV data chunk of unknown size: FFmpeg reads it to the file's end")
            rate = int(snd.samplerate)
            # a length the header does not give is libsndfile's SF_COUNT_MAX: a FLAC written to
            # a pipe (FFmpeg's "-f flac -") has 0 total samples in its STREAMINFO, and its 2.9 s
            # read as 576460752303424 s, refused as too long
            known = 0 <= snd.frames < UNKNOWN_FRAMES
            if known and snd.format == "OGG":  # a chain's first link is not the file's length
                known = not _read_of(source, ogg_chained)
            seconds = snd.frames / rate if rate > 0 and known else None
            if known and snd.format == "FLAC":  # nor the first of FLACs joined: their sum
                starts = _read_of(source, flac_starts)
                if starts is not None:
                    seconds = _read_of(source, lambda fh: flac_joined_seconds(fh, starts))
            read = AudioInfo(seconds, rate, int(snd.channels) or None)
            mp3 = snd.format == "MP3"
    except Exception:  # noqa: BLE001 - not a libsndfile format: ask FFmpeg
        read = None
    if read is not None:
        if mp3 and read.duration is not None and not _read_of(source, _xing_spans) \
                and _mp3_goes_on(source, read.duration, sandbox):
            # MP3s joined end to end (cat): libsndfile's length is the first one's Xing count, and
            # the decoder reads what FFmpeg reads, all of them (engine/audio.py). FFmpeg's own
            # length is an estimate from the first frames' bitrate (joined recordings of other
            # rates or bitrates: 800 s read as 3600 s), so neither is the file's: unknown, as an
            # ADTS stream's that cannot be counted, and the decoder holds it to the limit. A 1 s
            # MP3 and 2 h of 8 kbps behind it (7 MB) passed as 1 s and decoded to 7201 s: its job
            # was held to 601 s (a day behind it needs some 18 min of a CPU engine), and an
            # enrollment's files each counted their first second in its duration budget
            read = replace(read, duration=None)
        rewind()
        return read
    # a WAV libsndfile gave up on: FFmpeg would walk its every chunk (MAX_RIFF_CHUNKS)
    if hasattr(source, "read"):
        try:
            check_riff_chunks(source)  # type: ignore[arg-type]
        finally:
            rewind()
    else:
        with open(source, "rb") as fh:
            check_riff_chunks(fh)
    rewind()
    if sandbox is not None:
        from shared.probe_sandbox import read_header

        try:
            return read_header(source, sandbox)
        finally:
            rewind()
    import av

    try:
        info = ffmpeg_header(source)
    except av.error.MemoryError as exc:  # FFmpeg's ENOMEM for more than MAX_STREAMS streams
        raise NotAudioError.unreadable(f"{type(exc).__name__}: more than {MAX_STREAMS} streams?") from exc
    except (av.FFmpegError, ValueError, OSError) as exc:
        # what the decoder's av.open refuses (415) after libsndfile refused it too
        raise NotAudioError.unreadable(type(exc).__name__) from exc
    except Exception:  # noqa: BLE001 - PyAV's own trouble, not the file's: the decoder answers for it
        return None
    if info is None:
        raise NotAudioError.no_audio_stream()
    return info


def _xing_spans(fh: BinaryIO) -> bool:
    """Whether an MP3's Xing/Info header counts the bytes of the whole file (1/32 more allowed:
    its tags), so that FFmpeg takes the same length as libsndfile without being asked: most MP3s
    (LAME writes the header for constant bitrates too), each of a batch of a thousand spared a
    sandboxed FFmpeg read (about 10 ms). Leaves ``fh`` where it was."""
    where = fh.tell()
    try:
        counted = xing_count(fh)
        if counted is None or counted[1] <= 0:
            return False
        size = fh.seek(0, os.SEEK_END) - id3_end(fh)
    finally:
        fh.seek(where)
    return size <= counted[1] + counted[1] // 32


def _mp3_goes_on(source: Source, declared_s: float, sandbox: ProbeLimits | None) -> bool:
    """Whether FFmpeg makes an MP3 over 1 % longer than ``declared_s`` (libsndfile's length), the
    decoder's own test (engine/audio.py's ``_ffmpeg_finds_more``). FFmpeg reads the header in
    ``sandbox`` as for any file it reads; where it cannot read it there, libsndfile's length
    stands and the decoder answers for the file (SandboxUnavailable, the host's state, is raised)."""
    if hasattr(source, "seek"):
        source.seek(0)  # type: ignore[union-attr]
    try:
        if sandbox is not None:
            from shared.probe_sandbox import read_header

            found = read_header(source, sandbox)
        else:
            try:
                found = ffmpeg_header(source)
            except Exception:  # noqa: BLE001 - FFmpeg's refusal or PyAV's trouble, in this process
                return False
    except AudioDecodeError:  # NotAudioError too: FFmpeg's refusal, or the sandbox's limits
        return False
    finally:
        if hasattr(source, "seek"):
            source.seek(0)  # type: ignore[union-attr]
    return found is not None and found.duration is not None and found.duration > 1.01 * declared_s + 0.5


def ffmpeg_header(source: Source) -> AudioInfo | None:
    """What FFmpeg reads of ``source``'s header (its first audio stream, and the demuxer that
    read it), None where it has no audio stream; FFmpeg's errors are raised. What this costs is
    not bounded by the file's size (see :mod:`shared.probe_sandbox`, which runs it in a child
    held to limits)."""
    import av

    with contextlib.ExitStack() as stack:
        if hasattr(source, "read"):
            target: Any = ffmpeg_input(source)  # type: ignore[arg-type]
        else:
            fh = stack.enter_context(open(source, "rb"))
            # a path FFmpeg reads itself, but from behind its ID3 tags where it has any
            target = str(source) if (behind := ffmpeg_input(fh)) is fh else behind
        with av.open(target, mode="r", metadata_errors="ignore", **pyav_options()) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            rate = stream.sample_rate or stream.codec_context.sample_rate or None
            return AudioInfo(declared_duration(container, stream), rate, stream_channels(stream),
                             demuxer=container.format.name)


def _read_of(source: Source, read: Callable[[BinaryIO], _T]) -> _T:
    """``read(fh)`` of ``source``: the file object given (each ``read`` here leaves it where it
    found it, or at its start), or the path, opened for it."""
    if hasattr(source, "read"):
        return read(source)  # type: ignore[arg-type]
    with open(source, "rb") as fh:
        return read(fh)


def declared_duration(container, stream) -> float | None:
    """Seconds an FFmpeg ``container``'s header declares for its audio ``stream`` (the stream's
    own length, else the container's), or None where it declares none it could hold.

    A header's length is a field anyone can write: an MP4's mdhd took a 64-bit duration of
    -2**62 and a Matroska Duration -1e12 s, both read as negative lengths that passed the
    duration limit and took a billion seconds off a job's total (DurationBudget), letting its
    other files through, and gave the worker a time limit of 1 s. Such a length is unknown, as
    one the header leaves out is: the worker then holds the file to the whole limit.
    """
    import av

    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    else:
        return None
    if seconds == 0 and container.format.name in ("wv", "aiff", "wav", "w64", "avi", "asf", "caf", "rm"):
        # FFmpeg's own WavPack muxer counts the samples into the first block only where it can
        # seek back to it: written to a pipe (ffmpeg -f wv -) it leaves 0. No length, as WavPack's
        # own -1 is; held to 0 (engine/audio.py's _DECLARED_FORMATS), 90 s of it was refused.
        # An AIFF-C's COMM chunk the same (0 frames over 300 s of MACE read as 0 s: nothing in a
        # job's duration budget, the floor of its time limit), a WAV's and an AVI's (a recorder
        # that stopped before it went back to count), a CAF's packet table and a RealMedia
        # stream's (FFmpeg's own muxer writes 0 for 70 s of RealAudio 14.4)
        return None
    if not (math.isfinite(seconds) and seconds >= 0):
        return None
    if container.format.name in _SPAN_OF_TIMESTAMPS and not _bytes_could_hold(container, stream, seconds):
        return None
    return seconds


# The demuxers whose length FFmpeg takes as the span of the file's timestamps (its last less its
# first): MPEG transport and program streams, which carry no length of their own
_SPAN_OF_TIMESTAMPS = ("mpegts", "mpeg")
# (factor, seconds): a forged header's length is held to factor x it + seconds as the file
# decodes (engine/audio.py), and a stated length is tested against its bytes with the same slack
DECLARED_SLACK = (2.0, 60.0)


def _bytes_could_hold(container, stream, seconds: float) -> bool:
    """Whether ``container``'s bytes could hold ``seconds`` of ``stream`` at the bitrate its codec
    states (an MP2, MP3 or AC-3 frame header's; FFmpeg's guess from the first frames for AAC),
    with the slack a forged header is given as it decodes (:data:`DECLARED_SLACK`):
    True where either is unknown.

    A timestamp that jumps (a broadcast recording across a programme change, TS recordings
    joined with cat, each from its own clock) makes the span of a file's timestamps anything: 40 s
    of MP2 in MPEG-TS with its second half 10 h on read as 36,020 s (and one that jumped back as
    59,464 s), refused by a synchronous call (413) and given a job's time limit for 10 h. A length
    its bytes cannot hold is no length: unknown, the decoder holds the file to the limit instead."""
    bit_rate = getattr(stream.codec_context, "bit_rate", 0) or 0
    size = getattr(container, "size", -1) or -1
    if bit_rate <= 0 or size <= 0:
        return True
    factor, slack = DECLARED_SLACK
    return seconds <= factor * size * 8 / bit_rate + slack


def stream_channels(stream) -> int | None:
    """Channels an FFmpeg audio ``stream``'s header declares (None where it does not say)."""
    try:
        return int(stream.codec_context.channels) or None
    except (AttributeError, TypeError, ValueError):
        return None


def check_channels(channels: int | None) -> None:
    """Refuse (415) a stream of more channels than any recording: decoding costs each of them."""
    if channels is not None and channels > MAX_CHANNELS:
        raise AudioDecodeError(f"audio has {channels} channels; at most {MAX_CHANNELS} are supported")


def check_audio_limits(
    source: Source, *, max_duration: float, min_sample_rate: int = MIN_SAMPLE_RATE, hint: str = "",
    sandbox: ProbeLimits | None | _FromSettings = FROM_SETTINGS,
) -> AudioInfo | None:
    """Refuse from the header alone what would tie a worker up for hours: too long, or too much
    to decode for its length (so many channels at such a rate), or a rate so low that resampling
    multiplies it (413 / 415); and a rate or a channel count no recorder makes (415); and a
    header FFmpeg cannot read within ``sandbox``'s limits (415, :func:`probe`); and a file that
    neither libsndfile nor FFmpeg opens as audio, or without an audio stream (415,
    :class:`NotAudioError`). None where the header went unread (:func:`audio_header`)."""
    info = audio_header(source, sandbox, up_to=max_duration)
    if info is None:
        return None
    check_channels(info.channels)
    if info.sample_rate is not None and info.sample_rate < min_sample_rate:
        raise AudioDecodeError(f"sample rate {info.sample_rate} Hz is below the minimum of {min_sample_rate} Hz")
    if info.sample_rate is not None and info.sample_rate > MAX_SAMPLE_RATE:
        raise AudioDecodeError(f"sample rate {info.sample_rate} Hz is above the maximum of {MAX_SAMPLE_RATE} Hz")
    if info.duration is not None and info.duration > max_duration:
        # a count stopped past the limit (adts_length) says no more than that
        length = f"over {max_duration:.0f} s" if info.at_least else f"{info.duration:.0f} s"
        raise AudioTooLongError(f"audio is {length} long; the limit is {max_duration:.0f} s{hint}")
    if info.duration is not None:
        check_decode_work(info.duration, info.sample_rate, info.channels, max_duration, hint)
    return info


class DurationBudget:
    """The duration limit for a job's audio files together, as their headers declare them.

    An enrollment takes up to 20 files and a comparison two: each at the limit would tie a
    worker up for that many times the longest job one file may make."""

    def __init__(self, limit: float, hint: str = "") -> None:
        self.limit, self.hint, self.total = limit, hint, 0.0

    def add(self, info: AudioInfo | None) -> None:
        if info is None or info.duration is None:
            return  # a header without a length: the decoder holds the file to the limit itself
        self.total += info.duration
        if self.total > self.limit:
            raise AudioTooLongError(f"the job's audio files are {self.total:.0f} s long together; "
                                    f"the limit is {self.limit:.0f} s{self.hint}")
