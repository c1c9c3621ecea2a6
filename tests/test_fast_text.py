"""The numpy text tower against open_clip: same tokens, same embeddings, no torch on the query path."""

from __future__ import annotations

import io
import json
import math
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from mmsearch.config import EncoderOptions, ModelSpec  # noqa: E402
from mmsearch.encoders import query_text  # noqa: E402
from mmsearch.encoders.clip import load_clip, save_model_dir  # noqa: E402
from mmsearch.encoders.query_text import FastTextTower, export_fast_text, numpy_ops  # noqa: E402
from mmsearch.encoders.query_text import tokenizer as clip_bpe  # noqa: E402
from mmsearch.errors import ModelError  # noqa: E402

VISION = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8}
TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}

CAPTIONS = [
    "a photo of a dog",
    "A dog running on the beach at sunset",
    "two cats sleeping on a red sofa",
    "an aerial view of New York City at night",
    "a bowl of ramen with a soft-boiled egg",
    "children playing football in the park",
    "a black and white portrait of an old man",
    "the Eiffel Tower under a cloudy sky",
    "a close-up of a bee on a yellow flower",
    "snow-covered mountains reflected in a lake",
    "a red double-decker bus in London",
    "a cup of coffee next to a laptop",
    "fireworks over the harbour",
    "a person riding a bicycle through the rain",
    "a plate of sushi, chopsticks and soy sauce",
    "a golden retriever puppy playing with a ball",
    "street market in Marrakech, spices and lanterns",
    "surfer riding a huge wave",
    "a cozy living room with a fireplace",
    "the milky way over the desert",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "tHe QuIcK bRoWn FoX",
    "a dog's toy and the cat's bowl",
    "I'm sure they've said we'll go, you'd agree, it's fine, don't worry",
    "IT'S ALL CAPS WE'RE YELLING",
    "rock'n'roll o'clock y'all ma'am",
    "sunset",
    "dog",
    "a",
    "!",
    "?",
    ".",
    "",
    " ",
    "\t\n\r",
    "   leading and trailing spaces   ",
    "multiple     spaces\t\ttabs\n\nnewlines",
    "line one\r\nline two\rline three",
]

PUNCTUATION = [
    "hello, world!",
    "wait... what?!",
    "!!!",
    "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
    "?!?!?!",
    "!a!b!c!",
    "!~",
    "wow!« really!} yes!|",
    "(parentheses) [brackets] {braces} <angles>",
    "email: someone@example.com, url: https://example.org/path?q=1&x=2#frag",
    "C:\\Windows\\System32\\drivers\\etc\\hosts",
    "snake_case_name and kebab-case-name and camelCaseName",
    "#hashtag @mention $money 100% ^caret *star ~tilde `backtick`",
    "a--b---c----d",
    "'quoted' \"double quoted\" `back`",
    "semi;colon:colon,comma.period",
    "1+1=2, 3*4=12, 10/5=2, 2^10=1024",
    "<start_of_text>",
    "<end_of_text>",
    "a <end_of_text> b",
    "<<start_of_text>>",
    "x<start_of_text>y",
    "<START_OF_TEXT> upper special",
    "&",
    "&&&&",
    "&amp;",
    "&amp;amp;",
    "&amp;amp;amp;lt;",
    "fish &amp; chips",
    "&lt;b&gt;bold&lt;/b&gt;",
    "<b>bold</b> &amp; <i>italic</i>",
    "&#39;single&#39; &#x27;hex&#x27; &quot;double&quot;",
    "&eacute;t&eacute; &nbsp;non-breaking&nbsp; &copy; 2024 &euro;5",
    "&notanentity; &amp &lt",
    "AT&T and H&M",
]

NUMBERS = [
    "0",
    "123",
    "1234567890",
    "3.14159265358979",
    "1,000,000",
    "2024-01-15 13:45:00",
    "+1 (555) 123-4567",
    "4K UHD 60fps 1080p 8-bit",
    "route 66",
    "½ ¼ ¾ ⅓",
    "x² + y³ = z¹",
    "Ⅰ Ⅱ Ⅲ Ⅻ ⅻ",
    "١٢٣ ٤٥٦ (arabic-indic digits)",
    "१२३ (devanagari digits)",
    "一二三 万 億",
    "①②③ ⑴⑵",
    "𝟙𝟚𝟛 math digits",
]

UNICODE = [
    "café naïve résumé façade coöperate",
    "Crème brûlée à la française",
    "Straße Fußgänger größer",
    "ÆØÅ æøå Œuvre œuf",
    "İstanbul ılık ŞEHİR",
    "ſ long s and 'ſ contraction",
    "K Kelvin sign and Å angstrom",
    "東京の夜景と富士山",
    "我爱北京天安门",
    "한국어 텍스트 검색",
    "ひらがな カタカナ ｶﾀｶﾅ",
    "Привет, как дела?",
    "Ελληνικά κείμενο ΑΒΓ",
    "עברית טקסט",
    "النص العربي",
    "हिन्दी पाठ",
    "ภาษาไทย",
    "Tiếng Việt có dấu",
    "ქართული ენა",
    "Ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ　１２３",
    "ﬁne ﬂour ﬀ ligatures",
    "\u201ccurly double\u201d \u2018curly single\u2019",
    "en\u2013dash em\u2014dash \u2026ellipsis",
    "non\u00a0breaking\u00a0space",
    "zero\u200bwidth\u200bspace",
    "soft\u00adhyphen",
    "combining e\u0301 a\u0300 n\u0303",
    "decomposed cafe\u0301 vs composed caf\u00e9",
    "line\u2028separator\u2029paragraph",
    "ideographic\u3000space",
    "control\x00chars\x07here\x1b[31mred\x1b[0m",
    "c1\x85controls\x9d",
    "mojibake: Ã©tÃ© donâ€™t",
    "âœ” No problems",
    "ð\x9f\x98\x80 broken emoji bytes",
    "𝐁𝐨𝐥𝐝 𝑖𝑡𝑎𝑙𝑖𝑐 math letters",
    "™ © ® ° ± × ÷ µ ¶ § ¬",
    "→ ← ↑ ↓ ⇒ ∀ ∃ ∈ ∑ ∞ ≠ ≤",
    "♠ ♣ ♥ ♦ ★ ☆ ☀ ☂ ♪",
]

EMOJI = [
    "😀",
    "😀😀😀",
    "emoji 😀🐶🏖️👍🏽",
    "family 👨‍👩‍👧‍👦 zwj",
    "flags 🇯🇵 🇺🇸 🇫🇷",
    "keycap 1️⃣ #️⃣",
    "skin tones 👋🏻👋🏿",
    "🔥🔥🔥 fire sale 🔥🔥🔥",
    "🐱‍👤 ninja cat",
    "I ❤️ NY",
]


def _long_texts() -> list[str]:
    return [
        " ".join(f"word{i} is part of a long caption that will not fit" for i in range(20)),
        "x" * 500,
        "supercalifragilisticexpialidocious " * 30,
        "a " * 75,
        "a " * 76,
        "a " * 77,
        "a b " * 60,
        "東京" * 100,
        "😀" * 100,
        ", ".join(str(i) for i in range(200)),
        "the " * 74 + "end",
        "<end_of_text> " * 90,
    ]


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    ascii_pool = [chr(c) for c in range(32, 127)] + ["\t", "\n", "\r", "\x0b", "\x0c", "\x1c"]
    ranges = [
        (0x20, 0x7E),
        (0xA0, 0x17F),
        (0x370, 0x3FF),
        (0x400, 0x4FF),
        (0x590, 0x5FF),
        (0x600, 0x6FF),
        (0x900, 0x97F),
        (0xE00, 0xE7F),
        (0x2000, 0x206F),
        (0x2150, 0x218F),
        (0x2190, 0x22FF),
        (0x3000, 0x30FF),
        (0x4E00, 0x4FFF),
        (0xAC00, 0xACFF),
        (0xFF00, 0xFFEF),
        (0x1F300, 0x1F64F),
        (0x1D400, 0x1D4FF),
        (0x300, 0x36F),
    ]
    words = ["dog", "Cat", "it's", "HELLO", "naïve", "東京", "😀", "&amp;", "<end_of_text>", "!"]
    out = []
    for i in range(n):
        kind = i % 3
        length = rng.randint(1, 40)
        if kind == 0:
            out.append("".join(rng.choice(ascii_pool) for _ in range(length)))
        elif kind == 1:
            chars = []
            for _ in range(length):
                lo, hi = rng.choice(ranges)
                chars.append(chr(rng.randint(lo, hi)))
            out.append("".join(chars))
        else:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))))
    return out


ALL_TEXTS = (
    CAPTIONS + PUNCTUATION + NUMBERS + UNICODE + EMOJI + _long_texts() + _random_texts(300, 0)
)


def _tiny_model_dir(root: Path, quick_gelu: bool = False, **text) -> Path:
    torch.manual_seed(0)
    cfg = {"embed_dim": 32, "vision_cfg": VISION, "text_cfg": {**TEXT, **text}}
    if quick_gelu:
        cfg["quick_gelu"] = True
    model = open_clip.CLIP(**cfg)
    return save_model_dir(model, cfg, root / f"model-qg{int(quick_gelu)}")


@pytest.fixture(scope="session", params=[False, True], ids=["gelu", "quick_gelu"])
def exported(request, tmp_path_factory):
    """(open_clip model, open_clip tokenizer, export dir) for a tiny model loaded like users do."""
    root = tmp_path_factory.mktemp("fast_text")
    model_dir = _tiny_model_dir(root, quick_gelu=request.param)
    enc = load_clip(ModelSpec.parse(str(model_dir)), EncoderOptions(device="cpu", precision="fp32"))
    model, tokenizer = enc.model, enc.tokenizer
    out = root / "fast"
    assert export_fast_text(model, tokenizer, out)
    return model, tokenizer, out


def _reference(model, tokenizer, texts) -> np.ndarray:
    with torch.inference_mode():
        return model.encode_text(tokenizer(list(texts)), normalize=True).numpy()


def test_export_layout(exported):
    _, _, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == query_text.FORMAT
    assert config["format_version"] == query_text.FORMAT_VERSION
    for name in config["weights"]:
        assert (out / f"{name}.npy").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temp dir left behind"


def test_embeddings_agree_with_open_clip(exported):
    model, tokenizer, out = exported
    tower = FastTextTower.load(out)
    act = model.transformer.resblocks[0].mlp.gelu
    assert tower.config["act"] == ("quick_gelu" if type(act).__name__ == "QuickGELU" else "gelu")
    texts = CAPTIONS[:12] + PUNCTUATION[:22] + UNICODE[:6] + EMOJI[:4] + _long_texts()[:4]
    ref = _reference(model, tokenizer, texts)
    got = tower.embed(texts, batch_size=8)
    assert got.shape == (len(texts), tower.dim) and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-5
    assert (got * ref).sum(axis=1).min() > 0.999
    # One query at a time, as search runs it.
    for text, row in zip(texts[:5], ref[:5], strict=True):
        assert np.abs(tower.embed([text])[0] - row).max() < 1e-5


def test_embed_batch_unnormalised_matches_encode_text(exported):
    model, tokenizer, out = exported
    tower = FastTextTower.load(out)
    texts = ["a photo of a dog", "", "a much longer caption about a cat on a mat"]
    with torch.inference_mode():
        ref = model.encode_text(tokenizer(texts)).numpy()
    assert np.abs(tower.embed_batch(texts) - ref).max() < 1e-4
    assert tower.embed_batch([]).shape == (0, tower.dim)


@pytest.mark.parametrize("path", ["numpy", "dict"])
def test_tokens_identical_to_open_clip(exported, path):
    _, tokenizer, out = exported
    tok = FastTextTower.load(out).tokenizer
    if path == "dict":
        tok.DICT_AFTER = -1  # build the merge dict at once, as after many uncached words
    mine = tok(ALL_TEXTS)
    ref = tokenizer(ALL_TEXTS).numpy()
    assert mine.shape == ref.shape == (len(ALL_TEXTS), 77)
    bad = [t for t, a, b in zip(ALL_TEXTS, mine, ref, strict=True) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} texts tokenize differently, e.g. {bad[:3]!r}"
    assert (tok.rank_of is not None) == (path == "dict")


def test_count_tokens(exported):
    _, tokenizer, out = exported
    tower = FastTextTower.load(out)
    assert tower.context_length == 77
    assert tower.count_tokens("") == 0
    assert tower.count_tokens("a dog") == 2
    for text in ALL_TEXTS[::7]:
        assert tower.count_tokens(text) == len(tokenizer.encode(text))
    long_text = "a " * 200
    assert tower.count_tokens(long_text) == 200  # not truncated


@pytest.mark.parametrize("clean", ["lower", "whitespace", "canonicalize"])
def test_plain_text_cleaning_matches_ftfy(clean):
    """Printable ASCII without '&' skips ftfy; that must not change what the cleaning returns."""
    from open_clip.tokenizer import get_clean_fn

    ref_clean = get_clean_fn(clean)
    tok = query_text.ClipBpeTokenizer(
        np.zeros(1, np.int64), np.zeros(1, np.int64), {}, 77, clean, 49406, 49407
    )
    rng = random.Random(1)
    pool = [chr(c) for c in range(32, 127) if chr(c) != "&"] + ["\t", "\n", "\r", "\r\n"]
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 60))) for _ in range(2000)]
    texts += ["<b>x</b>", "a\r\nb", "ESC [31m", "Don't STOP", "__init__", "a_b-c.d"]
    for text in texts:
        assert clip_bpe._PLAIN.fullmatch(text)
        assert tok.clean_text(text) == ref_clean(text), repr(text)


def test_custom_text_clip_text_transformer_supported(tmp_path):
    torch.manual_seed(1)
    text = {**TEXT, "ls_init_value": 0.5, "proj_bias": True}
    model = open_clip.CustomTextCLIP(embed_dim=32, vision_cfg=VISION, text_cfg=text).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    assert export_fast_text(model, tokenizer, tmp_path / "fast")
    tower = FastTextTower.load(tmp_path / "fast")
    texts = CAPTIONS[:6] + _long_texts()[:2]
    assert np.abs(tower.embed(texts) - _reference(model, tokenizer, texts)).max() < 1e-5


def _custom_text_model(**text):
    torch.manual_seed(2)
    return open_clip.CustomTextCLIP(embed_dim=32, vision_cfg=VISION, text_cfg={**TEXT, **text})


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _custom_text_model(pool_type="last"), id="pool-last"),
        pytest.param(lambda: _custom_text_model(pool_type="eos", eos_id=49407), id="pool-eos"),
        pytest.param(lambda: _custom_text_model(no_causal_mask=True), id="bidirectional"),
        pytest.param(lambda: _custom_text_model(qk_norm=True), id="custom-block"),
        pytest.param(lambda: _custom_text_model(embed_cls=True), id="cls-token"),
        pytest.param(
            lambda: open_clip.CLIP(embed_dim=32, vision_cfg=VISION, text_cfg=TEXT).to(
                torch.bfloat16
            ),
            id="bf16",
        ),
        pytest.param(lambda: torch.nn.Linear(2, 2), id="not-clip"),
    ],
)
def test_unsupported_architecture_returns_false(tmp_path, make):
    model = make().eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    out = tmp_path / "fast"
    assert query_text.unsupported_reason(model, tokenizer)
    assert export_fast_text(model, tokenizer, out) is False
    assert list(tmp_path.iterdir()) == []


def test_unsupported_tokenizer_returns_false(tmp_path):
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=VISION, text_cfg=TEXT).eval()
    reference = open_clip.get_tokenizer("ViT-B-32")

    def not_simple(texts):
        return reference(texts)

    short = open_clip.tokenizer.SimpleTokenizer(context_length=32)
    extra = open_clip.tokenizer.SimpleTokenizer(additional_special_tokens=["<pad>"])
    for tokenizer in (not_simple, short, extra):
        assert export_fast_text(model, tokenizer, tmp_path / "fast") is False
        assert list(tmp_path.iterdir()) == []


def test_failed_verification_returns_false_and_removes_stale_export(
    exported, tmp_path, monkeypatch
):
    model, tokenizer, _ = exported
    out = tmp_path / "fast"
    assert export_fast_text(model, tokenizer, out)
    monkeypatch.setitem(numpy_ops.ACTIVATIONS, "gelu", lambda x: x)
    monkeypatch.setitem(numpy_ops.ACTIVATIONS, "quick_gelu", lambda x: x)
    assert export_fast_text(model, tokenizer, out) is False
    assert list(tmp_path.iterdir()) == []


def test_reexport_replaces_existing(exported, tmp_path):
    model, tokenizer, _ = exported
    out = tmp_path / "fast"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert export_fast_text(model, tokenizer, out)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["fast"]
    FastTextTower.load(out)


def test_load_rejects_other_format(exported, tmp_path):
    _, _, out = exported
    with pytest.raises(ModelError):
        FastTextTower.load(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((out / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "format_version": 999}))
    with pytest.raises(ModelError, match="format"):
        FastTextTower.load(bad)


def test_query_path_imports_no_torch(exported):
    """A search process loads the export and embeds without torch, open_clip, ftfy or regex."""
    _, _, out = exported
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from mmsearch.encoders.query_text import FastTextTower
        tower = FastTextTower.load(Path({str(out)!r}))
        v = tower.embed(["a photo of a dog on the beach"])
        assert v.shape == (1, tower.dim), v.shape
        heavy = sorted(m for m in ("torch", "open_clip", "ftfy", "regex", "tokenizers")
                       if m in sys.modules)
        print(",".join(heavy))
        tower.embed(["café 東京 &amp;"])  # these need ftfy and regex, still not torch
        assert "torch" not in sys.modules and "open_clip" not in sys.modules
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_small_batches_restore_blas_threads(exported):
    _, _, out = exported
    tower = FastTextTower.load(out)
    tower.embed(["a query"])
    api = numpy_ops._blas_api[0]
    if api is None:
        pytest.skip("numpy is not linked to a findable OpenBLAS")
    get, set_ = api
    before = get()
    with numpy_ops.one_blas_thread():
        assert get() == 1
    assert get() == before


@pytest.mark.parametrize("parallel", [True, False], ids=["two-threads", "one-thread"])
def test_halves_on_two_threads_give_the_same_vectors(exported, monkeypatch, parallel):
    """A layer runs as two halves, on two threads where a core is idle: the vector must not depend
    on whether they ran at once (a query's ranking would change with the machine's load)."""
    model, tokenizer, out = exported
    tower = FastTextTower.load(out)
    assert tower.parts == 2
    texts = CAPTIONS[:6]
    monkeypatch.setattr(numpy_ops, "PARALLEL", False)
    serial = [tower.embed_batch([t]) for t in texts]
    monkeypatch.setattr(numpy_ops, "PARALLEL", parallel)
    calls = []
    real = numpy_ops._Helper._run
    monkeypatch.setattr(numpy_ops._Helper, "_run", lambda self: (calls.append(1), real(self)))
    numpy_ops._helper.clear()  # a fresh helper thread, counted
    got = [tower.embed_batch([t]) for t in texts]
    assert calls == ([1] if parallel else [])
    for a, b in zip(serial, got, strict=True):
        assert np.array_equal(a, b)
    with torch.inference_mode():
        ref = model.encode_text(tokenizer(texts)).numpy()
    assert np.abs(np.concatenate(got) - ref).max() < 1e-4


def test_halves_raise_the_helpers_error_and_keep_working():
    def half(s):
        if s == 1:
            raise ValueError("half 1 failed")
        return np.ones(3)

    with pytest.raises(ValueError, match="half 1 failed"):
        numpy_ops.halves(half, at_once=True)
    assert numpy_ops.halves(lambda s: np.full(3, s + 1.0), True).tolist() == [3.0, 3.0, 3.0]


def test_odd_heads_run_as_one_part(tmp_path):
    model_dir = _tiny_model_dir(tmp_path, heads=1)
    enc = load_clip(ModelSpec.parse(str(model_dir)), EncoderOptions(device="cpu", precision="fp32"))
    assert export_fast_text(enc.model, enc.tokenizer, tmp_path / "fast")
    tower = FastTextTower.load(tmp_path / "fast")
    assert tower.parts == 1
    with torch.inference_mode():
        ref = enc.model.encode_text(enc.tokenizer(["a dog"])).numpy()
    assert np.abs(tower.embed_batch(["a dog"]) - ref).max() < 1e-4


def test_gelu_matches_math_erf():
    x = np.linspace(-12, 12, 20001, dtype=np.float32)
    ref = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    got = numpy_ops.gelu(x)
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() < 5e-7


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_halves_in_a_forked_child_start_their_own_helper():
    """A process forked after a query (a worker pool) has no helper thread: it must not wait on
    the parent's forever."""
    numpy_ops.halves(lambda s: np.ones(2), True)  # the parent's helper exists
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its halves come back
        ok = numpy_ops.halves(lambda s: np.full(2, s + 1.0), True).tolist() == [3.0, 3.0]
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's halves never came back")


@pytest.mark.parametrize(
    "proc, loadavg, free",
    [
        (b"2.50 2.00 1.00 1/300 999", (2.5,) * 3, True),  # only this thread runs now
        (b"0.10 0.10 0.10 2/300 999", (0.1,) * 3, False),  # another thread runs now
        (None, (0.5,) * 3, True),  # no /proc: the load average
        (None, (2.5,) * 3, False),
        (None, None, False),  # neither (Windows): one core, never an error
    ],
)
def test_second_core_idle_reads_what_runs_now(monkeypatch, proc, loadavg, free):
    import builtins

    real_open = builtins.open

    def fake_open(path, *a, **kw):
        if path == "/proc/loadavg":
            if proc is None:
                raise FileNotFoundError(path)
            return io.BytesIO(proc)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(numpy_ops, "PARALLEL", None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(builtins, "open", fake_open)
    if loadavg is None:
        monkeypatch.delattr(os, "getloadavg", raising=False)
    else:
        monkeypatch.setattr(os, "getloadavg", lambda: loadavg, raising=False)
    assert numpy_ops.second_core_idle() is free
