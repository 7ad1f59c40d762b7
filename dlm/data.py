"""Data: the embedded Shakespeare corpus or the user's text, tokenizers, and batch streams.

- ``load_documents(spec)``: (train, validation) lists of documents. "shakespeare" is the corpus
  shipped in ``dlm/corpus/`` (42 works; the last two in WORKS.tsv are the validation set: whole
  works are held out, never random lines). A path is a text file or a directory of them.
- ``CharTokenizer``: one id per character of the training text, then <pad> and <mask>.
  ``HFTokenizer``: any Hugging Face ``tokenizers`` JSON file (when that package is installed).
- ``TokenStream``: the documents as one token array cut into fixed-length windows, shuffled per
  epoch; its position (epoch, index) is saved in checkpoints so that a resumed run sees exactly
  the batches an uninterrupted one would. With packing it also returns where documents start
  inside each batch (cu_seqlens) so attention stays within a document.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

CORPUS = "shakespeare"
TEXT_SUFFIXES = (".txt", ".md", ".text", ".py", ".rst", ".tex", ".json", ".csv", ".tsv", "")


@dataclass
class Document:
    title: str
    text: str


def _corpus_file(name: str):
    return resources.files("dlm").joinpath("corpus", name)


def shakespeare_works() -> list[Document]:
    """The 42 works of the embedded corpus, in WORKS.tsv order."""
    raw = gzip.decompress(_corpus_file("shakespeare.txt.gz").read_bytes())
    rows = [line.split("\t") for line in _corpus_file("WORKS.tsv").read_text().splitlines()[1:]]
    docs, off = [], 0
    for _, title, n in rows:
        n = int(n)
        docs.append(Document(title, raw[off : off + n].decode("ascii")))
        off += n + 2  # the works are separated by one blank line ("\n\n")
    if off - 2 != len(raw):
        raise RuntimeError(f"corpus has {len(raw)} bytes but WORKS.tsv accounts for {off - 2}")
    return docs


def load_documents(spec: str = CORPUS, val_fraction: float = 0.1):
    """(train_docs, val_docs) for "shakespeare" or a path (text file or directory).

    Whole documents are held out: the last two works of the corpus; for a directory, the last
    files in sorted order holding ``val_fraction`` of the text; a single file is split at the
    paragraph boundary nearest ``1 - val_fraction`` of its length.
    """
    if spec == CORPUS:
        docs = shakespeare_works()
        return docs[:-2], docs[-2:]
    if not val_fraction > 0:
        raise ValueError(f"data.val_fraction (--val-fraction) must be > 0 for {spec!r}: "
                         "training reports the ELBO of a held-out split")  # fmt: skip
    if os.path.isdir(spec):
        paths = []
        for root, dirs, files in os.walk(spec):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .venv, ...: not data
            paths += [
                os.path.join(root, f)
                for f in files
                if os.path.splitext(f)[1].lower() in TEXT_SUFFIXES and not f.startswith(".")
            ]
        paths.sort()
        docs = [Document(os.path.relpath(p, spec), _read_text(p)) for p in paths]
        docs = [d for d in docs if d.text]
        if not docs:
            raise ValueError(f"data: no text files found under {spec!r}")
        if len(docs) == 1:
            return _split_text(docs[0], val_fraction)
        total, n_val, acc = sum(len(d.text) for d in docs), 0, 0
        while n_val < len(docs) - 1 and acc < val_fraction * total:
            n_val += 1
            acc += len(docs[-n_val].text)
        return docs[:-n_val], docs[-n_val:]
    if os.path.isfile(spec):
        return _split_text(Document(os.path.basename(spec), _read_text(spec)), val_fraction)
    raise ValueError(
        f"data.data (--data) must be {CORPUS!r}, an existing text file or a directory; got {spec!r}"
    )


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _split_text(doc: Document, val_fraction: float):
    cut = int(len(doc.text) * (1 - val_fraction))
    # The paragraph break nearest the cut, on either side, if one lies within a tenth of the
    # held-out share of it (else the exact cut: a far break would skew the split).
    reach = max(1, int(len(doc.text) * val_fraction / 10))
    before = doc.text.rfind("\n\n", max(0, cut - reach), cut)
    after = doc.text.find("\n\n", cut, cut + reach)
    near = [p for p in (before, after) if p > 0]
    if near:
        cut = min(near, key=lambda p: abs(p + 2 - cut)) + 2
    if cut <= 0 or cut >= len(doc.text):
        raise ValueError(f"data: {doc.title!r} is too short to split into train and validation")
    return [Document(doc.title, doc.text[:cut])], [Document(doc.title + " (val)", doc.text[cut:])]


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


def words_of(text: str) -> list[str]:
    """The words of ``text`` (letters, inner apostrophes: "o'er", "king's"), lower-cased."""
    return [w.lower() for w in _WORD.findall(text)]


def real_word_fraction(texts: list[str], lexicon: set[str]) -> tuple[float, int]:
    """(fraction of the words of ``texts`` found in ``lexicon``, number of words).

    The demo's yardstick for "most words are real words": a sampled word counts as real when
    it occurs in the corpus the model was trained on. 0.0 for texts without words."""
    ws = [w for t in texts for w in words_of(t)]
    return (sum(w in lexicon for w in ws) / len(ws) if ws else 0.0), len(ws)


def lexicon(docs: list[Document]) -> set[str]:
    """Every word of ``docs`` (see ``words_of``)."""
    out: set[str] = set()
    for d in docs:
        out.update(words_of(d.text))
    return out


class CharTokenizer:
    """Characters -> ids 0..n-1 (sorted), then <pad> = n, <mask> = n + 1.

    Characters outside the vocabulary encode as "?" (or the first character if there is no
    "?"): a character model cannot represent what it never saw.
    """

    kind = "char"

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.pad_token_id = len(self.chars)
        self.mask_token_id = len(self.chars) + 1
        self.vocab_size = len(self.chars) + 2
        self._unk = self.stoi.get("?", 0)
        self._lut = np.full(65536, self._unk, dtype=np.int64)
        for c, i in self.stoi.items():
            if ord(c) < 65536:
                self._lut[ord(c)] = i

    @classmethod
    def from_documents(cls, docs: list[Document]) -> CharTokenizer:
        return cls("".join(sorted(set("".join(d.text for d in docs)))))

    def encode(self, text: str) -> np.ndarray:
        if text.isascii():
            return self._lut[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
        return np.array([self.stoi.get(c, self._unk) for c in text], dtype=np.int64)

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            i = int(i)
            out.append(
                self.chars[i] if i < len(self.chars) else ("_" if i == self.mask_token_id else "")
            )
        return "".join(out)

    @property
    def special_ids(self) -> list[int]:
        return [self.pad_token_id, self.mask_token_id]

    def is_special(self, i: int) -> bool:
        return i in self.special_ids

    def to_json(self) -> str:
        return json.dumps({"kind": "char", "chars": self.chars})


class HFTokenizer:
    """A Hugging Face ``tokenizers`` JSON file. Its mask token is the first of [MASK], <mask>,
    <|mask|> it knows; if none, "<|mask|>" is added as a special token (likewise <|pad|>)."""

    kind = "hf"

    def __init__(self, path: str, content: str | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError(
                "tokenizer files need the `tokenizers` package: pip install tokenizers"
            ) from e
        self.path = path
        if content is not None:  # the file's JSON as a checkpoint stores it
            self.tok = Tokenizer.from_str(content)
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path!r} not found")
        else:
            self.tok = Tokenizer.from_file(path)
        self.mask_token_id = self._special(
            ("[MASK]", "<mask>", "<|mask|>", "<|mdm_mask|>"), "<|mask|>"
        )  # <|mdm_mask|>: LLaDA's (126336)
        self.pad_token_id = self._special(("[PAD]", "<pad>", "<|pad|>", "<|endoftext|>"), "<|pad|>")
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def _special(self, names, new):
        for n in names:
            i = self.tok.token_to_id(n)
            if i is not None:
                return i
        self.tok.add_special_tokens([new])
        return self.tok.token_to_id(new)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def special_ids(self) -> list[int]:
        return [self.pad_token_id, self.mask_token_id]

    def is_special(self, i: int) -> bool:
        """Whether id i is a special (added) token of the file, never produced from text."""
        tok = self.tok.get_added_tokens_decoder().get(int(i))
        return i in self.special_ids or bool(tok is not None and tok.special)

    def to_json(self) -> str:
        # The tokenizer itself (with the mask / pad tokens added above), not only its path: a
        # checkpoint must stay usable when the file moves (most tokenizer files are a few MB).
        # ensure_ascii=False: the safetensors header escapes the string once more; escaping
        # here too doubled a CJK vocabulary's size (the header's limit is 100 MB).
        return json.dumps({"kind": "hf", "path": os.path.abspath(self.path),
                           "json": self.tok.to_str()}, ensure_ascii=False)  # fmt: skip


def build_tokenizer(spec: str, train_docs: list[Document], val_docs: list[Document]):
    """ "char" (vocabulary from every document, so validation has no unknown characters) or a
    tokenizers JSON path."""
    if spec == "char":
        return CharTokenizer.from_documents(train_docs + val_docs)
    if not os.path.isfile(spec):
        raise FileNotFoundError(
            f"data.tokenizer (--tokenizer) must be 'char' or a tokenizers .json file; "
            f"no such file: {spec!r}"
        )
    return HFTokenizer(spec)


def tokenizer_from_json(s: str):
    d = json.loads(s)
    if d["kind"] == "char":
        return CharTokenizer(d["chars"])
    if "json" in d:
        return HFTokenizer(d["path"], content=d["json"])
    if not os.path.isfile(d["path"]):  # a checkpoint from before the tokenizer was stored
        raise FileNotFoundError(f"the checkpoint's tokenizer file {d['path']!r} is gone (this "
                                "checkpoint stores only its path): put it back there")  # fmt: skip
    return HFTokenizer(d["path"])


# ---------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------
@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, S) int64 clean tokens x0
    position_ids: torch.Tensor | None = None  # (B, S) int64, restarting per document (packing)
    cu_seqlens: torch.Tensor | None = None  # (n_docs + 1,) int32 over the flattened B * S tokens
    max_seqlen: int | None = None


def _torch_seed(v: int) -> int:
    """v as torch.manual_seed reads it (negatives remapped as torch does), reduced mod 2**64
    beyond its range instead of raising: the same stream wherever torch accepted v."""
    if v < 0:
        v += 0xFFFF_FFFF_FFFF_FFFF
    return v % 2**64


class TokenStream:
    """Fixed-length windows over the concatenated documents, a fresh shuffle every epoch.

    Epoch e cuts the token array at offset o_e (drawn from the seed and e) into windows of
    ``seq_len`` and visits them in a permutation drawn from the seed and e. ``next_batch(n)``
    returns the next n windows; the position (epoch, index) is all the state there is, so
    ``state_dict``/``load_state_dict`` make a resumed run see the same batches. Under DDP
    every process walks the same stream and keeps its own rows of each global batch.
    """

    def __init__(self, docs: list[Document], tokenizer, seq_len: int, seed: int = 0):
        self.seq_len, self.seed = seq_len, seed
        parts, starts, n = [], [], 0
        for d in docs:
            ids = tokenizer.encode(d.text)
            starts.append(n)
            parts.append(ids)
            n += len(ids)
        self.tokens = torch.from_numpy(np.concatenate(parts))
        self.doc_starts = torch.tensor(starts, dtype=torch.long)
        self.n_chars = sum(len(d.text) for d in docs)
        if len(self.tokens) < 2 * seq_len:
            raise ValueError(f"data: {len(self.tokens)} tokens is too few for seq_len {seq_len}: "
                             f"at least 2 x seq_len ({2 * seq_len}) are needed")  # fmt: skip
        self.epoch, self.index = 0, 0
        self._order = None

    def _epoch_plan(self):
        g = torch.Generator().manual_seed(_torch_seed(self.seed * 1_000_003 + self.epoch))
        offset = int(torch.randint(0, self.seq_len, (1,), generator=g))
        n_windows = (len(self.tokens) - offset) // self.seq_len
        self._order = (offset, torch.randperm(n_windows, generator=g))

    def next_windows(self, n: int) -> torch.Tensor:
        """Start offsets of the next n windows (crossing into the next epoch when needed)."""
        out = []
        while len(out) < n:
            if self._order is None:
                self._epoch_plan()
            offset, perm = self._order
            take = perm[self.index : self.index + n - len(out)]
            out.extend((offset + take * self.seq_len).tolist())
            self.index += len(take)
            if self.index >= len(perm):
                self.epoch, self.index, self._order = self.epoch + 1, 0, None
        return torch.tensor(out, dtype=torch.long)

    def next_batch(self, n: int, packing: bool = False, rows: slice | None = None) -> Batch:
        """The next n windows as a Batch; ``rows`` keeps a slice of them (this process's share)."""
        starts = self.next_windows(n)
        if rows is not None:
            starts = starts[rows]
        return self.batch_at(starts, packing)

    def batch_at(self, starts: torch.Tensor, packing: bool = False) -> Batch:
        idx = starts[:, None] + torch.arange(self.seq_len)
        x = self.tokens[idx]
        if not packing:
            return Batch(x)
        # Document id of every token; a row start or a document start begins a new segment.
        doc = torch.searchsorted(self.doc_starts, idx, right=True)
        new = torch.ones_like(doc, dtype=torch.bool)
        new[:, 1:] = doc[:, 1:] != doc[:, :-1]
        flat_new = new.flatten()
        seg_starts = flat_new.nonzero().flatten()
        cu = torch.cat([seg_starts, torch.tensor([flat_new.numel()])]).to(torch.int32)
        seg_id = flat_new.long().cumsum(0) - 1
        pos = torch.arange(flat_new.numel()) - seg_starts[seg_id]
        max_len = int((cu[1:] - cu[:-1]).max())
        return Batch(x, pos.view_as(x), cu, max_len)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.index, self.seed = int(d["epoch"]), int(d["index"]), int(d["seed"])
        self._order = None

    def eval_windows(self, n: int) -> torch.Tensor:
        """n window starts spread evenly over the whole stream (fixed: comparable evaluations)."""
        last = len(self.tokens) - self.seq_len
        n = min(n, last // self.seq_len + 1)
        return torch.linspace(0, last, n).long()
