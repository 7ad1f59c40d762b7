"""Data: the embedded corpus and its split, tokenizers, the batch stream and packing."""

import hashlib
import json
import os

import pytest
import torch

from dlm.data import (
    CharTokenizer,
    Document,
    TokenStream,
    build_tokenizer,
    load_documents,
    shakespeare_works,
    tokenizer_from_json,
)


def test_embedded_corpus_is_shipped_and_split_by_works():
    works = shakespeare_works()
    assert len(works) == 42
    text = "\n\n".join(w.text for w in works)
    # The sha256 from dlm/corpus/README.md: the embedded copy is intact.
    assert hashlib.sha256(text.encode()).hexdigest().startswith("04decea0dd965df5")
    train, val = load_documents("shakespeare")
    assert [d.title for d in val] == ["Two Gentlemen of Verona", "The Winter's Tale"]
    assert len(train) == 40 and val[1].text.startswith("THE WINTER'S TALE")
    assert not {d.title for d in train} & {d.title for d in val}


def test_char_tokenizer_roundtrip_and_specials():
    tok = CharTokenizer.from_documents([Document("a", "hello world\n"), Document("b", "Zebra!")])
    assert tok.vocab_size == len(set("hello world\nZebra!")) + 2
    ids = tok.encode("hello Zebra!")
    assert tok.decode(ids) == "hello Zebra!"
    assert tok.mask_token_id == tok.vocab_size - 1 and tok.pad_token_id == tok.vocab_size - 2
    assert tok.decode([tok.mask_token_id, tok.pad_token_id]) == "_"
    assert tokenizer_from_json(tok.to_json()).chars == tok.chars
    assert len(tok.encode("héllo")) == 5  # non-ASCII path; unknown characters still map


def test_hf_tokenizer_option():
    tokenizers = pytest.importorskip("tokenizers")  # optional dependency
    from tokenizers import models, pre_tokenizers

    t = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "dlm_test_tok.json")
    t.save(path)
    tok = build_tokenizer(path, [], [])
    assert tok.mask_token_id == 3 and tok.vocab_size >= 4
    assert tok.encode("a b a").tolist() == [0, 1, 0]
    # A checkpoint stores the tokenizer itself: it survives the file's move.
    saved = tok.to_json()
    os.remove(path)
    again = tokenizer_from_json(saved)
    assert again.encode("a b a").tolist() == [0, 1, 0]
    assert (again.mask_token_id, again.pad_token_id, again.vocab_size) == (
        tok.mask_token_id, tok.pad_token_id, tok.vocab_size)  # fmt: skip
    # An older checkpoint (its path only) whose file is gone: an error naming the file.
    with pytest.raises(FileNotFoundError, match="dlm_test_tok.json"):
        tokenizer_from_json(json.dumps({"kind": "hf", "path": path}))


def test_user_text_directory_and_file(tmp_path):
    for i in range(5):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n" * 50)
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    train, val = load_documents(str(tmp_path), val_fraction=0.3)
    assert [d.title for d in val] == ["doc3.txt", "doc4.txt"] and len(train) == 3
    one = tmp_path / "doc0.txt"
    train, val = load_documents(str(one), val_fraction=0.1)
    assert train[0].text + val[0].text == one.read_text()
    with pytest.raises(ValueError, match=r"--data\) must be .shakespeare., an existing text file"):
        load_documents(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="val_fraction"):
        load_documents(str(tmp_path), val_fraction=0.0)  # every file went to validation
    # Hidden folders (.git, .venv) are not data.
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "notes.txt").write_text("not a document\n" * 50)
    train, val = load_documents(str(tmp_path), val_fraction=0.3)
    assert all(not d.title.startswith(".git") for d in train + val) and len(train + val) == 5


def test_single_file_split_uses_a_paragraph_break_only_near_the_cut(tmp_path):
    far = tmp_path / "far.txt"
    far.write_text("intro\n\n" + "x" * 1000)  # the only break is 90% of the text away
    train, val = load_documents(str(far), val_fraction=0.1)
    assert len(val[0].text) == 1007 - int(1007 * 0.9)  # the exact cut
    near = tmp_path / "near.txt"
    near.write_text("a" * 895 + "\n\n" + "b" * 103)  # a break 3 characters before the cut
    train, val = load_documents(str(near), val_fraction=0.1)
    assert val[0].text == "b" * 103 and train[0].text.endswith("\n\n")


def _stream(seq_len=16, seed=0):
    docs = [Document(str(i), "abcdefghij"[i % 10] * (37 + 5 * i)) for i in range(12)]
    tok = CharTokenizer.from_documents(docs)
    return TokenStream(docs, tok, seq_len, seed), tok


def test_stream_covers_epoch_and_resumes_exactly():
    s, _ = _stream()
    n = (len(s.tokens) - 15) // 16  # windows per epoch, whatever the offset
    first = [s.next_windows(4) for _ in range(3)]
    state = s.state_dict()
    after = [s.next_windows(4) for _ in range(2 * n // 4)]  # crosses an epoch boundary
    s2, _ = _stream()
    s2.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(after, [s2.next_windows(4) for _ in after]))
    # Within an epoch every window appears once.
    fresh, _ = _stream()
    starts = fresh.next_windows(len(fresh._order[1]) if fresh._epoch_plan() is None else 0)
    assert len(set(starts.tolist())) == len(starts)
    assert first[0].tolist() != first[1].tolist()


def test_packing_boundaries_and_positions():
    s, _ = _stream(seq_len=50)
    b = s.batch_at(torch.tensor([30, 70]), packing=True)
    doc_starts = set(s.doc_starts.tolist())
    cu = b.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == 100 and 50 in cu  # row boundary always splits
    for a, e in zip(cu[:-1], cu[1:]):
        row, col = divmod(a, 50)
        start = [30, 70][row] + col
        assert col == 0 or start in doc_starts  # segments begin at rows or documents
        assert b.position_ids.flatten()[a:e].tolist() == list(range(e - a))
        seg = b.input_ids.flatten()[a:e]
        assert (seg == seg[0]).all()  # each toy document is a single repeated letter
    assert b.max_seqlen == max(e - a for a, e in zip(cu[:-1], cu[1:]))


def test_real_word_fraction():
    from dlm.data import Document, lexicon, real_word_fraction, words_of

    assert words_of("O'er the King's men, 'tis-done!") == [
        "o'er",
        "the",
        "king's",
        "men",
        "tis",
        "done",
    ]
    lex = lexicon([Document("t", "To be, or not to be: that is the question.")])
    assert lex == {"to", "be", "or", "not", "that", "is", "the", "question"}
    frac, n = real_word_fraction(["To bee or not", "tHE qestion"], lex)
    assert n == 6 and frac == 4 / 6
    assert real_word_fraction(["", " ,. "], lex) == (0.0, 0)


def test_llada_mask_token_is_recognised(tmp_path):
    # LLaDA's tokenizer names its mask <|mdm_mask|>: it is the mask, not a new <|mask|>, so a
    # run with LLaDA's mask id is not refused as "one of the tokenizer's own ids".
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    t = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens(["<|endoftext|>", "<|mdm_mask|>"])
    path = str(tmp_path / "tok.json")
    t.save(path)
    tok = build_tokenizer(path, [], [])
    assert tok.mask_token_id == t.token_to_id("<|mdm_mask|>") and tok.vocab_size == 5
    assert tok.is_special(tok.mask_token_id) and not tok.is_special(0)


def test_too_short_data_names_the_rule():
    docs = [Document("d", "abcdefghijkl")]  # 12 tokens: two windows of 8 need 16
    with pytest.raises(ValueError, match=r"12 tokens is too few for seq_len 8: at least 2 x "
                                         r"seq_len \(16\)"):  # fmt: skip
        TokenStream(docs, CharTokenizer.from_documents(docs), 8)
