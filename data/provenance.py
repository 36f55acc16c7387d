"""Whether a plan still describes its data: the identity of every file its fingerprint measured, and the
check the pre-flight runs at each training start against the files there now. Cheap for .nii.gz files."""
import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

CHUNK = 1 << 20


def file_identity(path):
    """{"bytes": size, "crc32": 8 hex digits} of a file. For a .gz file the CRC-32 of its uncompressed content,
    read from the gzip trailer (8 bytes: nothing else is read); for any other file the CRC-32 of its bytes.
    Unlike a modification time, it stays the same when a file is rewritten with the same content."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if path.endswith(".gz") and size >= 18:  # the smallest gzip stream: 10-byte header, 8-byte trailer
            f.seek(-8, os.SEEK_END)
            crc = struct.unpack("<I", f.read(4))[0]
        else:
            crc = 0
            while chunk := f.read(CHUNK):
                crc = zlib.crc32(chunk, crc)
    return {"bytes": size, "crc32": f"{crc:08x}"}


def sha256_of(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _changed_files(data_dir, cases):
    """(file, reason) for each file of the fingerprint's `cases` that is gone or differs now."""
    changed = []
    for case in cases:
        for name, identity in case["files"].items():
            path = data_dir / name
            if not path.is_file():
                changed.append((name, "gone"))
            elif file_identity(path) != identity:
                changed.append((name, "content changed"))
    return changed


def stale_plan(d, lists):
    """One line saying how the data set differs from the fingerprint the plan in the data section `d` was made
    from (data.fingerprint), or None when it does not (or no fingerprint is named). `lists` are the data lists
    in use; a labelled training or validation case the fingerprint never measured counts as a change."""
    if not d["fingerprint"]:
        return None
    data_dir = Path(d["data_dir"]).expanduser().resolve()
    path = data_dir / d["fingerprint"]
    again = f"run `python main.py plan {data_dir}` again"
    if not path.is_file():
        return f"data.fingerprint {path} not found, so the plan cannot be checked against the data; {again}"
    if d["fingerprint_sha256"] and sha256_of(path) != d["fingerprint_sha256"]:
        return f"{path} is not the fingerprint this plan was made from (data.fingerprint_sha256 differs); {again}"
    try:
        cases = json.loads(path.read_text())["cases"]
    except (ValueError, KeyError, TypeError):
        return f"{path} is not a readable fingerprint; {again}"
    changed = _changed_files(data_dir, cases)
    measured = {str((data_dir / c["image"]).resolve()) for c in cases}
    new = [e["image"] for split in ("training", "validation") for e in lists[split] if e["image"] not in measured]
    if not changed and not new:
        return None
    parts = [f"{len(changed)} of its files changed (e.g. {changed[0][0]}: {changed[0][1]})"] if changed else []
    parts += [f"{len(new)} listed case(s) are not in it (e.g. {new[0]})"] if new else []
    return f"the plan is older than its data: since {path} was made, {' and '.join(parts)}; {again}"
