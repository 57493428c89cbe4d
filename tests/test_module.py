"""MambaEncoder inside a SentenceTransformer: preprocessing, EOS pooling, streaming, bad input, save/load."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

import st_mamba
from st_mamba import MambaEncoder, TokenizerNotFoundError
from st_mamba.checkpoints import CheckpointError
from tests.conftest import CORPUS, GPT_NEOX_DIR, random_texts, tiny_config


def encoder_of(model: SentenceTransformer) -> MambaEncoder:
    return model[0]


def test_preprocess_appends_eos_and_right_pads(tiny_model):
    enc = encoder_of(tiny_model)
    eos = enc.tokenizer.eos_token_id
    features = enc.preprocess(["a b c d e f g", "a", ""])
    ids, mask = features["input_ids"], features["attention_mask"]
    lengths = mask.sum(1)
    assert lengths[2] == 1 and ids[2, 0] == eos  # the empty string is EOS alone
    for row in range(3):
        n = int(lengths[row])
        assert ids[row, n - 1] == eos and mask[row, :n].all() and not mask[row, n:].any()
        assert (ids[row, n:] == eos).all()  # padding is EOS under a zero mask
    plain = enc.tokenizer("a b c d e f g", add_special_tokens=False)["input_ids"]
    assert ids[0, : len(plain)].tolist() == plain


def test_truncation_keeps_eos(tiny_model):
    enc = encoder_of(tiny_model)
    enc.max_seq_length = 5
    features = enc.preprocess([" ".join(["token"] * 50)])
    assert features["input_ids"].shape == (1, 5)
    assert features["input_ids"][0, -1] == enc.tokenizer.eos_token_id


def test_embedding_is_normalised_hidden_state_at_eos(tiny_model):
    enc = encoder_of(tiny_model)
    features = enc.preprocess(["state space models"])
    with torch.no_grad():
        hidden = enc.backbone(features["input_ids"])
    expected = torch.nn.functional.normalize(hidden[0, -1], dim=-1)
    actual = tiny_model.encode(["state space models"], convert_to_tensor=True)[0]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    sims = tiny_model.similarity(actual[None], actual[None])
    assert sims.item() == pytest.approx(1.0, abs=1e-5)


def test_padding_invariance(tiny_model):
    texts = random_texts(6, seed=1, max_words=80)
    short = min(texts, key=len)
    alone = tiny_model.encode([short], convert_to_tensor=True)
    in_batch = tiny_model.encode(texts, convert_to_tensor=True, batch_size=6)[texts.index(short)]
    assert (alone[0] - in_batch).abs().max().item() <= 1e-5


@pytest.mark.parametrize("chunk_size", [1, 5, 16])
def test_streaming_equals_one_pass(tiny_model, chunk_size):
    texts = random_texts(5, seed=2, max_words=60)
    one_pass = tiny_model.encode(texts, convert_to_tensor=True)
    encoder_of(tiny_model).chunk_size = chunk_size
    streamed = tiny_model.encode(texts, convert_to_tensor=True)
    assert (one_pass - streamed).abs().max().item() <= 1e-4


def test_streaming_reads_only_the_texts_still_going(tiny_model, monkeypatch):
    """Once a text's EOS is behind, later chunks leave it out; none reads past the longest text left."""
    enc = encoder_of(tiny_model)
    texts = ["short one", " ".join(CORPUS), " ".join(CORPUS * 2)]
    lengths = enc.preprocess(texts)["attention_mask"].sum(1).tolist()  # with EOS, cut at max_seq_length
    expected = tiny_model.encode(texts, convert_to_tensor=True, batch_size=3)
    enc.chunk_size = 8
    shapes = []
    forward = enc.backbone.forward
    monkeypatch.setattr(
        enc.backbone, "forward", lambda ids, *a, **k: shapes.append(tuple(ids.shape)) or forward(ids, *a, **k)
    )
    streamed = tiny_model.encode(texts, convert_to_tensor=True, batch_size=3)
    assert (expected - streamed).abs().max().item() <= 1e-4
    going = [sum(length > start for length in lengths) for start in range(0, max(lengths), 8)]
    assert [rows for rows, _ in shapes] == going and going[-1] == 1 and going[0] == 3
    assert sum(rows * width for rows, width in shapes) < 3 * max(lengths)
    assert shapes[-1][1] == (max(lengths) - 1) % 8 + 1


def test_streaming_returns_no_token_embeddings(tiny_model):
    enc = encoder_of(tiny_model)
    enc.chunk_size = 4
    out = enc(enc.preprocess(["a text that is longer than four tokens for sure"]))
    assert "token_embeddings" not in out and out["sentence_embedding"].shape == (1, 32)


def test_prompts_are_used_and_explicit_prompt_wins(tiny_model):
    text = ["what is a state space model"]
    query = tiny_model.encode_query(text)
    assert np.allclose(query, tiny_model.encode(text, prompt="query: "), atol=1e-6)
    # A random model forgets a prefix fast, so the prompt moves the embedding only a little; but it moves it.
    assert np.abs(query - tiny_model.encode(text)).max() > 1e-5
    document = tiny_model.encode_document(text)
    assert np.allclose(document, tiny_model.encode(text, prompt="passage: "), atol=1e-6)
    assert np.allclose(
        tiny_model.encode_query(text, prompt="custom: "), tiny_model.encode(["custom: " + text[0]]), atol=1e-6
    )


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["nested"]])
def test_non_strings_raise_type_error_naming_position(tiny_model, bad):
    with pytest.raises(TypeError, match=r"text \d+ of the batch is .*expected str"):
        tiny_model.encode(["fine", bad, "also fine"])


def test_empty_batch_and_empty_string(tiny_model):
    assert len(tiny_model.encode([])) == 0
    assert tiny_model.encode([""]).shape == (1, 32)
    features = encoder_of(tiny_model).preprocess([])
    assert features["input_ids"].shape[0] == 0


def test_invalid_settings_are_refused(tiny_model):
    with pytest.raises(ValueError, match="max_seq_length"):
        encoder_of(tiny_model).max_seq_length = 0
    with pytest.raises(ValueError, match="chunk_size"):
        encoder_of(tiny_model).chunk_size = -3


def test_save_load_round_trip(tiny_model, tmp_path):
    texts = random_texts(4, seed=3)
    before = tiny_model.encode(texts)
    tiny_model.save(str(tmp_path))
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    assert "MambaEncoder" in (tmp_path / "modules.json").read_text()
    assert (tmp_path / "README.md").is_file()  # Sentence-Transformers' model card
    reloaded = SentenceTransformer(str(tmp_path), trust_remote_code=True, device="cpu")
    np.testing.assert_array_equal(reloaded.encode(texts), before)
    assert reloaded.prompts["query"] == "query: "
    assert reloaded.max_seq_length == 256


def test_bf16_weights_on_cpu_stay_close_to_fp32(tiny_model, tmp_path):
    """``model_kwargs={"torch_dtype": "bfloat16"}`` loads bf16 weights; on CPU they run through the fast paths."""
    texts = random_texts(6, seed=14, max_words=80)
    with st_mamba.ops.use_backend("reference"):
        expected = tiny_model.encode(texts, convert_to_tensor=True)
    tiny_model.save(str(tmp_path))
    model = SentenceTransformer(
        str(tmp_path), trust_remote_code=True, device="cpu", model_kwargs={"torch_dtype": "bfloat16"}
    )
    assert {p.dtype for p in encoder_of(model).backbone.parameters()} == {torch.bfloat16}
    actual = model.encode(texts, convert_to_tensor=True)
    error = (actual.float() - expected).abs().max().item()
    assert error <= 3e-2, f"max abs error {error:.3g} of unit-length embeddings in bf16"
    assert torch.nn.functional.cosine_similarity(actual.float(), expected).min().item() >= 0.999


def test_loading_custom_module_needs_trust_remote_code(tiny_model, tmp_path):
    tiny_model.save(str(tmp_path))
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(tmp_path), device="cpu")


def test_missing_tokenizer_is_named(tiny_model, tmp_path):
    tiny_model.save(str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).unlink()
    with pytest.raises(TokenizerNotFoundError, match="no tokenizer in"):
        SentenceTransformer(str(tmp_path), trust_remote_code=True, device="cpu")


def test_from_backbone_reads_a_checkpoint_and_its_tokenizer(tiny_model, tokenizer_dir, tmp_path):
    tiny_model.save(str(tmp_path / "saved"))
    backbone_dir = tmp_path / "lm"
    backbone_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "saved" / name, backbone_dir / name)
    with pytest.raises(TokenizerNotFoundError, match="no tokenizer in"):
        st_mamba.from_backbone(backbone_dir, tokenizer_name_or_path=backbone_dir)
    model = st_mamba.from_backbone(backbone_dir, tokenizer_name_or_path=tokenizer_dir, max_seq_length=256, device="cpu")
    texts = random_texts(3, seed=4)
    np.testing.assert_allclose(model.encode(texts), tiny_model.encode(texts), atol=1e-6)


def test_ready_to_train_with_mnrl(tiny_model):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    tiny_model.train()
    loss_fn = MultipleNegativesRankingLoss(tiny_model)
    queries = tiny_model.preprocess(["what is mamba", "how do retrievers rank"], prompt="query: ")
    docs = tiny_model.preprocess(["Mamba is a state space model.", "Retrievers rank by cosine."], prompt="passage: ")
    loss = loss_fn([queries, docs], labels=None)
    loss.backward()
    grads = [p.grad for p in encoder_of(tiny_model).backbone.parameters()]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.skipif(not GPT_NEOX_DIR.is_dir(), reason="needs ../shared/assets/gpt-neox-20b (the real Mamba tokenizer)")
def test_gpt_neox_tokenizer_from_shared():
    model = st_mamba.from_config(tiny_config(1, vocab_size=50280), GPT_NEOX_DIR, seed=0, device="cpu")
    features = model[0].preprocess(["Hello world"])
    assert features["input_ids"].tolist() == [[12092, 1533, 0]]  # <|endoftext|> = 0 appended


def test_training_batches_are_never_packed(tiny_model, monkeypatch):
    """Training collators split batches by row (cached losses) and pin them: packing is for inference only."""
    from st_mamba import ops

    monkeypatch.setattr(ops, "packs_in_one_pass", lambda device, version: True)
    encoder = encoder_of(tiny_model).train()
    features = encoder.preprocess(["a short text", "a somewhat longer text than the first"])
    assert set(features) == {"input_ids", "attention_mask"} and features["input_ids"].shape[0] == 2


@pytest.mark.parametrize("pooling", ["eos", "mean", "weighted-mean"])
def test_cpu_inference_packs_and_equals_the_padded_forward(tokenizer_dir, pooling):
    """With the compiled CPU kernels, eval-mode batches are packed (also under a chunk_size they fit in)."""
    from st_mamba.ops import cpu

    if not cpu.available():
        pytest.skip("the compiled CPU kernels did not build here")
    model = st_mamba.from_config(tiny_config(1), tokenizer_dir, seed=0, pooling=pooling, chunk_size=500, device="cpu")
    encoder = encoder_of(model).eval()
    texts = random_texts(9, seed=6, max_words=70)
    with torch.no_grad():
        assert "cu_seqlens" in encoder.preprocess(texts)
        assert "cu_seqlens" not in encoder.preprocess(texts[:1])  # no padding to remove
    assert "cu_seqlens" not in encoder.preprocess(texts)  # autograd on: a training collator's call
    packed = model.encode(texts, batch_size=4, convert_to_tensor=True)
    encoder.train()  # preprocess pads in training mode
    features = encoder.preprocess(texts)
    with torch.no_grad():
        padded = torch.nn.functional.normalize(encoder.eval()(features)["sentence_embedding"], dim=-1)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    encoder.chunk_size = 4  # texts longer than a chunk: padded and streamed, not packed
    with torch.no_grad():
        assert "cu_seqlens" not in encoder.preprocess(texts)


# --- mean pooling -----------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "weighted-mean"])
@pytest.mark.parametrize("version", [1, 2], ids=["mamba1", "mamba2"])
def test_mean_pooling_is_the_masked_mean_on_every_path(tokenizer_dir, version, pooling):
    """Padded, packed and streamed batches all give the (weighted) mean over each text's tokens and its EOS."""
    model = st_mamba.from_config(tiny_config(version), tokenizer_dir, seed=0, pooling=pooling, device="cpu")
    enc = encoder_of(model)
    log_weights = torch.randn(tiny_config(version).vocab_size, generator=torch.Generator().manual_seed(3))
    if pooling == "weighted-mean":
        with torch.no_grad():
            enc.token_log_weights.copy_(log_weights)
    texts = random_texts(5, seed=4, max_words=50)
    features = enc.preprocess(texts)
    ids, mask = features["input_ids"], features["attention_mask"]
    with torch.no_grad():
        hidden = enc.backbone(ids)
        expected = []
        for row in range(len(texts)):
            length = int(mask[row].sum())
            weights = log_weights[ids[row, :length]].exp() if pooling == "weighted-mean" else torch.ones(length)
            expected.append((hidden[row, :length] * weights[:, None]).sum(0) / weights.sum())
        expected = torch.stack(expected)
        padded = enc(dict(features))["sentence_embedding"]
        packed = enc(enc._pack(ids, mask, torch.device("cpu")))["sentence_embedding"]
        enc.chunk_size = 7
        streamed = enc(dict(features))["sentence_embedding"]
    torch.testing.assert_close(padded, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(streamed, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(padded, hidden[torch.arange(len(texts)), mask.sum(1) - 1])  # not the EOS state


@pytest.mark.parametrize("pooling", ["mean", "weighted-mean"])
def test_mean_pooling_survives_save_and_load(tokenizer_dir, tmp_path, pooling):
    model = st_mamba.from_config(tiny_config(1), tokenizer_dir, seed=0, pooling=pooling, device="cpu")
    if pooling == "weighted-mean":
        with torch.no_grad():
            encoder_of(model).token_log_weights.normal_(generator=torch.Generator().manual_seed(1))
    texts = random_texts(4, seed=5)
    model.save(str(tmp_path / "m"))
    loaded = SentenceTransformer(str(tmp_path / "m"), trust_remote_code=True, device="cpu")
    assert encoder_of(loaded).pooling == pooling
    np.testing.assert_array_equal(model.encode(texts), loaded.encode(texts))


def test_token_weights_are_learned_and_their_file_is_checked(tokenizer_dir, tmp_path):
    model = st_mamba.from_config(tiny_config(1), tokenizer_dir, seed=0, pooling="weighted-mean", device="cpu")
    enc = encoder_of(model).train()
    features = enc.preprocess(random_texts(3, seed=2))
    enc(features)["sentence_embedding"].square().sum().backward()
    grad = enc.token_log_weights.grad
    read = features["input_ids"][features["attention_mask"].bool()].unique()
    assert grad[read].abs().sum() > 0  # every token read gets a gradient...
    unread = torch.ones_like(grad, dtype=torch.bool)
    unread[read] = False
    assert not grad[unread].any()  # ...and no other
    model.save(str(tmp_path / "m"))
    weights = tmp_path / "m" / MambaEncoder.weights_file_name
    from safetensors.torch import save_file

    save_file({"token_log_weights": torch.zeros(7)}, str(weights))
    with pytest.raises(CheckpointError, match="holds \\(7,\\) token weights"):
        MambaEncoder.load(str(tmp_path / "m"))
    weights.unlink()
    with pytest.raises(CheckpointError, match="weighted-mean pooling but has no token_weights.safetensors"):
        MambaEncoder.load(str(tmp_path / "m"))


def test_unknown_pooling_is_refused(tokenizer_dir):
    with pytest.raises(ValueError, match="pooling must be one of"):
        st_mamba.from_config(tiny_config(1), tokenizer_dir, pooling="max")


def test_do_lower_case_makes_the_embedding_blind_to_case_and_is_saved(tokenizer_dir, tmp_path):
    texts = ["The Quick Brown Fox", "THE QUICK BROWN FOX", "the quick brown fox"]
    cased = st_mamba.from_config(tiny_config(1), tokenizer_dir, seed=0, device="cpu")
    assert not encoder_of(cased).do_lower_case  # the default keeps the tokenizer's own behaviour
    assert not np.allclose(*cased.encode(texts[1:]))
    uncased = st_mamba.from_config(tiny_config(1), tokenizer_dir, seed=0, do_lower_case=True, device="cpu")
    embeddings = uncased.encode(texts)
    np.testing.assert_array_equal(embeddings[0], embeddings[2])
    np.testing.assert_array_equal(embeddings[1], embeddings[2])
    # the prompt is lower-cased with the text, as Sentence-Transformers' uncased Transformer module does
    assert (
        encoder_of(uncased).preprocess(["X"], prompt="Query: ")["input_ids"].tolist()
        == encoder_of(uncased).preprocess(["query: x"])["input_ids"].tolist()
    )
    uncased.save(str(tmp_path / "m"))
    loaded = SentenceTransformer(str(tmp_path / "m"), trust_remote_code=True, device="cpu")
    assert encoder_of(loaded).do_lower_case
    np.testing.assert_array_equal(loaded.encode(texts), embeddings)


def test_token_ids_equal_the_tokenizers_own_call(tokenizer_dir):
    """The encoder's direct call of the fast tokenizer gives the ids that transformers' call gives, cut alike; with
    truncation set on the tokenizer itself (transformers leaves it set after a truncating call), the encoder goes
    through transformers' call, which resets it."""
    import copy

    encoder = encoder_of(st_mamba.from_config(tiny_config(1), tokenizer_dir, seed=0, device="cpu"))
    backend = encoder.tokenizer._tokenizer
    assert encoder.tokenizer.is_fast and backend.truncation is None and backend.padding is None  # the direct call
    texts = random_texts(40, seed=8, max_words=60) + ["", " ", "naïve café, 東京\n\tx", "a" * 300]
    for limit in (None, 1, 7, 40):
        reference = copy.deepcopy(encoder.tokenizer)(
            texts, add_special_tokens=False, truncation=limit is not None, max_length=limit
        )["input_ids"]
        assert encoder._token_ids(texts, limit) == reference
    assert encoder._token_ids(texts, 0) == [[] for _ in texts]
    full = encoder._token_ids(texts, None)
    backend.enable_truncation(3)
    assert encoder._token_ids(texts, None) == full and backend.truncation is None


def _fold_whitespace_reference(text: str) -> str:
    """The rule written plainly: strip, then each run of whitespace as a line break if it holds one, else a space."""
    breaks = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
    return re.sub(r"\s+", lambda run: "\n" if any(c in breaks for c in run[0]) else " ", text.strip())


def test_whitespace_folds_as_the_plain_rule_on_random_texts():
    """``module._fold_whitespace`` (linear, no call per run) against the plain rule, on random texts drawn from
    letters and every whitespace character there is (line breaks among them), runs of any length."""
    from st_mamba.module import _fold_whitespace

    spaces = [chr(c) for c in range(0x110000) if chr(c).isspace()]
    assert len(spaces) == 29 and set(re.findall(r"\s", "".join(map(chr, range(0x110000))))) == set(spaces)
    rng = np.random.default_rng(11)
    for _ in range(3000):
        pieces = []
        for _ in range(rng.integers(0, 12)):
            pool = spaces if rng.random() < 0.5 else list("ab\u00e9Z.")
            pieces += rng.choice(pool, size=rng.integers(1, 6)).tolist()
        text = "".join(pieces)
        assert _fold_whitespace(text) == _fold_whitespace_reference(text), repr(text)
    long_run = "a" + " \t" * 200_000 + "\r\n" + " " * 200_000 + "b"  # linear time: no backtracking over runs
    assert _fold_whitespace(long_run) == "a\nb"


def test_normalize_whitespace_and_add_prefix_space_are_applied_and_saved(tokenizer_dir, tmp_path):
    texts = ["pain relief after surgery", "  pain\trelief \t after   surgery ", "pain  relief after surgery"]
    plain = st_mamba.from_config(tiny_config(1), tokenizer_dir, seed=0, device="cpu")
    assert not encoder_of(plain).normalize_whitespace and not encoder_of(plain).add_prefix_space  # the defaults
    assert not np.allclose(*plain.encode(texts[::2]))  # GPT-NeoX reads two spaces as another token
    model = st_mamba.from_config(tiny_config(1), tokenizer_dir, seed=0, normalize_whitespace=True,
                                 add_prefix_space=True, device="cpu")  # fmt: skip
    encoder = encoder_of(model)
    assert [encoder.prepare_text(text) for text in texts] == [" pain relief after surgery"] * 3
    assert encoder.prepare_text("") == "" and encoder.prepare_text(" \n ") == ""  # an empty text stays empty
    # a run of whitespace with a line break in it is one line break: lines (a transcript's turns) stay lines
    assert encoder.prepare_text("A: hi .  \n\n B: yes\r\nC:\u2028ok\t") == " A: hi .\nB: yes\nC:\nok"
    # the first word is read as the token it is inside a text, the same ids as the text after a space
    tokens = encoder.preprocess(["pain"])["input_ids"][0].tolist()
    assert tokens == encoder_of(plain).preprocess([" pain"])["input_ids"][0].tolist()
    assert tokens != encoder_of(plain).preprocess(["pain"])["input_ids"][0].tolist()
    embeddings = model.encode(texts)
    np.testing.assert_array_equal(embeddings[0], embeddings[1])
    np.testing.assert_array_equal(embeddings[0], embeddings[2])
    # the prompt is part of the text that is prepared
    assert encoder.prepare_text("query:  " + "x") == " query: x"
    model.save(str(tmp_path / "m"))
    loaded = SentenceTransformer(str(tmp_path / "m"), trust_remote_code=True, device="cpu")
    assert encoder_of(loaded).normalize_whitespace and encoder_of(loaded).add_prefix_space
    np.testing.assert_array_equal(loaded.encode(texts), embeddings)
