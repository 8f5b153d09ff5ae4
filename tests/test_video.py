# Tests of video.py: decoding real and synthetic videos (10 Hz sampling by timestamps, variable
# frame rate, display rotation), >= 10 kinds of bad input raising VideoError with the reason the
# pipeline records, histogram cuts and segments, and the cut margins of spliced videos (real ones
# and the rendered demo the pipeline tests run on). CPU only; PyAV tests skip cleanly without PyAV.
# The real-video tests read the folder named by the environment variable MIMIC_TEST_VIDEOS (CI sets
# it; the videos are third-party footage, never shipped) and skip without it.
import os
from pathlib import Path

import numpy as np
import pytest

import synth
import video


def _real_videos():
    """The folder of real test videos named by MIMIC_TEST_VIDEOS; the test skips
    when it is unset."""
    pytest.importorskip("av")
    folder = os.environ.get("MIMIC_TEST_VIDEOS", "")
    if not folder:
        pytest.skip("MIMIC_TEST_VIDEOS is not set (a folder holding stgcn_tai_chi.mp4, ...)")
    if not Path(folder).is_dir():
        pytest.fail(f"MIMIC_TEST_VIDEOS={folder} is not a folder")
    return Path(folder)


def _noise_frames(n, h=48, w=64, seed=0, level=None):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = np.full((h, w, 3), (40 + 5 * i) % 200 if level is None else level, np.uint8)
        out.append(base + rng.integers(0, 30, (h, w, 3), dtype=np.uint8))
    return out


def _consecutive_correlations(frames):
    h = video.gray_histograms(frames)
    return video.hist_correlation(h[:-1], h[1:])  # (T - 1,): entry i compares samples i and i + 1


# --------------------------------------------------------------------------------------------------
# 1. decoding


def test_decode_real_videos_sampling():
    vids = _real_videos()
    d = video.decode_video(vids / "stgcn_tai_chi.mp4")
    # 300 frames at 30000/1001 fps, 10.0 s: samples at k/10 s pick the nearest frame,
    # round(k * 2.997)
    assert len(d.frames) == 100 and (d.width, d.height) == (340, 256) and d.rotation == 0
    k = np.arange(100)
    np.testing.assert_array_equal(d.src_frame_index, np.round(k * 30000 / 1001 / 10).astype(int))
    np.testing.assert_allclose(d.src_time, d.src_frame_index * 1001 / 30000, atol=1e-6)
    assert np.all(np.abs(d.src_time - k / 10) <= 0.5 * 1001 / 30000 + 1e-9)
    assert video.detect_cuts(video.gray_histograms(d.frames)) == []
    # portrait 1080x1920 at 12 fps, 40 frames: downscaled to short side 480, 33
    # samples (0.0 .. 3.2 s)
    b = video.decode_video(vids / "mmhuman3d_basketball_single_person_demo.mp4")
    assert (b.width, b.height) == (480, 854) and b.frames[0].shape == (854, 480, 3)
    assert len(b.frames) == 33
    np.testing.assert_array_equal(b.src_frame_index[:6], [0, 1, 2, 4, 5, 6])  # 0.1 s -> 0.0833 s (frame 1) etc.


def test_decode_variable_frame_rate_and_rotation(tmp_path):
    av = pytest.importorskip("av")
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip(f"PyAV {av.__version__} cannot write a display rotation (Stream.set_display_rotation)")
    times = [0.0, 0.033, 0.066, 0.2, 0.21, 0.4, 0.7, 0.75]
    frames = _noise_frames(len(times), h=48, w=64)
    for f in frames:
        f[:8, :16] = 255  # a white block in the top-left corner of the stored picture
    p = tmp_path / "vfr.mp4"
    video.write_video(p, frames, fps=30, times=times, rotation=90)
    d = video.decode_video(p)
    # nearest frame to each k/10 s (ties -> the earlier frame); a gap repeats the frame on screen
    t = np.array(times)
    expect = [int(np.argmin(np.abs(t - k / 10) + 1e-9 * np.arange(len(t)))) for k in range(8)]
    np.testing.assert_array_equal(d.src_frame_index, expect)
    np.testing.assert_allclose(d.src_time, t[expect], atol=1e-3)
    # display rotation 90 deg counter-clockwise: 64x48 stored -> 48x64 upright, top-left
    # block -> bottom-left
    assert d.rotation == 90 and (d.width, d.height) == (48, 64)
    img = d.frames[0].astype(int)
    assert img[-6:, :6].mean() > 200 and img[:6, :6].mean() < 150


def _fuzz_files(tmp):
    """>= 10 kinds of bad input -> (path, expected status, expected reason or None)."""
    import av
    good = tmp / "good.mp4"
    video.write_video(good, _noise_frames(30), fps=30)
    raw = good.read_bytes()
    fast = tmp / "fast.mp4"  # moov atom first: a truncated copy still opens, then the data runs out
    with av.open(str(fast), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for f in _noise_frames(30):
            for pk in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    rng = np.random.default_rng(0)
    cases = []

    def put(name, payload, status, reason):
        (tmp / name).write_bytes(payload)
        cases.append((tmp / name, status, reason))

    put("empty.mp4", b"", "SKIPPED", "EMPTY_FILE")
    put("random.mp4", rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "SKIPPED", "OPEN_FAILED")
    put("text.mp4", b"not a video\n" * 20, "SKIPPED", "OPEN_FAILED")
    put("truncated.mp4", raw[:len(raw) // 2], "SKIPPED", "OPEN_FAILED")  # moov at the end is gone
    put("header_only.mp4", raw[:200], "SKIPPED", "OPEN_FAILED")
    fb = fast.read_bytes()
    put("truncated_faststart.mp4", fb[:int(len(fb) * 0.6)], "NO_CLIPS", None)  # decodes a little, then stops
    bad = bytearray(raw)
    bad[len(raw) // 3:len(raw) // 2] = rng.integers(0, 256, len(raw) // 2 - len(raw) // 3, dtype=np.uint8).tobytes()
    put("corrupt_middle.mp4", bytes(bad), "NO_CLIPS", None)
    put("wrong_extension.avi", raw, "NO_CLIPS", None)  # a fine mp4 named .avi: decodes
    from PIL import Image
    Image.fromarray(_noise_frames(1)[0]).save(tmp / "image.mp4", format="JPEG")  # one still image
    cases.append((tmp / "image.mp4", "NO_CLIPS", None))
    with av.open(str(tmp / "audio_only.mp4"), "w") as c:
        s = c.add_stream("aac", rate=16000)
        for i in range(8):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 16000, i * 1024
            for pk in s.encode(fr):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    cases.append((tmp / "audio_only.mp4", "SKIPPED", "NO_VIDEO_STREAM"))
    with av.open(str(tmp / "zero_frames.mkv"), "w") as c:  # a container with a video track and no frame
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        c.start_encoding()
    cases.append((tmp / "zero_frames.mkv", "SKIPPED", None))
    (tmp / "folder.mp4").mkdir()
    cases.append((tmp / "folder.mp4", "SKIPPED", "OPEN_FAILED"))
    cases.append((tmp / "missing.mp4", "SKIPPED", "UNREADABLE"))
    return cases


def test_fuzz_bad_inputs_raise_with_reasons(tmp_path):
    pytest.importorskip("av")
    cases = _fuzz_files(tmp_path)
    assert len({p.name for p, _, _ in cases}) >= 10
    for path, status, reason in cases:
        if status == "SKIPPED":  # unusable: VideoError, whose reason becomes the status record's
            with pytest.raises(video.VideoError) as e:
                video.decode_video(path)
            if reason is not None:
                assert e.value.reason == reason, (path.name, str(e.value))
        else:  # damaged or odd but decodable: the frames that decoded
            d = video.decode_video(path)
            assert len(d.frames) >= 1 and len(d.src_time) == len(d.frames), path.name
    # the corrupt file keeps its decodable frames and says what was wrong
    d = video.decode_video(tmp_path / "corrupt_middle.mp4")
    assert len(d.frames) > 0 and any(w.startswith("BAD_PACKETS") for w in d.warnings)


# --------------------------------------------------------------------------------------------------
# 2. cuts and segments


def test_histogram_correlation_and_cuts_on_arrays():
    rng = np.random.default_rng(0)
    h1, h2 = rng.random(256), rng.random(256)
    assert np.isclose(video.hist_correlation(h1, h2), np.corrcoef(h1, h2)[0, 1])
    # a dark shot, then a bright one
    frames = _noise_frames(30, level=40) + _noise_frames(25, level=200, seed=1)
    hist = video.gray_histograms(frames)
    assert np.allclose(np.linalg.norm(hist, axis=1), 1)
    assert video.detect_cuts(hist) == [30]
    kept, dropped = video.split_segments(55, [30], 20)
    assert kept == [(0, 30), (30, 55)] and dropped == []
    kept, dropped = video.split_segments(55, [10, 30], 20)
    assert kept == [(10, 30), (30, 55)] and dropped == [(0, 10, "SHORT_SEGMENT:10")]


def test_cut_on_spliced_real_videos(tmp_path):
    vids = _real_videos()
    a = video.decode_video(vids / "stgcn_tai_chi.mp4").frames[:40]
    b = video.decode_video(vids / "stgcn_clean_and_jerk.mp4").frames[:30]
    p = tmp_path / "spliced.mp4"
    video.write_video(p, a + b, fps=10)
    d = video.decode_video(p)
    assert len(d.frames) == 70
    assert video.detect_cuts(video.gray_histograms(d.frames)) == [40]
    corr = _consecutive_correlations(d.frames)  # margins: measured 0.2565 at the cut, >= 0.995 elsewhere
    assert corr[39] < 0.3 and np.delete(corr, 39).min() > 0.9


# --------------------------------------------------------------------------------------------------
# 3. rendered demo videos


def test_rendered_demo_cut_has_a_clear_margin(tmp_path):
    # the pipeline tests' spliced demo video (video 1: two renders, the second dimmed): its one cut
    # must sit far under the 0.4 threshold and every other transition far above it, so small codec
    # or render changes cannot move or drop the cut (undimmed, the cut measured 0.394)
    pytest.importorskip("av")
    walk, jog = synth.render_demo_videos(tmp_path, num_videos=2)
    d = video.decode_video(jog)
    corr = _consecutive_correlations(d.frames)
    cut = int(np.argmin(corr))
    print(f"demo splice: cut at {cut + 1}, corr {corr[cut]:.4f}, others >= {np.delete(corr, cut).min():.4f}")
    # 40 + 52 samples
    assert video.detect_cuts(video.gray_histograms(d.frames)) == [cut + 1] and cut + 1 == 40
    assert corr[cut] < 0.25 and np.delete(corr, cut).min() > 0.9
    # the single-shot video: no cut
    assert _consecutive_correlations(video.decode_video(walk).frames).min() > 0.9


def test_luminance_uses_bt601_weights_on_rgb():
    # pure red / green / blue frames land in the BT.601 bins 0.299 / 0.587 / 0.114 x 255 (feeding
    # RGB to a BGR conversion swaps red and blue)
    red, green, blue = (np.zeros((8, 8, 3), np.uint8) for _ in range(3))
    red[..., 0], green[..., 1], blue[..., 2] = 255, 255, 255
    hist = video.gray_histograms([red, green, blue])
    assert hist.argmax(1).tolist() == [76, 149, 29] and np.allclose(hist.max(1), 1)
    # so red next to a grey of red's luminance is one shot, blue next to a grey of blue's too, and
    # between the two pairs is a cut
    grey76 = np.full((8, 8, 3), (76, 77, 76), np.uint8)
    grey29 = np.full((8, 8, 3), (29, 30, 29), np.uint8)
    assert video.detect_cuts(video.gray_histograms([red, grey76, blue, grey29])) == [2]


def test_segments_of_exactly_min_len_are_kept():
    kept, dropped = video.split_segments(59, [20, 39], 20)
    assert kept == [(0, 20), (39, 59)] and dropped == [(20, 39, "SHORT_SEGMENT:19")]
    assert video.split_segments(20, [], 20) == ([(0, 20)], [])
    assert video.split_segments(19, [], 20) == ([], [(0, 19, "SHORT_SEGMENT:19")])
