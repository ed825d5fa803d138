"""Result bundles carried through a remote ServerApp's log: round trip and hostile input."""

from __future__ import annotations

import base64
import io
import zipfile

import pytest

from fedsim.results.bundle import BEGIN, END, pack, unpack


def _bundle(files: dict[str, bytes]) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return f"{BEGIN}\n{base64.b64encode(buf.getvalue()).decode()}\n{END}"


def test_round_trip_with_plots(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "plots").mkdir(parents=True)
    (src / "summary.json").write_text('{"final_accuracy": 0.5}')
    (src / "plots" / "accuracy.png").write_bytes(b"\x89PNG fake")
    (src / "client_state").mkdir()
    (src / "client_state" / "node-1.pb").write_bytes(b"private")          # never travels
    text = "INFO noise\n" + pack(src) + "\nINFO more noise\n"
    assert sorted(unpack(text, dst)) == ["plots/accuracy.png", "summary.json"]
    assert (dst / "summary.json").read_text() == '{"final_accuracy": 0.5}'
    assert not (dst / "client_state").exists()


@pytest.mark.parametrize("name", ["../evil.json", "/etc/passwd", "client_state/node-1.pb", "plots/../../x.png",
                                  "notes.txt"])
def test_rejects_unexpected_names(tmp_path, name):
    with pytest.raises(ValueError, match="unexpected file"):
        unpack(_bundle({name: b"x"}), tmp_path)
    assert not any(tmp_path.iterdir())


def test_rejects_garbage_and_ignores_logs_without_bundle(tmp_path):
    assert unpack("no results here", tmp_path) == []
    with pytest.raises(ValueError, match="base64"):
        unpack(f"{BEGIN}\n!!!not base64!!!\n{END}", tmp_path)
    with pytest.raises(ValueError, match="zip"):
        unpack(f"{BEGIN}\n{base64.b64encode(b'plain bytes').decode()}\n{END}", tmp_path)
