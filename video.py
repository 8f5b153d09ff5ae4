"""
Video in and out for the data pipeline (pipeline.py stages 1-2): streaming decode to 10 Hz samples,
hard cuts and cut-free segments, and encoding.

Decoding (decode_video): each file is decoded once, front to back, with PyAV (the `pipeline` extra),
which gives every frame its presentation timestamp while streaming, with no per-frame seeking (PIL
cannot decode video; OpenCV's frame positions are inexact on many files). Samples are taken by time,
not by frame index: sample k is the source frame nearest to k / 10 s, so a variable frame rate or a
gap in the stream is handled, and every sample keeps its source frame index and time (the original
picked int(k * src_fps / 10) from a nominal frame rate). Frames are RGB, downscaled so the short
side is <= 480, turned upright by the stream's display rotation. Anything unusable raises
VideoError, whose .reason is the status code the pipeline records; recoverable damage (corrupt
packets, a truncated tail, non-increasing timestamps) keeps what decoded and is listed in
Decoded.warnings.

Hard cuts (detect_cuts, split_segments): the original pipeline's rule, a Pearson correlation < 0.4
between the 256-bin luminance histograms of consecutive samples starts a new shot; cut-free segments
shorter than 20 samples are dropped with a reason.

Writing (write_video): H.264 through PyAV, with optional variable frame rate and display rotation
(the tests build their inputs with it, synth.py its rendered demo videos).

Commands (pipeline.py owns the CLI):
  python pipeline.py --render-demo /tmp/vids --num-videos 4       # rendered videos + sidecars
  python pipeline.py --manifest /tmp/vids/manifest.jsonl --out /tmp/clips   # decode -> ... -> clips
  python bench/pipeline.py                                         # decode / cut throughput
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------------------------------
# 1. Decoding


class VideoError(Exception):
    """A video that cannot be used; .reason is the status code recorded for it (e.g. EMPTY_FILE,
    OPEN_FAILED)."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Decoded:
    frames: list                   # T RGB uint8 (H, W, 3), upright (rotation applied), downscaled
    src_frame_index: np.ndarray    # (T,) int64 presentation-order index of the source frames
    src_time: np.ndarray           # (T,) float64 seconds since the first frame
    src_fps: float                 # the stream's average frame rate (0.0 if unknown)
    width: int                     # of `frames`
    height: int
    rotation: int = 0              # degrees counter-clockwise applied to the stored pixels
    warnings: list = field(default_factory=list)


def _import_av():
    try:
        import av
    except ImportError as e:
        raise ImportError("decoding needs PyAV: pip install av (the 'pipeline' extra)") from e
    if not hasattr(av.VideoFrame, "rotation"):  # else every frame, so every video, would fail
        raise ImportError(f"PyAV {av.__version__} is too old: VideoFrame.rotation needs PyAV >= 14 "
                          "(pip install -U 'av>=14')")
    return av


def _frames(av, container, stream, problems):
    """Decoded frames in presentation order. A packet that fails to decode is skipped and a demuxing
    failure (truncated file) ends the stream after flushing the decoder; both are appended to
    `problems`, never raised."""
    flushed = False
    try:
        for packet in container.demux(stream):
            try:
                yield from packet.decode()
                flushed = packet.size == 0  # the final empty packet flushes the decoder
            except av.error.FFmpegError as e:
                problems.append(type(e).__name__)
    except av.error.FFmpegError as e:
        problems.append(f"demux:{type(e).__name__}")
    if not flushed:  # frames still inside a (frame-threaded) decoder after an error
        try:
            yield from stream.codec_context.decode(None)
        except av.error.FFmpegError:
            pass


def decode_video(path, fps=10.0, max_short_side=480, max_seconds=120.0):
    """Decode `path` once, front to back, keeping for each time k/fps the source frame nearest in
    time (ties: the earlier), so variable frame rates and gaps are handled (a gap repeats the frame
    shown). Raises VideoError."""
    av = _import_av()
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise VideoError("EMPTY_FILE")
    except OSError as e:
        raise VideoError("UNREADABLE", str(e)) from None
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except Exception as e:  # PyAV raises many FFmpegError subclasses (InvalidData, EOF, ...)
        raise VideoError("OPEN_FAILED", f"{type(e).__name__}: {e}") from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            raise VideoError("NO_VIDEO_STREAM", f"streams: {kinds}")
        stream = container.streams.video[0]
        # no frame threading: a frame-threaded decoder loses its buffered frames at a corrupt packet
        w, h = stream.codec_context.width, stream.codec_context.height
        if not w or not h or w * h > 8192 * 8192:
            raise VideoError("BAD_DIMENSIONS", f"{w}x{h}")
        rate = stream.average_rate or stream.guessed_rate
        src_fps = float(rate) if rate else 0.0
        scale = min(1.0, max_short_side / min(w, h))
        ow, oh = max(2, int(round(w * scale / 2)) * 2), max(2, int(round(h * scale / 2)) * 2)
        out, idx, times, warnings = [], [], [], []
        # source index -> array: a frame picked for several samples (a VFR gap) is converted once
        converted = {}

        def emit(item):
            i, t, frame = item
            if i not in converted:
                converted.clear()
                arr = frame.to_ndarray(format="rgb24", width=ow, height=oh)
                # degrees counter-clockwise, ffmpeg's convention
                rot = int(round((frame.rotation or 0) / 90.0)) % 4
                converted[i] = np.ascontiguousarray(np.rot90(arr, rot)) if rot else arr
            out.append(converted[i])
            idx.append(i)
            times.append(t)

        k, prev, t0, n_bad, n_back, problems = 0, None, None, 0, 0, []
        try:
            for i, frame in enumerate(_frames(av, container, stream, problems)):
                if frame.is_corrupt:
                    n_bad += 1
                    continue
                t = frame.time if frame.time is not None else (i / src_fps if src_fps else None)
                if t is None:
                    raise VideoError("NO_TIMESTAMPS")
                t0 = t if t0 is None else t0
                t -= t0
                if prev is not None and t <= prev[1]:  # non-increasing (broken muxing): drop it
                    n_back += 1
                    continue
                if t > max_seconds:
                    warnings.append(f"TRUNCATED_AT:{max_seconds:g}s")
                    break
                cur = (i, t, frame)
                while k / fps <= t + 1e-9:  # sample time k/fps reached: the nearer of prev and cur
                    target = k / fps
                    emit(prev if prev is not None and target - prev[1] <= t - target else cur)
                    k += 1
                prev = cur
        except VideoError:
            raise
        except Exception as e:  # a decode error mid-stream (truncated, corrupt): keep what decoded
            if not out:
                raise VideoError("DECODE_ERROR", f"{type(e).__name__}: {e}") from None
            warnings.append(f"DECODE_ERROR_PARTIAL:{type(e).__name__}")
        if problems:
            if not out:
                raise VideoError("DECODE_ERROR", ";".join(sorted(set(problems)))[:200])
            warnings.append(f"BAD_PACKETS:{len(problems)}")
        if n_bad:
            warnings.append(f"CORRUPT_FRAMES:{n_bad}")
        if n_back:
            warnings.append(f"NON_INCREASING_PTS:{n_back}")
        if not out:
            raise VideoError("NO_FRAMES")
    H, W = out[0].shape[:2]
    rotation = 90 * int(round((prev[2].rotation or 0) / 90.0)) % 360
    return Decoded(out, np.asarray(idx, np.int64), np.asarray(times, np.float64), src_fps, W, H,
                   rotation, warnings)


# --------------------------------------------------------------------------------------------------
# 2. Hard cuts and segments


def gray_histograms(frames):
    """(T,) RGB frames -> (T, 256) L2-normalised luminance histograms (BT.601 weights on RGB; the
    original fed RGB to a BGR conversion, swapping the red and blue weights)."""
    out = np.empty((len(frames), 256), np.float64)
    for t, f in enumerate(frames):
        y = (f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114).astype(np.uint8)
        out[t] = np.bincount(y.ravel(), minlength=256)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def hist_correlation(h1, h2):
    """Pearson correlation over bins (OpenCV HISTCMP_CORREL); two flat histograms count as equal
    (1) or not (0)."""
    a, b = h1 - h1.mean(-1, keepdims=True), h2 - h2.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    same = np.all(np.isclose(h1, h2), -1)
    return np.where(den > 1e-12, (a * b).sum(-1) / np.maximum(den, 1e-12), same.astype(np.float64))


def detect_cuts(hists, threshold=0.4):
    """Indices i (first sample of a new shot) where corr(hist[i-1], hist[i]) < threshold."""
    if len(hists) < 2:
        return []
    corr = hist_correlation(hists[:-1], hists[1:])
    return [int(i) + 1 for i in np.nonzero(corr < threshold)[0]]


def split_segments(T, cuts, min_len=20):
    """Cut-free [start, end) ranges of 0..T-1 -> (kept, dropped as (start, end, reason))."""
    bounds = [0] + sorted(c for c in cuts if 0 < c < T) + [T]
    kept, dropped = [], []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e - s >= min_len:
            kept.append((s, e))
        else:
            dropped.append((s, e, f"SHORT_SEGMENT:{e - s}"))
    return kept, dropped


# --------------------------------------------------------------------------------------------------
# 3. Writing


def write_video(path, frames, fps=30.0, codec="libx264", times=None, rotation=0):
    """Encode RGB frames (list of (H, W, 3) uint8, even sizes) with PyAV; `times` (seconds,
    increasing) gives a variable frame rate; `rotation` stores a display rotation (degrees
    counter-clockwise)."""
    av = _import_av()
    from fractions import Fraction
    tb = Fraction(1, 1000)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = "yuv420p"
        s.codec_context.time_base = tb
        if rotation:
            if not hasattr(s, "set_display_rotation"):
                raise RuntimeError("writing a display rotation needs a newer PyAV than "
                                   f"{av.__version__} (Stream.set_display_rotation)")
            s.set_display_rotation(rotation)
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            t = times[i] if times is not None else i / fps
            vf.pts, vf.time_base = int(round(t * 1000)), tb
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
