"""The synthetic binding task the embedded reference model is trained on.

A context is a list of *chunks*; a chunk is a run of assignment records `x = y` (3 tokens each).
`y` is either a literal digit (`a = 7`) or the name of a variable defined earlier in the context
(`d = a`: d takes a's value).  A question `? = g` asks for g's value (one digit).  Every record is
self-delimiting, so the model never sees where chunks begin or end; the benchmark cuts contexts at
record boundaries.

Why this needs binding *at the chunk tokens*: with `a = 5` in chunk 1, `d = a` in chunk 2 and
`g = d` in chunk 3, the question `? = g` is a 3-hop chain.  A 3-layer decoder cannot follow three
lookups from the question alone (layer 0 marks each right-hand side with the variable it defines,
so only layers 1 and 2 can look something up at question time).  It answers by resolving `a` at the
right-hand side of `d = a` in layer 1 (chunk 2's tokens attend back into chunk 1) and reading that
resolved value from chunk 2 in layer 2.  Encoded alone, chunk 2 cannot resolve `a`: blind reuse
keeps single lookups and 2-hop chains (followed at question time) but loses 3-hop chains.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Sequence

# ------------------------------------------------------------------------------------- vocabulary
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
PUNCT = ["=", "?"]
VALUES = [str(i) for i in range(10)]
NAMES = list(string.ascii_lowercase) + list(string.ascii_uppercase)       # 52 variable names
VOCAB: list[str] = SPECIALS + PUNCT + VALUES + NAMES
TOKEN_ID: dict[str, int] = {t: i for i, t in enumerate(VOCAB)}
VOCAB_SIZE = 128                      # embedding rows (padded; ids >= len(VOCAB) are never produced)
PAD, UNK, BOS, EOS = (TOKEN_ID[t] for t in SPECIALS)
EQ, Q = TOKEN_ID["="], TOKEN_ID["?"]
VALUE_IDS = [TOKEN_ID[v] for v in VALUES]
NAME_IDS = [TOKEN_ID[n] for n in NAMES]
MAX_DEPTH = 3                         # hops from a question to its literal


def encode(text: str) -> list[int]:
    """Whitespace-separated words -> ids (what the saved tokenizer does)."""
    return [TOKEN_ID.get(w, UNK) for w in text.split()]


def decode(ids: Sequence[int]) -> str:
    return " ".join(VOCAB[i] if i < len(VOCAB) else "<unk>" for i in ids)


# ------------------------------------------------------------------------------------- examples
@dataclass
class Record:
    name: str
    rhs: str           # a digit or a variable name
    chunk: int


@dataclass
class Question:
    name: str
    answer: str
    depth: int         # 1 = single lookup; 3 = chain across three records
    chunk: int         # the chunk defining `name`
    chunks_spanned: int  # distinct chunks the chain passes through

    @property
    def tokens(self) -> list[int]:
        return [Q, EQ, TOKEN_ID[self.name]]

    @property
    def answer_id(self) -> int:
        return TOKEN_ID[self.answer]


@dataclass
class Example:
    chunks: list[list[Record]]
    questions: list[Question] = field(default_factory=list)

    def chunk_tokens(self, i: int) -> list[int]:
        return [TOKEN_ID[t] for r in self.chunks[i] for t in (r.name, "=", r.rhs)]

    @property
    def context_tokens(self) -> list[int]:
        return [t for i in range(len(self.chunks)) for t in self.chunk_tokens(i)]

    def text(self) -> str:
        return " | ".join(" ".join(f"{r.name} = {r.rhs}" for r in c) for c in self.chunks)

    def resolve(self) -> dict[str, tuple[str, int, int]]:
        """name -> (value, depth, chunks spanned) for every defined variable."""
        defs = {r.name: r for c in self.chunks for r in c}
        out: dict[str, tuple[str, int, int]] = {}
        for name in defs:
            depth, cur, seen = 1, defs[name], {defs[name].chunk}
            while cur.rhs in defs:
                cur = defs[cur.rhs]
                depth += 1
                seen.add(cur.chunk)
            out[name] = (cur.rhs, depth, len(seen))
        return out

    def make_questions(self, names: Sequence[str]) -> list[Question]:
        res = self.resolve()
        chunk_of = {r.name: r.chunk for c in self.chunks for r in c}
        return [Question(n, res[n][0], res[n][1], chunk_of[n], res[n][2]) for n in names]


def _depths(records: list[Record]) -> dict[str, int]:
    defs = {r.name: r for r in records}
    out = {}
    for r in records:
        d, cur = 1, r
        while cur.rhs in defs:
            cur, d = defs[cur.rhs], d + 1
        out[r.name] = d
    return out


def random_example(rng: random.Random, *, n_chunks: int, n_records: Sequence[int] | int,
                   ref_frac: tuple[float, float] = (0.0, 0.5), in_chunk_ref: float = 0.15,
                   max_depth: int = MAX_DEPTH) -> Example:
    """A random context for training: chunk 0 holds literals only; each later record is a literal
    or (with probability drawn from `ref_frac`) a reference to a variable defined before it —
    usually in an earlier chunk, sometimes (`in_chunk_ref`) earlier in the same chunk — whose chain
    stays within `max_depth` hops.  Deeper targets are preferred so that 3-hop chains are common."""
    sizes = [n_records] * n_chunks if isinstance(n_records, int) else list(n_records)
    names = rng.sample(NAMES, sum(sizes))
    chunks: list[list[Record]] = []
    depth: dict[str, int] = {}
    k = 0
    for c, size in enumerate(sizes):
        p_ref = rng.uniform(*ref_frac) if c else 0.0
        recs: list[Record] = []
        for _ in range(size):
            name = names[k]
            k += 1
            earlier = [n for cc in chunks for r in cc for n in [r.name] if depth[n] < max_depth]
            local = [r.name for r in recs if depth[r.name] < max_depth]
            pool = local if (local and rng.random() < in_chunk_ref) else earlier
            if pool and rng.random() < p_ref:
                w = [1.0 + 2.0 * (depth[n] - 1) for n in pool]
                tgt = rng.choices(pool, weights=w)[0]
                recs.append(Record(name, tgt, c))
                depth[name] = depth[tgt] + 1
            else:
                recs.append(Record(name, rng.choice(VALUES), c))
                depth[name] = 1
        # in-chunk references must stay after their target: shuffle only literal-free order safely
        chunks.append(_shuffle_keep_deps(rng, recs))
    return Example(chunks)


def _shuffle_keep_deps(rng: random.Random, recs: list[Record]) -> list[Record]:
    """Random order of a chunk's records in which an in-chunk target precedes its reference."""
    names = {r.name for r in recs}
    placed: list[Record] = []
    done: set[str] = set()
    todo = recs[:]
    while todo:
        ready = [r for r in todo if r.rhs not in names or r.rhs in done]
        r = rng.choice(ready)
        placed.append(r)
        done.add(r.name)
        todo.remove(r)
    return placed


def bench_example(rng: random.Random, *, n_records: int = 12, n_refs: int = 3) -> Example:
    """The benchmark's 3-chunk context.

    chunk 0: `n_records` literals.
    chunk 1: `n_refs` references to distinct chunk-0 variables (2-hop), the rest literals.
    chunk 2: `n_refs` references to chunk 1's references (3-hop chains across all three chunks),
             `n_refs` references to literals of chunks 0/1 (2-hop), the rest literals.
    """
    assert n_records >= 2 * n_refs + 1
    names = rng.sample(NAMES, 3 * n_records)
    c0 = [Record(names[i], rng.choice(VALUES), 0) for i in range(n_records)]
    n1 = names[n_records:2 * n_records]
    tgt1 = rng.sample([r.name for r in c0], n_refs)
    c1 = [Record(n1[i], tgt1[i], 1) for i in range(n_refs)]
    c1 += [Record(n, rng.choice(VALUES), 1) for n in n1[n_refs:]]
    n2 = names[2 * n_records:]
    lits01 = [r.name for r in c0 if r.name not in tgt1] + [r.name for r in c1[n_refs:]]
    c2 = [Record(n2[i], c1[i].name, 2) for i in range(n_refs)]
    c2 += [Record(n2[n_refs + i], t, 2) for i, t in enumerate(rng.sample(lits01, n_refs))]
    c2 += [Record(n, rng.choice(VALUES), 2) for n in n2[2 * n_refs:]]
    for c in (c0, c1, c2):
        rng.shuffle(c)
    ex = Example([c0, c1, c2])
    res = ex.resolve()
    ex.questions = ex.make_questions([r.name for c in ex.chunks for r in c])
    assert all(res[q.name][1] == q.depth for q in ex.questions)
    return ex


def reorder_example(rng: random.Random, *, n_records: int = 12, n_refs: int = 3) -> Example:
    """A context whose first two chunks are independent, so both orders are meaningful.

    chunk 0 and chunk 1: literals only.  chunk 2: `n_refs` records `d = a` to chunk-0 literals,
    each followed later in the same chunk by `g = d` (3-hop chains bound to chunk 0 at chunk 2's
    tokens), `n_refs` references to chunk-1 literals (2-hop), the rest literals.  The benchmark
    swaps chunks 0 and 1.
    """
    assert n_records >= 3 * n_refs + 1
    names = rng.sample(NAMES, 3 * n_records)
    c0 = [Record(names[i], rng.choice(VALUES), 0) for i in range(n_records)]
    c1 = [Record(names[n_records + i], rng.choice(VALUES), 1) for i in range(n_records)]
    n2 = names[2 * n_records:]
    mids = [Record(n2[i], t, 2) for i, t in enumerate(rng.sample([r.name for r in c0], n_refs))]
    tops = [Record(n2[n_refs + i], mids[i].name, 2) for i in range(n_refs)]
    twos = [Record(n2[2 * n_refs + i], t, 2) for i, t in enumerate(rng.sample([r.name for r in c1], n_refs))]
    lits = [Record(n, rng.choice(VALUES), 2) for n in n2[3 * n_refs:]]
    rng.shuffle(c0)
    rng.shuffle(c1)
    ex = Example([c0, c1, _shuffle_keep_deps(rng, mids + tops + twos + lits)])
    ex.questions = ex.make_questions([r.name for c in ex.chunks for r in c])
    return ex


# ------------------------------------------------------------------------------------- tokenizer
def build_tokenizer():
    """A `tokenizers` WordLevel tokenizer over `VOCAB` (whitespace split), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(TOKEN_ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)   # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>", add_bos_token=False,
                                   model_max_length=512, clean_up_tokenization_spaces=False)
