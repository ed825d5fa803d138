"""Carry a finished run directory through a text log (remote SuperLinks have no shared disk).

The ServerApp on a remote SuperLink prints its result files as one base64 zip between two
marker lines; ``fedsim run`` on the submitting machine reads the run's log and unpacks them
into its local run directory. Only plain result files travel (no checkpoints, no client
state, no logs), and unpacking accepts nothing but plain relative names.

Example:
    >>> import tempfile, pathlib
    >>> src, dst = pathlib.Path(tempfile.mkdtemp()), pathlib.Path(tempfile.mkdtemp())
    >>> _ = (src / "summary.json").write_text("{}")
    >>> unpack(f"log line\\n{pack(src)}\\nmore", dst)
    ['summary.json']
"""

from __future__ import annotations

import base64
import binascii
import io
import zipfile
from pathlib import Path, PurePosixPath

BEGIN, END = "FEDSIM-RESULTS-BEGIN", "FEDSIM-RESULTS-END"
FILES = ("config.yaml", "partition.json", "metrics.jsonl", "metrics.csv", "summary.json", "model.safetensors")
MAX_BYTES = 256 << 20


def pack(run_dir: Path) -> str:
    """The result files of ``run_dir`` (and its plots) as marker-delimited base64 text."""
    run_dir = Path(run_dir)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in FILES:
            if (run_dir / name).is_file():
                zf.write(run_dir / name, name)
        for png in sorted((run_dir / "plots").glob("*.png")):
            zf.write(png, f"plots/{png.name}")
    text = base64.b64encode(buf.getvalue()).decode()
    lines = [text[i:i + 76] for i in range(0, len(text), 76)]
    return "\n".join([BEGIN, *lines, END])


def unpack(log_text: str, out_dir: Path) -> list[str]:
    """Extract the last packed bundle in ``log_text`` into ``out_dir``; returns the names written."""
    start, end = log_text.rfind(BEGIN), log_text.rfind(END)
    if start < 0 or end < start:
        return []
    payload = "".join(line.strip() for line in log_text[start + len(BEGIN):end].splitlines())
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"result bundle is not valid base64: {exc}") from None
    if len(data) > MAX_BYTES:
        raise ValueError(f"result bundle is {len(data)} bytes, more than {MAX_BYTES}")
    try:
        return _extract(data, out_dir)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"result bundle is not a valid zip: {exc}") from None


def _extract(data: bytes, out_dir: Path) -> list[str]:
    written = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        if sum(info.file_size for info in zf.infolist()) > MAX_BYTES:
            raise ValueError(f"result bundle expands to more than {MAX_BYTES} bytes")
        for info in zf.infolist():
            name = PurePosixPath(info.filename)
            if name.is_absolute() or ".." in name.parts or str(name) not in _allowed(name):
                raise ValueError(f"unexpected file in result bundle: {info.filename!r}")
            target = Path(out_dir, *name.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))
            written.append(str(name))
    return written


def _allowed(name: PurePosixPath) -> set[str]:
    ok = set(FILES)
    if len(name.parts) == 2 and name.parts[0] == "plots" and name.suffix == ".png":
        ok.add(str(name))
    return ok
