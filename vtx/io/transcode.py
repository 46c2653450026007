"""``--gop-normalise``: a temporary MPEG-4 Part 2 copy with GOP 12 and no B-frames.

CoViAR and MM-ViT (``mm-vit.txt``, section 4) extract motion vectors and residuals from MPEG-4
Part 2 streams with a fixed GOP of 12 and only I and P frames, so every P-frame refers to the
previous frame. This re-encodes a video that way with PyAV (no ffmpeg binary). It decodes the file
an extra time, so it is opt-in.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av

from vtx.errors import VideoOpenError


def gop_normalise(src: Path, dst: Path, gop: int = 12, qscale: int = 3) -> Path:
    """Re-encode ``src``'s video stream (and audio, as AAC) to ``dst``; returns ``dst``."""
    try:
        inp = av.open(str(src))
    except (av.error.FFmpegError, OSError) as e:
        raise VideoOpenError(f"cannot open for --gop-normalise: {e}") from e
    with inp, av.open(str(dst), "w") as out:
        if not inp.streams.video:
            raise VideoOpenError("no video stream")
        vin = inp.streams.video[0]
        rate = vin.guessed_rate or vin.average_rate or 25
        rate = Fraction(rate).limit_denominator(65535)
        vout = out.add_stream("mpeg4", rate=rate)
        vout.codec_context.time_base = 1 / rate
        cc = vin.codec_context
        vout.width = cc.width + (cc.width % 2)
        vout.height = cc.height + (cc.height % 2)
        vout.pix_fmt = "yuv420p"
        vout.codec_context.gop_size = gop
        vout.codec_context.max_b_frames = 0
        vout.codec_context.options = {"qscale": str(qscale), "bf": "0", "g": str(gop),
                                      "sc_threshold": "1000000000"}  # strict GOP: no extra I
        ain = inp.streams.audio[0] if inp.streams.audio else None
        aout = out.add_stream("aac", rate=ain.rate) if ain is not None else None
        streams = (vin, ain) if ain is not None else (vin,)
        n = 0
        for packet in inp.demux(*streams):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                continue
            for frame in frames:
                if packet.stream is vin:
                    frame = frame.reformat(width=vout.width, height=vout.height, format="yuv420p")
                    frame.pts, frame.time_base = n, 1 / rate
                    frame.pict_type = 0  # AV_PICTURE_TYPE_NONE: the source's I-frames are no hint
                    n += 1
                    out.mux(vout.encode(frame))
                else:
                    frame.pts = None
                    out.mux(aout.encode(frame))
        out.mux(vout.encode(None))
        if aout is not None:
            out.mux(aout.encode(None))
    return dst
