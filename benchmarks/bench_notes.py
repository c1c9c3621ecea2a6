"""What one long note costs: reading (hash + binary check + cap) and chunking, by size and shape.

Chunking must be linear in the note's length: each doubling of the size should double the time.
Three shapes: prose on 80-character lines, the same prose on one line (a 50 MB one-line .txt
had not finished chunking after 15 minutes before this was fixed), and one whitespace-free run of
random letters (CLIP's BPE is quadratic in a word's length). The tokenizer is open_clip's
SimpleTokenizer, the one every CLIP model here (the tests' tiny model included) counts with.
Optionally also embeds the chunks of a 1 MB note with a random-weight text tower, the cost that
a note's cap (--max-note-bytes) bounds.

    python benchmarks/bench_notes.py                      # chunking, 0.25 .. 8 MB
    python benchmarks/bench_notes.py --embed ViT-B-32     # + embedding a 1 MB note (slow on CPU)
"""

from __future__ import annotations

import argparse
import io
import random
import string
import time

from common import machine

from mmsearch.loaders.text import chunk_note, read_note

MAX_TOKENS = 75  # a 77-token context minus start and end


def prose(n_bytes: int, line: int | None, seed: int = 0) -> str:
    """Words drawn from CLIP's vocabulary (whole-word tokens, most frequent first, Zipf-like
    weights), so tokens per byte are close to English text's."""
    from open_clip.tokenizer import SimpleTokenizer

    rng = random.Random(seed)
    words = [
        t[:-4]
        for t in SimpleTokenizer().encoder
        if t.endswith("</w>") and t[:-4].isascii() and t[:-4].isalpha()
    ][:20000]
    weights = [1 / (i + 10) for i in range(len(words))]
    vocab = rng.choices(words, weights, k=200_000)
    out, size, col = [], 0, 0
    while size < n_bytes:
        w = vocab[len(out) // 2 % len(vocab)]
        sep = "\n" if line and col + len(w) > line else " "
        col = 0 if sep == "\n" else col + len(w) + 1
        out += [w, sep]
        size += len(w) + 1
    return "".join(out)[:n_bytes]


def letters(n_bytes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n_bytes))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.25,0.5,1,2,4,8", help="note sizes in MB")
    ap.add_argument(
        "--embed", metavar="ARCH", help="also embed a 1 MB note's chunks (random weights)"
    )
    args = ap.parse_args()
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()

    def count(s: str) -> int:  # what ClipTextTower.count_tokens does
        return len(tok.encode(s))

    print(machine())
    print(f"{'shape':<22}{'MB':>6}{'read s':>9}{'chunk s':>9}{'s/MB':>8}{'chunks':>9}")
    for shape in ("prose, 80-char lines", "prose, one line", "one run of letters"):
        prev = None
        for mb in (float(x) for x in args.sizes.split(",")):
            n = int(mb * 1e6)
            if shape == "one run of letters":
                text = letters(n)
            else:
                text = prose(n, 80 if shape == "prose, 80-char lines" else None)
            data = text.encode()
            t0 = time.perf_counter()
            note = read_note(io.BytesIO(data), max_bytes=None)
            t_read = time.perf_counter() - t0
            chunks = chunk_note(note.text, count, MAX_TOKENS)
            t_chunk = time.perf_counter() - t0 - t_read
            growth = f"  x{t_chunk / prev:.2f} for x2" if prev else ""
            print(
                f"{shape:<22}{mb:>6g}{t_read:>9.3f}{t_chunk:>9.3f}{t_chunk / mb:>8.2f}"
                f"{len(chunks):>9}{growth}"
            )
            prev = t_chunk
    if args.embed:
        embed_one_mb(args.embed, count)


def embed_one_mb(arch: str, count) -> None:
    from common import random_model_dir

    from mmsearch.config import EncoderOptions, ModelSpec
    from mmsearch.encoders import create_encoder

    enc = create_encoder(
        ModelSpec.parse(str(random_model_dir(arch))), EncoderOptions(device="cpu", precision="fp32")
    )
    chunks = chunk_note(prose(1_000_000, 80), count, MAX_TOKENS)
    sample = [c.text for c in chunks[:256]]
    enc.text.embed(sample[:32], 32)  # warm
    t, _ = timed(lambda: enc.text.embed(sample, 32))
    rate = len(sample) / t
    print(
        f"{arch} text tower (random weights, fp32, CPU): {rate:.0f} chunks/s; a 1 MB note is "
        f"{len(chunks)} chunks, ~{len(chunks) / rate:.0f} s to embed"
    )


if __name__ == "__main__":
    main()
