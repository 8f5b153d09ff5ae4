"""
Jobs and shards of a data-pipeline run (pipeline.py stage 9): which videos (a folder or a JSONL
manifest, as jobs sorted by a filesystem-safe video id), which shard each belongs to (a stable hash
of its id, so any scheduler can run shards K = 0..N-1 into one output folder), and the shard's
status file (one JSON record per video, safe against a run killed mid-line) and leftovers.

No commands of its own: `python pipeline.py --videos DIR --shard K/N --resume` uses it.
"""

import collections
import hashlib
import json
import re
from pathlib import Path

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")


def safe_id(text):
    """A filesystem-safe id (data.py clip id rules): path separators become '__', other odd
    characters '_'."""
    s = re.sub(r"[^A-Za-z0-9_.\-]", "_", str(text).replace("/", "__").replace("\\", "__"))
    return ("v" + s if not re.match(r"[A-Za-z0-9_\-]", s) else s)[:200]


def list_videos(videos_dir=None, manifest=None):
    """Jobs sorted by video id. From a folder: every file with a video extension below it; the video
    id is its relative path without extension (made safe), its action class the name of its folder
    (Kinetics layout <class>/<id>.mp4; "" at the top level). From a manifest (JSONL): {"video": path
    relative to the manifest, "video_id"?, "action_class"?, "description"?} per line."""
    jobs = []
    if manifest:
        base = Path(manifest).parent
        with open(manifest, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    path = base / row["video"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{manifest}:{n}: bad manifest line ({e}); "
                                     "need {\"video\": path, ...}") from None
                vid = row.get("video_id") or Path(row["video"]).with_suffix("").as_posix()
                jobs.append({"video": str(path), "video_id": safe_id(vid),
                             "action_class": str(row.get("action_class", "")),
                             "description": str(row.get("description", ""))})
    if videos_dir:
        root = Path(videos_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"--videos {root}: not a folder")
        for p in sorted(root.rglob("*")):
            # a broken link or a link loop is listed too, so it gets a SKIPPED record with its
            # reason (UNREADABLE) instead of vanishing from the counts
            if p.suffix.lower() in VIDEO_EXTS and (p.is_file() or p.is_symlink()):
                rel = p.relative_to(root)
                jobs.append({"video": str(p), "video_id": safe_id(rel.with_suffix("").as_posix()),
                             "action_class": rel.parent.name if len(rel.parts) > 1 else "",
                             "description": ""})
    dup = sorted(i for i, n in collections.Counter(j["video_id"] for j in jobs).items() if n > 1)
    if dup:
        raise ValueError(f"duplicate video ids: {dup[:5]}")
    return sorted(jobs, key=lambda j: j["video_id"])


def shard_of(video_id, num_shards):
    """Stable shard of a video: md5 of its id, so shards do not depend on listing order or on
    other videos."""
    return int(hashlib.md5(video_id.encode("utf-8")).hexdigest()[:8], 16) % num_shards


def parse_shard(text):
    """'K/N' (0 <= K < N) -> (K, N)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--shard must be K/N with 0 <= K < N, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def read_records(path):
    """The complete records of a status file, one per video: a video done again (--resume
    after a VLM outage, --retry-failed) keeps its latest record; a torn last line from a
    killed run is ignored."""
    out = {}
    if Path(path).is_file():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.endswith("\n"):
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    out.pop(rec.get("video_id"), None)  # re-inserted: ordered by latest write
                    out[rec.get("video_id")] = rec
    return list(out.values())


def open_status(path, resume):
    """Open the shard's status file for appending; a torn last line is cut off first; without
    resume, truncate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if resume and path.is_file():
        raw = path.read_bytes()
        cut = raw.rfind(b"\n") + 1
        if cut != len(raw):
            with open(path, "r+b") as fh:
                fh.truncate(cut)
        return open(path, "a", encoding="utf-8")
    return open(path, "w", encoding="utf-8")


def remove_stale_tmp(clips_root, shard, num_shards):
    """Temp files of clips of this shard left by a killed run (data.write_clip:
    .<clip_id>.safetensors.*.tmp)."""
    n = 0
    for p in Path(clips_root).glob("clips/*/.*.tmp"):
        clip_id = p.name[1:].split(".safetensors.")[0]
        vid = clip_id.rsplit("-", 1)[0]
        if shard_of(vid, num_shards) == shard:
            p.unlink(missing_ok=True)
            n += 1
    return n
