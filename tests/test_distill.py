"""Query towers for other languages: `mmsearch distill-text` trains a sentence-transformers student
onto the index's CLIP text tower (multilingual knowledge distillation), and `search`/`index
--query-model` use it for text queries. Offline: the student is a tiny random BERT with a WordPiece
tokenizer trained here on the test's own parallel sentences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_image, make_note
from test_docs import user_files  # noqa: F401  (a fixture: a home folder, indexed)
from typer.testing import CliRunner

from mmsearch.cli import app

runner = CliRunner()

# (English, German) pairs: the English in the index's notes, the German as queries.
PARALLEL = [
    ("a dog runs on the beach", "ein Hund rennt am Strand"),
    ("two children play in the snow", "zwei Kinder spielen im Schnee"),
    ("a red car parked in the street", "ein rotes Auto parkt auf der Straße"),
    ("an old man reads a newspaper", "ein alter Mann liest eine Zeitung"),
    ("a cat sleeps on the sofa", "eine Katze schläft auf dem Sofa"),
    ("people dance at a wedding", "Menschen tanzen auf einer Hochzeit"),
    ("a boat sails across the lake", "ein Boot segelt über den See"),
    ("the mountains are covered in clouds", "die Berge sind von Wolken bedeckt"),
    ("a woman rides a bicycle", "eine Frau fährt Fahrrad"),
    ("fireworks light up the night sky", "Feuerwerk erhellt den Nachthimmel"),
    ("a bird sits on a branch", "ein Vogel sitzt auf einem Ast"),
    ("a boy jumps into the pool", "ein Junge springt in den Pool"),
]
# More English, as a plain sentence list mixed into the same file.
MONOLINGUAL = ["a horse in a green field", "a plate of pasta", "a crowded train station"]


def write_student(out: Path, texts: list[str]) -> Path:
    """A tiny random BERT student (sentence-transformers: Transformer + mean Pooling + Normalize,
    as the offline MiniLM and many published students are) with a WordPiece vocabulary of `texts`' words and characters (built, not trained: the same ids on
    every run)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    try:
        from sentence_transformers.sentence_transformer.modules import (
            Normalize,
            Pooling,
            Transformer,
        )
    except ImportError:
        from sentence_transformers.models import Normalize, Pooling, Transformer
    from sentence_transformers import SentenceTransformer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    norm = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    pre = pre_tokenizers.BertPreTokenizer()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))})
    chars = sorted({c for w in words for c in w})
    pieces = list(dict.fromkeys(specials + chars + [f"##{c}" for c in chars] + words))
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=64,
    )  # fmt: skip
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    bert = out.parent / f"{out.name}-bert"
    BertModel(cfg).save_pretrained(bert)
    fast.save_pretrained(bert)
    encoder = Transformer(str(bert), max_seq_length=64)
    pooling = Pooling(encoder.get_word_embedding_dimension(), "mean")
    SentenceTransformer(modules=[encoder, pooling, Normalize()], device="cpu").save(str(out))
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distill")


@pytest.fixture(scope="module")
def sentences(work) -> Path:
    lines = [f"{en}\t{de}" for en, de in PARALLEL] + MONOLINGUAL + ["\tno sentence here", ""]
    path = work / "parallel.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def distilled(work, sentences, tiny_model) -> tuple[Path, dict]:
    """A tower distilled from the tiny CLIP model on the parallel sentences (one held out)."""
    import torch

    torch.set_num_threads(1)
    student = write_student(work / "student", [t for pair in PARALLEL for t in pair] + MONOLINGUAL)
    out = work / "tower"
    rows = ["path,caption"]  # held-out image pairs: recall with the tower's queries
    for i, (en, _) in enumerate(PARALLEL):
        rows.append(f"{make_image(work / 'images' / f'{i}.png', pattern=i).name},{en}")
    (work / "images" / "pairs.csv").write_text("\n".join(rows) + "\n")
    r = runner.invoke(
        app,
        [
            "distill-text", str(sentences), "--out", str(out), "--model", str(tiny_model),
            "--student", str(student), "--epochs", "40", "--batch-size", "8",
            "--lr", "1e-3",
            "--val-fraction", "0.05", "--device", "cpu", "--json",
            "--pairs", str(work / "images" / "pairs.csv"),
        ],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def test_distillation_learns_and_writes_a_stamped_sentence_transformer(distilled, tiny_model):
    from sentence_transformers import SentenceTransformer

    from mmsearch.encoders import create_encoder

    out, result = distilled
    assert result["skipped_lines"] == 1  # the line with no sentence before its tab
    assert result["val_sentences"] == 1 and result["val_translations"] == 1
    assert result["train_rows"] == (len(PARALLEL) + len(MONOLINGUAL) - 1) + len(PARALLEL) - 1
    before, after = result["before"], result["after"]
    # held-out agreement with the teacher rises, for the sentence and for its translation
    assert after["sentences"] > before["sentences"] + 0.3
    assert after["translations"] > before["translations"] + 0.3
    assert result["best_epoch"] > 0
    # text->image recall on the image pairs, the tower's queries beside the teacher's
    teacher_r, student_r = result["recall_teacher"], result["recall_student"]
    assert teacher_r["images"] == student_r["images"] == len(PARALLEL) == student_r["texts"]
    assert abs(student_r["text_to_image"]["R@5"] - teacher_r["text_to_image"]["R@5"]) <= 0.25
    teacher = create_encoder(str(tiny_model))
    tower = SentenceTransformer(str(out), device="cpu")
    assert tower.encode(["ein Hund"]).shape == (1, teacher.dim)
    stamp = json.loads((out / "mmsearch_alignment.json").read_text())
    assert stamp["aligned_to"] == {k: teacher.identity.to_dict()[k] for k in ("key", "spec", "dim")}


def _tops(queries: list[str], *args: str) -> list[str]:
    """The top note of each query, answered in one `search --queries` process."""
    r = runner.invoke(
        app, ["search", "--queries", "-", *args, "-k", "1", "--type", "text", "--json"],
        input="\n".join(queries) + "\n",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    top = {(h := json.loads(row))["query"]: Path(h["path"]).name for row in r.stdout.splitlines()}
    return [top[q] for q in queries]


def _found(queries: list[str], notes: list[str], *args: str) -> int:
    """How many queries find their own note first."""
    return sum(t == n for t, n in zip(_tops(queries, *args), notes, strict=True))


@pytest.fixture
def notes_index(tmp_path, tiny_model) -> Path:
    folder = tmp_path / "notes"
    for i, (en, _) in enumerate(PARALLEL):
        make_note(folder / f"n{i}.txt", en + "\n")
    r = runner.invoke(app, ["index", str(folder), "--model", str(tiny_model)])
    assert r.exit_code == 0, r.output
    return folder


def test_translated_queries_find_what_the_original_finds(distilled, notes_index):
    out, _ = distilled
    notes = [f"n{i}.txt" for i in range(len(PARALLEL))]
    english, german = [en for en, _ in PARALLEL], [de for _, de in PARALLEL]
    assert _tops(english) == notes  # the teacher finds the note of the English sentence
    same = _found(german, notes, "--query-model", str(out))
    without = _found(german, notes)
    # one pair was held out from training; the model's own tower reads German poorly
    assert same >= len(PARALLEL) - 1
    assert without < same

    # recorded as the index's query tower, it is used without being asked for
    r = runner.invoke(app, ["index", str(notes_index), "--query-model", str(out)])
    assert r.exit_code == 0, r.output
    info = json.loads(runner.invoke(app, ["info", "--json"]).stdout)
    assert info["query_model"] == str(out.resolve())
    assert _found(german, notes) == same
    # ... through its torch-free copy, exported by `index` and checked against the torch model
    from mmsearch.config import SearchOptions
    from mmsearch.encoders.query_tower import SentenceTransformerTower
    from mmsearch.search import Searcher

    with Searcher(SearchOptions()) as s:
        assert not isinstance(s._text_tower(), SentenceTransformerTower)
        assert s._text_tower().dim == s.identity.dim


def test_no_query_model_removes_the_tower_and_a_crash_keeps_it(distilled, notes_index, monkeypatch):
    out, _ = distilled
    notes = [f"n{i}.txt" for i in range(len(PARALLEL))]
    german = [de for _, de in PARALLEL]
    without = _found(german, notes)
    assert runner.invoke(app, ["index", str(notes_index), "--query-model", str(out)]).exit_code == 0
    with_tower = _found(german, notes)
    assert with_tower > without

    def info() -> dict:
        return json.loads(runner.invoke(app, ["info", "--json"]).stdout)

    r = runner.invoke(
        app, ["index", str(notes_index), "--query-model", str(out), "--no-query-model"]
    )
    assert r.exit_code == 2 and "exclude each other" in r.stderr
    assert info()["query_model"] == str(out.resolve())

    # the manifest write dies half-way (disk full): the old manifest, and so the tower, stay
    import mmsearch.storage.atomic as atomic

    whole = atomic.replace_file

    def torn(path, write):
        if Path(path).name != "manifest.json":
            return whole(path, write)
        with open(f"{path}.tmp", "wb") as f:
            f.write(b'{"query_tower": nu')
        raise OSError(28, "No space left on device", str(path))

    with monkeypatch.context() as m:
        m.setattr(atomic, "replace_file", torn)
        r = runner.invoke(app, ["index", str(notes_index), "--no-query-model"])
    assert r.exit_code == 2 and "no space left" in r.stderr
    assert info()["query_model"] == str(out.resolve())
    assert _found(german, notes) == with_tower

    r = runner.invoke(app, ["index", str(notes_index), "--no-query-model"])
    assert r.exit_code == 0, r.output
    assert f"removed the query tower {out.resolve()}" in r.stderr
    assert info()["query_model"] is None
    assert _found(german, notes) == without  # the model's own tower reads the queries again
    r = runner.invoke(app, ["index", str(notes_index), "--no-query-model"])
    assert r.exit_code == 0 and "there was no query tower" in r.stderr


def test_a_tower_for_another_model_is_refused(distilled, tmp_path, other_model):
    out, _ = distilled
    make_note(tmp_path / "notes" / "a.txt", PARALLEL[0][0])
    assert (
        runner.invoke(app, ["index", str(tmp_path / "notes"), "-m", str(other_model)]).exit_code
        == 0
    )
    for args in (
        ["search", PARALLEL[0][1], "--query-model", str(out)],
        ["index", str(tmp_path / "notes"), "--query-model", str(out)],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, r.output
        (line,) = r.stderr.splitlines()
        assert "is aligned to model" in line and "not to this index's" in line
    assert json.loads(runner.invoke(app, ["info", "--json"]).stdout).get("query_model") is None
    # a directory that is no query tower, and a name mmsearch does not know
    r = runner.invoke(app, ["search", "x", "--query-model", str(tmp_path / "notes")])
    assert r.exit_code == 2 and "not a query tower made by mmsearch distill-text" in r.stderr
    r = runner.invoke(app, ["search", "x", "--query-model", "no-such-tower"])
    assert r.exit_code == 2 and "not a published query tower" in r.stderr


def test_published_towers_are_matched_by_model_spec():
    from mmsearch.encoders import EncoderIdentity, query_tower
    from mmsearch.errors import ModelMismatchError

    name = query_tower.resolve("clip-ViT-B-32-multilingual-v1")
    assert name == "sentence-transformers/clip-ViT-B-32-multilingual-v1"
    record = query_tower.check_alignment(name, EncoderIdentity("k", "ViT-B-32:openai", dim=512))
    assert record["source"] == name
    other = EncoderIdentity("k2", "ViT-B-32:laion2b_s34b_b79k", dim=512)
    with pytest.raises(ModelMismatchError, match="ViT-B-32:openai"):
        query_tower.check_alignment(name, other)


def test_sentences_file_errors(tmp_path, tiny_model):
    from mmsearch.finetune.distill import read_sentences

    mixed = tmp_path / "mixed.txt"
    mixed.write_text("a dog\ta Hund\tun chien\na cat\n\na dog\tein Hund\n", encoding="utf-8")
    s = read_sentences(mixed)
    assert s.sources == ["a dog", "a cat"]
    assert s.translations == [(0, "a Hund"), (0, "un chien"), (0, "ein Hund")]
    one = tmp_path / "one.txt"
    one.write_text("just one\n")
    for path, words in ((one, "needs at least 2"), (tmp_path / "none.txt", "not found")):
        r = runner.invoke(app, ["distill-text", str(path), "--out", str(tmp_path / "o"),
                                "-m", str(tiny_model)])  # fmt: skip
        assert r.exit_code == 2 and words in r.stderr, r.output


def test_readme_examples_run(distilled, user_files, tmp_path, monkeypatch):  # noqa: F811
    """The README's 'Queries in other languages' commands that need no download (the default
    student and the published tower do): the tower from `distilled` stands at the README's path."""
    import shutil

    from test_docs import _shell_words, code_blocks

    monkeypatch.chdir(tmp_path)
    shutil.copytree(distilled[0], tmp_path / "towers" / "multi")
    ran = []
    for line in code_blocks("### Queries in other languages")[0].splitlines():
        words = _shell_words(line, user_files)
        if words[1] == "distill-text" or "clip-ViT-B-32-multilingual-v1" in words:
            continue
        r = runner.invoke(app, words[1:])
        assert r.exit_code == 0, (line, r.output)
        ran.append(words[1])
    assert ran == ["search", "index", "search"]
    info = json.loads(runner.invoke(app, ["info", "--json"]).stdout)
    assert info["query_model"] == str((tmp_path / "towers" / "multi").resolve())
