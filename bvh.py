"""
BVH files of any common rig: parsing, the joints that give the 17 Human3.6M points, and the unit.
mocap.load_bvh turns the result into a Motion (rotations, up axis, the frames' checks).

The joints are found by name and by their place in the tree, so one rule covers the naming families
in use: CMU conversions (cgspeed / fairmotion: LHipJoint, LeftUpLeg, LeftLeg, LeftFoot;
AnimatedDrawings' CMU files: LeftHip, LeftKnee, LeftAnkle), Mixamo (mixamorig:LeftUpLeg), the FAIR
actor rig and Rokoko (LeftUpLeg ... Spine3), PyMO's examples, SMPL (L_Hip, L_Knee, L_Ankle), 3ds Max
Biped (Bip01 L Thigh), Unreal (thigh_l, calf_l, foot_l). Each side's ankle is the joint nearest the
root named like foot / ankle, its wrist like hand / wrist (not toe, finger, thumb, end ...); the
knee and hip are the ankle's parent and grandparent (elbow and shoulder likewise; twist / roll
joints skipped), so "LeftShoulder" is a collar bone in Mixamo and a shoulder in the CMU files, as
their trees say. Any other rig takes a joint map: a JSON object {key of JOINT_MAP_KEYS: the file's
joint}, keys left out found as above.

The points: pelvis = the hips' midpoint (as Human3.6M; mocap.forward_kinematics), limb joints at
their origins, spine = the trunk joint nearest midway between pelvis and thorax, thorax = the
shoulders' midpoint on their common parent, neck/nose = the head joint, head top and toes = the
farthest ends of the head's and ankles' chains. The unit is the one of UNITS that makes a 0.6-1.15 m
hip-to-ankle length, else the legs are scaled to 0.85 m.
"""

import json
import math
import re
from pathlib import Path

import numpy as np

CMU_SCALE = 0.056444  # (1 / 0.45) * 2.54 / 100: CMU mocap units to metres
UNITS = {"m": 1.0, "cm": 0.01, "mm": 0.001, "inch": 0.0254, "cmu": CMU_SCALE}  # metres per file unit
LEG_M = (0.6, 0.85, 1.15)  # hip-to-ankle length in metres: the range that identifies a unit, and the fallback
JOINT_MAP_KEYS = ("r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "spine", "head",
                  "l_shoulder", "l_elbow", "l_wrist", "r_shoulder", "r_elbow", "r_wrist")
_NOT_A_LIMB = {"end", "nub", "site", "top", "toe", "toes", "ball", "index", "middle", "ring",
               "pinky", "thumb", "finger", "fingers", "twist", "roll"}


def parse(path):
    """-> (names, parents, offsets (J, 3), channels [names per joint], end_sites {joint: (3,)},
    frame_time, values (N, channels)). Joint names may hold spaces (3ds Max Biped); braces may
    share a line."""
    path = Path(path)
    parts = re.split(r"^\s*MOTION\s*$", path.read_text(errors="replace"), maxsplit=1, flags=re.M)
    if len(parts) != 2:
        raise ValueError(f"{path}: not a BVH file (no MOTION line)")
    toks = []
    for line in parts[0].splitlines():
        s = line.strip()
        named = re.match(r"(ROOT|JOINT)\s+([^{]*)(.*)", s)
        if named:
            toks += [named.group(1), named.group(2).strip()]
            s = named.group(3)
        toks += s.replace("{", " { ").replace("}", " } ").split()
    names, parents, offsets, channels, end_sites, stack = [], [], [], [], {}, []
    i, end_site = 0, False
    try:
        while i < len(toks):
            tok = toks[i]
            if tok in ("ROOT", "JOINT"):
                names.append(toks[i + 1])
                parents.append(stack[-1][1] if stack else -1)
                i += 2
            elif tok == "End":  # "End Site": a leaf with an offset and no channels, not a joint
                end_site, i = True, i + 2
            elif tok == "{":
                stack.append(("end" if end_site else "joint", stack[-1][1] if end_site else len(names) - 1))
                end_site, i = False, i + 1
            elif tok == "}":
                stack.pop()
                i += 1
            elif tok == "OFFSET":
                v = [float(x) for x in toks[i + 1:i + 4]]
                if stack[-1][0] == "end":
                    end_sites[stack[-1][1]] = v
                else:
                    offsets.append(v)
                i += 4
            elif tok == "CHANNELS":
                c = int(toks[i + 1])
                channels.append(toks[i + 2:i + 2 + c])
                i += 2 + c
            elif tok == "HIERARCHY":
                i += 1
            else:
                raise ValueError(f"unexpected token {tok!r}")
        head = re.match(r"\s*Frames:\s*(\d+)\s*Frame\s+Time:\s*(\S+)", parts[1])
        n_frames, frame_time = int(head.group(1)), float(head.group(2))
        values = np.array(parts[1][head.end():].split(), dtype=np.float64)
    except (ValueError, IndexError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable BVH ({type(e).__name__}: {e})") from None
    n_ch = sum(len(c) for c in channels)
    if not frame_time > 0:
        raise ValueError(f"{path}: Frame Time {frame_time} is not positive")
    if not names or len(channels) != len(names) or len(offsets) != len(names) or values.size != n_frames * n_ch:
        raise ValueError(f"{path}: {len(names)} joints with {len(channels)} CHANNELS and {len(offsets)} OFFSETs, "
                         f"{values.size} motion values for {n_frames} frames x {n_ch} channels")
    return (names, parents, np.array(offsets, np.float64), channels,
            {k: np.array(v) for k, v in end_sites.items()}, frame_time,
            values.reshape(n_frames, n_ch))


def _words(name):
    """'mixamorig:LeftUpLeg' -> ['left', 'up', 'leg']; 'LHipJoint' -> ['l', 'hip', 'joint'];
    'thigh_l' -> ..."""
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name.rsplit(":", 1)[-1])
    return re.findall(r"[a-z]+", re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", s).lower())


def _side(words):
    sides = {{"left": "l", "l": "l", "right": "r", "r": "r"}[w] for w in words if w in ("left", "l", "right", "r")}
    return sides.pop() if len(sides) == 1 else None


def _unknown_rig(path, names, problems):
    return ValueError(
        f"{path}: cannot map this BVH skeleton onto the 17 Human3.6M joints ({'; '.join(problems)}). Joints in the "
        f"file: {', '.join(names)}. Name the file's joints in a joint map, a JSON object such as "
        '{"l_hip": "...", "l_knee": "...", "l_ankle": "...", "head": "..."} with keys from '
        f"{', '.join(JOINT_MAP_KEYS)} (keys left out are found by name): mocap.load_bvh(path, joint_map=...), or "
        "`--joint-map map.json` for lifter.py train / mocap.py --inspect")


def find_joints(path, names, parents, joint_map=None):
    """{key of JOINT_MAP_KEYS: joint index}: joint_map's names first, the rest found by
    name and tree."""
    words = [_words(n) for n in names]
    depth = [0] * len(names)
    for j in range(1, len(names)):
        depth[j] = depth[parents[j]] + 1

    def find(part, side):  # the joint nearest the root named like `part` on that side
        hits = [j for j, w in enumerate(words) if part & set(w) and not _NOT_A_LIMB & set(w) and _side(w) == side]
        return min(hits, key=lambda j: depth[j]) if hits else None

    def up(j):  # the parent, past twist / roll helper joints
        p = parents[j] if j is not None and j >= 0 else -1
        while p >= 0 and {"twist", "roll"} & set(words[p]):
            p = parents[p]
        return p

    joints, problems = {}, []
    for key, name in (joint_map or {}).items():
        if key not in JOINT_MAP_KEYS:
            raise ValueError(f"{path}: joint map key {key!r} is not one of {', '.join(JOINT_MAP_KEYS)}")
        if name not in names:
            raise ValueError(f"{path}: joint map {key!r}: no joint {name!r} in the file (joints: {', '.join(names)})")
        joints[key] = names.index(name)
    for s, side in (("l", "left"), ("r", "right")):
        for end, mid, top, part in (("ankle", "knee", "hip", {"ankle", "foot"}),
                                    ("wrist", "elbow", "shoulder", {"wrist", "hand"})):
            a = joints.get(f"{s}_{end}", find(part, s))
            if a is None:
                like = f"{side.title()}{'Foot' if end == 'ankle' else 'Hand'}"
                problems.append(f"no {side} {end} (a joint named like {like})")
                continue
            joints[f"{s}_{end}"] = a
            joints.setdefault(f"{s}_{mid}", up(a))
            joints.setdefault(f"{s}_{top}", up(joints[f"{s}_{mid}"]))
            for k in (f"{s}_{mid}", f"{s}_{top}"):
                if joints[k] <= 0:
                    problems.append(f"the {side} {end} {names[a]} hangs too close to the root to have a {k[2:]}")
    if "head" not in joints:
        joints["head"] = find({"head"}, None)
        if joints["head"] is None:
            problems.append("no head (a joint named like Head)")
    if problems:
        raise _unknown_rig(path, names, problems)
    return joints


def detect_unit(path, leg, unit):
    """-> (metres per file unit, its name) from the hip-to-ankle length `leg` in file units, or
    the given unit."""
    if unit is not None:
        if isinstance(unit, str) and unit not in UNITS:
            try:
                unit = float(unit)
            except ValueError:
                raise ValueError(f"{path}: unknown unit {unit!r}: one of {', '.join(UNITS)} or metres per unit") \
                    from None
        return (UNITS[unit], unit) if isinstance(unit, str) else (float(unit), f"{float(unit):g} m")
    fits = [(abs(math.log(leg * s / LEG_M[1])), name) for name, s in UNITS.items()
            if LEG_M[0] <= leg * s <= LEG_M[2]]
    if fits:
        return UNITS[min(fits)[1]], min(fits)[1]
    return LEG_M[1] / leg, f"none of {'/'.join(UNITS)} gives a {LEG_M[0]}-{LEG_M[2]} m leg: scaled to {LEG_M[1]} m"


def nearest_axis(path, v, what):
    """A direction -> the signed coordinate axis nearest to it, e.g. (0.1, 0, -0.98)
    -> (0, 0, -1)."""
    k = int(np.argmax(np.abs(v)))
    if abs(v[k]) < 0.5 * np.linalg.norm(v):
        raise ValueError(f"{path}: cannot tell which axis is up ({what} points along {np.round(v, 2)}): pass "
                         "up='y' or 'z' (--up)")
    return np.eye(3)[k] * np.sign(v[k])


def read_joint_map(path):
    """A joint map file (JSON object {key of JOINT_MAP_KEYS: joint name of the BVH}) -> dict."""
    try:
        jm = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the joint map ({e})") from None
    if not isinstance(jm, dict) or not all(isinstance(v, str) for v in jm.values()):
        raise ValueError(f'{path}: a joint map is a JSON object of joint names, e.g. {{"l_hip": "LeftUpLeg"}}')
    if set(jm) - set(JOINT_MAP_KEYS):
        raise ValueError(f"{path}: unknown joint map keys {sorted(set(jm) - set(JOINT_MAP_KEYS))}; the keys: "
                         f"{', '.join(JOINT_MAP_KEYS)}")
    return jm


def rig_points(path, names, parents, offsets, end_sites, joint_map=None, unit=None):
    """The skeleton's Human3.6M points -> dict: points [(joint, offset in its frame, file units)] of
    sites 1..18 (mocap.NUM_SITES order: the hips, knees ... wrists, toes; the pelvis is the hips'
    midpoint), joints {key: index} (JOINT_MAP_KEYS, plus the spine and chest joints chosen), scale
    (metres per file unit) and unit (its name), rest_up (pelvis -> thorax in the rest pose when that
    pose stands upright along an axis, else None)."""
    jt = find_joints(path, names, parents, joint_map)
    J = len(names)
    rest = np.zeros((J, 3))
    for j in range(1, J):
        rest[j] = rest[parents[j]] + offsets[j]
    children = [[c for c in range(J) if parents[c] == j] for j in range(J)]
    leg = np.mean([np.linalg.norm(rest[jt[s + "_knee"]] - rest[jt[s + "_hip"]])
                   + np.linalg.norm(rest[jt[s + "_ankle"]] - rest[jt[s + "_knee"]]) for s in "lr"])
    scale, unit_name = detect_unit(path, leg, unit)

    def chain_end(top, default):  # the rest point of top's subtree farthest from it: (owner joint, offset)
        best, todo = (top, default, 0.0), [top]  # a leaf: `default` in its own frame
        while todo:
            j = todo.pop()
            todo += children[j]
            for owner, off in ([(j, end_sites[j])] if j in end_sites else []) + [(j, offsets[c]) for c in children[j]]:
                if np.linalg.norm(rest[owner] + off - rest[top]) > best[2]:
                    best = (owner, off, np.linalg.norm(rest[owner] + off - rest[top]))
        return best[:2]

    def ancestors(j):
        out = [j]
        while parents[out[-1]] >= 0:
            out.append(parents[out[-1]])
        return out

    ls, rs = jt["l_shoulder"], jt["r_shoulder"]
    chest = next(a for a in ancestors(ls) if a in ancestors(rs))  # the shoulders' common parent joint
    thorax = (rest[ls] + rest[rs]) / 2 - rest[chest]
    pelvis = (rest[jt["l_hip"]] + rest[jt["r_hip"]]) / 2
    mid = (pelvis + rest[chest] + thorax) / 2
    jt["spine"] = jt.get("spine", min(ancestors(chest), key=lambda a: np.linalg.norm(rest[a] - mid)))
    jt["chest"] = chest
    head_up = rest[jt["head"]] - pelvis
    head_up *= 0.1 / scale / max(np.linalg.norm(head_up), 1e-12)  # a head without an end: 10 cm up the body
    zero = np.zeros(3)
    points = ([(jt[k], zero) for k in ("r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "spine")]
              + [(chest, thorax), (jt["head"], zero), chain_end(jt["head"], head_up)]
              + [(jt[k], zero) for k in ("l_shoulder", "l_elbow", "l_wrist", "r_shoulder", "r_elbow", "r_wrist")]
              + [chain_end(jt["r_ankle"], zero), chain_end(jt["l_ankle"], zero)])
    rest_up, rest_leg = rest[chest] + thorax - pelvis, (rest[jt["l_ankle"]] + rest[jt["r_ankle"]]) / 2 - pelvis
    upright = (rest_up @ rest_leg < -0.9 * np.linalg.norm(rest_up) * np.linalg.norm(rest_leg)
               and np.abs(rest_up).max() > 0.9 * np.linalg.norm(rest_up))
    return {"points": points, "joints": jt, "scale": scale, "unit": unit_name,
            "rest_up": rest_up if upright else None}


def axis_vector(path, up):
    """'y', '+z', '-y', ... -> the unit vector of that coordinate axis."""
    axis = {"x": 0, "y": 1, "z": 2}.get(str(up).lstrip("+-").lower())
    if axis is None:
        raise ValueError(f"{path}: up={up!r}: expected x, y or z, optionally signed (e.g. -z)")
    return np.eye(3)[axis] * (-1.0 if str(up).startswith("-") else 1.0)
