"""Captions a user already has for a file in a folder, by source:

- sidecar: the same-stem `.txt` beside it (`a.jpg` + `a.txt`), the whole text one caption;
- xmp: descriptions, titles, headlines and keywords embedded in the photo, from its XMP packet
  (found in the file's bytes, as every format carries it: JPEG APP1, PNG iTXt, TIFF, WebP...)
  and its IPTC IIM record (caption/abstract, headline, object name, keywords; through Pillow's
  `IptcImagePlugin.getiptcinfo`). Keywords become one caption, comma-separated;
- folders: the name of the folder it is in ("Beach_2019" -> "beach 2019"); none at the root.

Each source gives a list of captions; `read_pairs` pairs the file with every distinct one.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

SOURCES = ("sidecar", "xmp", "folders")
MAX_SCAN_BYTES = 64 << 20  # an XMP packet is looked for in the first 64 MiB of a file
_RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
_TEXT_FIELDS = (
    "{http://purl.org/dc/elements/1.1/}description",
    "{http://purl.org/dc/elements/1.1/}title",
    "{http://ns.adobe.com/photoshop/1.0/}Headline",
)
_KEYWORDS = "{http://purl.org/dc/elements/1.1/}subject"
# IPTC IIM application record (2, n): caption/abstract, headline, object name; keywords
_IPTC_TEXT = ((2, 120), (2, 105), (2, 5))
_IPTC_KEYWORDS = (2, 25)


def parse_sources(text: str) -> tuple[str, ...]:
    """'sidecar,xmp' -> ("sidecar", "xmp"); ValueError naming the unknown ones."""
    names = tuple(dict.fromkeys(s.strip().lower() for s in text.split(",") if s.strip()))
    unknown = [n for n in names if n not in SOURCES]
    if unknown or not names:
        raise ValueError(
            f"unknown caption source {', '.join(unknown) or repr(text)}; use any of "
            f"{', '.join(SOURCES)}"
        )
    return names


def folder_captions(path: Path, root: Path) -> list[str]:
    parent = path.parent
    if parent == root:
        return []
    name = re.sub(r"[_\s]+", " ", parent.name.replace("-", " ")).strip().lower()
    return [name] if name else []


def embedded_captions(path: Path) -> list[str]:
    """Descriptions, titles and keywords from the file's XMP packet and IPTC record."""
    return _dedupe(xmp_captions(path) + iptc_captions(path))


def xmp_captions(path: Path) -> list[str]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SCAN_BYTES)
    except OSError:
        return []
    start = data.find(b"<x:xmpmeta")
    end = data.find(b"</x:xmpmeta>", start)
    if start < 0 or end < 0:
        return []
    try:
        root = ET.fromstring(data[start : end + len(b"</x:xmpmeta>")])
    except ET.ParseError:
        return []
    out = []
    for desc in root.iter(f"{_RDF}Description"):
        for tag in _TEXT_FIELDS:
            if tag in desc.attrib:  # the short form: an attribute
                out.append(desc.attrib[tag])
            for el in desc.findall(tag):
                out += _values(el)
        keywords = [k for el in desc.findall(_KEYWORDS) for k in _values(el)]
        if keywords:
            out.append(", ".join(keywords))
    return _dedupe(out)


def _values(el) -> list[str]:
    """The rdf:li items of an Alt/Bag/Seq (x-default first), or the element's own text."""
    items = list(el.iter(f"{_RDF}li"))
    if not items:
        return [el.text or ""]
    items.sort(key=lambda li: li.get("{http://www.w3.org/XML/1998/namespace}lang") != "x-default")
    return [li.text or "" for li in items]


def iptc_captions(path: Path) -> list[str]:
    from PIL import Image, IptcImagePlugin

    try:
        with Image.open(path) as im:
            info = IptcImagePlugin.getiptcinfo(im) or {}
    except Exception:  # noqa: BLE001 - not an image Pillow reads, or a damaged record
        return []
    out = []
    for key in _IPTC_TEXT:
        out += [_text(v) for v in _list(info.get(key))]
    keywords = [_text(v) for v in _list(info.get(_IPTC_KEYWORDS))]
    if keywords:
        out.append(", ".join(keywords))
    return _dedupe(out)


def _list(v) -> list:
    return [] if v is None else v if isinstance(v, list) else [v]


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _dedupe(captions) -> list[str]:
    seen, out = set(), []
    for c in captions:
        text = re.sub(r"\s+", " ", c).strip()
        if text and text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
    return out
