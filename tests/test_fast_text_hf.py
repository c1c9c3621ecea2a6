"""The numpy copy of Hugging Face text towers (BERT, RoBERTa, XLM-R) against torch: same tokens as
transformers, same scores, refused when it disagrees, and a cold CLI search without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import make_note

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec, index_root  # noqa: E402
from mmsearch.encoders.clip import load_clip, save_model_dir  # noqa: E402
from mmsearch.encoders.query_text import HF_FORMAT, load_fast_text, numpy_ops  # noqa: E402
from mmsearch.encoders.query_text.hf_export import (  # noqa: E402
    export_hf_text_tower,
    hf_unsupported_reason,
)
from mmsearch.encoders.query_text.open_clip_export import (  # noqa: E402
    export_open_clip_text,
    open_clip_hf_parts,
)

CONTEXT = 24
CORPUS = [
    "a photo of a dog running on the beach",
    "two cats sleeping on a red sofa",
    "Crème brûlée à la française, naïve café, ÀÉÎÕÜ straße",
    "東京の夜景と富士山 中文句子没有空格，还有标点。",
    "Привет, как дела? Ελληνικά κείμενο",
    "emoji 😀🐶🏖️ and 👍🏽 flags 🇯🇵",
    "snow-covered mountains reflected in a lake",
]
TRICKY = [
    *CORPUS,
    "",
    "   ",
    "A Photo Of A CAT, sleeping!!!",
    "fish &amp; chips &lt;b&gt; “curly” ﬁne ＦＵＬＬ width",
    "[CLS] [SEP] [PAD] <s> </s> <pad> <mask> [UNK] ##ing ▁",
    "tabs\tand\nnewlines\r\nand   spaces",
    "café" * 40,
    " ".join(f"word{i} is part of a long caption that will not fit" for i in range(8)),
]
VISION = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}


def _trained(model, trainer, pre, norm=None) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer(model)
    if norm is not None:
        tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.train_from_iterator(CORPUS, trainer)
    return json.loads(tok.to_str())["model"]


def _tokenizer(family: str):
    """A tiny tokenizer of the family's kind, trained here: WordPiece with BERT's normalizer,
    byte-level BPE, or a SentencePiece-style Unigram."""
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    if family == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        m = _trained(
            models.WordPiece(unk_token="[UNK]"),
            trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials),
            pre_tokenizers.BertPreTokenizer(),
            normalizers.BertNormalizer(lowercase=True),
        )
        return transformers.BertTokenizer(vocab=m["vocab"])
    if family == "roberta":
        m = _trained(
            models.BPE(),
            trainers.BpeTrainer(
                vocab_size=400,
                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        )
        merges = [tuple(x) if isinstance(x, list) else tuple(x.split()) for x in m["merges"]]
        return transformers.RobertaTokenizer(vocab=m["vocab"], merges=merges)
    m = _trained(
        models.Unigram(),
        trainers.UnigramTrainer(
            vocab_size=150, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>"
        ),
        pre_tokenizers.Metaspace(),
        normalizers.NFKC(),
    )
    return transformers.XLMRobertaTokenizer(vocab=[tuple(v) for v in m["vocab"]])


# family -> (config class, hidden_act, open_clip pooler, projection)
FAMILIES = {
    "bert": ("BertConfig", "gelu", "mean_pooler", "linear"),
    "roberta": ("RobertaConfig", "gelu_new", "cls_pooler", "mlp"),
    "xlm-roberta": ("XLMRobertaConfig", "gelu_pytorch_tanh", "cls_last_hidden_state_pooler", None),
}


def _hf_dir(root: Path, family: str) -> Path:
    cls, act, pooler, _ = FAMILIES[family]
    tok = _tokenizer(family)
    out = root / f"{family}-hf"
    tok.save_pretrained(str(out))
    torch.manual_seed(0)
    cfg = getattr(transformers, cls)(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, hidden_act=act, max_position_embeddings=CONTEXT + 2,
        pad_token_id=tok.pad_token_id, type_vocab_size=2,
    )  # fmt: skip
    model_cls = transformers.AutoModel.from_config(cfg).__class__
    model_cls(cfg, add_pooling_layer=pooler == "cls_pooler").save_pretrained(str(out))
    return out


def _open_clip_dir(root: Path, family: str) -> Path:
    """The user's path: an open_clip local-dir model whose text tower is the HF model."""
    hf = _hf_dir(root, family)
    _, _, pooler, proj = FAMILIES[family]
    cfg = {
        "embed_dim": 32, "custom_text": True, "vision_cfg": VISION,
        "text_cfg": {"hf_model_name": str(hf), "hf_tokenizer_name": str(hf),
                     "hf_model_pretrained": True, "hf_proj_type": proj,
                     "hf_pooler_type": pooler, "context_length": CONTEXT},
    }  # fmt: skip
    torch.manual_seed(1)
    model = open_clip.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"})
    out = save_model_dir(model, cfg, root / family, {"size": 32})
    transformers.AutoTokenizer.from_pretrained(str(hf)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tmp_path_factory):
    """(encoder loaded like users do, export dir) per family."""
    root = tmp_path_factory.mktemp("hf_text")
    model_dir = _open_clip_dir(root, request.param)
    enc = load_clip(ModelSpec.parse(str(model_dir)), EncoderOptions(device="cpu", precision="fp32"))
    out = root / "fast"
    assert export_open_clip_text(enc.model, enc.tokenizer, out)
    return enc, out


def test_scores_agree_with_torch(exported):
    enc, out = exported
    tower = load_fast_text(out)
    assert tower.config["format"] == HF_FORMAT
    items = np.random.default_rng(0).standard_normal((50, tower.dim)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    ref = enc.encode_text(TRICKY)
    got = tower.embed(TRICKY, batch_size=5)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got @ items.T - ref @ items.T).max() < 1e-4
    for text, row in zip(TRICKY[:4], ref[:4], strict=True):  # one query at a time, as search
        assert np.abs(tower.embed([text])[0] @ items.T - row @ items.T).max() < 1e-4


def test_tokens_identical_to_transformers(exported):
    enc, out = exported
    tower = load_fast_text(out)
    mine, ref = tower.tokenizer(TRICKY), enc.tokenizer(TRICKY).numpy()
    assert mine.shape == ref.shape == (len(TRICKY), CONTEXT)
    bad = [t for t, a, b in zip(TRICKY, mine, ref, strict=True) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} texts tokenize differently, e.g. {bad[:2]!r}"
    hf = enc.tokenizer.tokenizer
    long_row = tower.tokenizer.token_rows([TRICKY[-1]])[0]
    assert len(long_row) == CONTEXT and long_row[-1] == hf.sep_token_id  # truncated, end kept
    for text in ("a dog", "Crème 東京 😀", TRICKY[-1]):
        assert tower.count_tokens(text) == len(hf(text, add_special_tokens=False)["input_ids"])


def _bare(cls_name: str, vocab_size: int = 200, **extra):
    torch.manual_seed(2)
    cfg = getattr(transformers, cls_name)(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=40, pad_token_id=1, **extra,
    )  # fmt: skip
    return transformers.AutoModel.from_config(cfg).eval()


@pytest.mark.parametrize(
    "model_cls, pooling, act",
    [
        ("RobertaPreLayerNormConfig", "max", "relu"),  # pre-LN
        ("RobertaConfig", "last", "gelu"),
        ("BertConfig", "cls_pooler", "gelu_new"),
    ],
)
def test_parts_exporter_for_other_callers(tmp_path, model_cls, pooling, act):
    """`export_hf_text_tower` from torch modules (as a sentence-transformers tower hands them
    over): pre-LN, max/last/BERT-pooler pooling, a Dense-with-tanh head."""
    tok = _tokenizer("xlm-roberta")
    model = _bare(model_cls, len(tok), hidden_act=act)
    head = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Tanh())
    out = tmp_path / "fast"
    ok = export_hf_text_tower(model, tok, out, pooling=pooling, projection=head, context_length=20)
    assert ok, hf_unsupported_reason(model, tok, pooling, head, 20)
    tower = load_fast_text(out)
    assert tower.config["norm"] == ("pre" if "PreLayerNorm" in model_cls else "post")
    ids = torch.tensor(tower.tokenizer(TRICKY[:6]))
    mask = ids != 1
    with torch.inference_mode():
        hidden = model(input_ids=ids, attention_mask=mask.long())
        h = hidden.last_hidden_state
        if pooling == "max":
            pooled = h.masked_fill(~mask[..., None], -torch.inf).max(1).values
        elif pooling == "last":
            pooled = h[torch.arange(len(h)), mask.sum(1) - 1]
        else:
            pooled = hidden.pooler_output
        ref = torch.nn.functional.normalize(head(pooled), dim=-1).numpy()
    assert np.abs(tower.embed(TRICKY[:6]) - ref).max() < 1e-4


@pytest.fixture(scope="module")
def bert_model(tmp_path_factory) -> Path:
    return _open_clip_dir(tmp_path_factory.mktemp("hf_bert"), "bert")


@pytest.fixture(scope="module")
def bert_encoder(bert_model):
    return load_clip(
        ModelSpec.parse(str(bert_model)), EncoderOptions(device="cpu", precision="fp32")
    )


def test_a_tower_that_disagrees_is_refused(bert_encoder, tmp_path, monkeypatch):
    enc = bert_encoder
    out = tmp_path / "fast"
    assert export_open_clip_text(enc.model, enc.tokenizer, out)
    monkeypatch.setitem(numpy_ops.ACTIVATIONS, "gelu", lambda x: x)
    monkeypatch.setitem(numpy_ops.ACTIVATIONS, "gelu_tanh", lambda x: x)
    assert export_open_clip_text(enc.model, enc.tokenizer, out) is False
    assert list(tmp_path.iterdir()) == []  # the earlier export is gone too, never used stale


def test_unsupported_parts_are_refused_with_a_reason(bert_encoder, tmp_path):
    enc = bert_encoder
    parts, why = open_clip_hf_parts(enc.model, enc.tokenizer)
    assert why is None
    model, tok = parts["hf_model"], parts["tokenizer"]
    assert "pooling" in hf_unsupported_reason(model, tok, "weighted")
    assert "projection" in hf_unsupported_reason(model, tok, "mean", torch.nn.LayerNorm(32))
    assert "float32" in hf_unsupported_reason(_bare("BertConfig").half(), tok, "mean")
    assert "decoder" in hf_unsupported_reason(_bare("BertConfig", is_decoder=True), tok, "mean")
    assert (
        export_hf_text_tower(model, tok, tmp_path / "x", pooling="weighted", context_length=CONTEXT)
        is False
    )
    assert list(tmp_path.iterdir()) == []


def test_cold_cli_search_imports_no_torch(bert_model, tmp_path):
    """Index notes with a BERT-tower model; a fresh `mmsearch search` finds the note whose text
    is the query, and never imports torch, transformers or open_clip."""
    from mmsearch.pipeline.run import index_paths

    texts = ["a photo of a dog running on the beach", "two cats sleeping on a red sofa",
             "snow-covered mountains reflected in a lake", "東京の夜景と富士山"]  # fmt: skip
    for i, text in enumerate(texts):
        make_note(tmp_path / "notes" / f"n{i}.txt", text)
    spec = ModelSpec.parse(str(bert_model))
    index_paths(
        IndexOptions(
            roots=(tmp_path / "notes",),
            root_dir=index_root(),
            encoder=EncoderOptions(model=spec, device="cpu", precision="fp32"),
            workers=0,
        )
    )
    script = textwrap.dedent(
        """
        import sys
        from mmsearch.cli import main
        sys.argv = ["mmsearch", "search", sys.argv[1], "--json", "-k", "2"]
        try:
            main()
        except SystemExit as e:
            assert e.code in (0, None), e.code
        heavy = [m for m in ("torch", "transformers", "open_clip") if m in sys.modules]
        print("HEAVY=" + ",".join(heavy))
        """
    )
    for i in (1, 3):
        done = subprocess.run(
            [sys.executable, "-c", script, texts[i]], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.strip().splitlines()
        assert lines[-1] == "HEAVY="
        first = json.loads(lines[0])
        assert Path(first["path"]).name == f"n{i}.txt"
