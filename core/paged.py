"""The paged KV cache: fixed-size blocks, per-sequence block tables, and the prefix cache.

A sequence's keys and values live in blocks of `block_size` positions taken from one pool shared by every
sequence; its block table lists them in position order, so position p is slot p % block_size of block
table[p // block_size]. Nothing is reserved up front for a request's maximum length: blocks are taken as
positions are written, and given back when the request ends (or is preempted).

A full block is also remembered by the content it holds (a hash chained over every token id from the start
of the sequence), so that a later request whose prompt begins with the same tokens — a system prompt, the
earlier turns of a chat — points its table at those blocks instead of computing them again. A freed block
keeps its content until the pool needs it for something else (least recently freed first).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import attrs
import numpy as np

from .errors import GenerationError


def block_hash(parent: bytes | None, tokens) -> bytes:
    """Content key of a full block: sha256 over its parent's key and its token ids (int64).

    A cryptographic hash because the key decides whose keys and values a request attends to: a collision
    between two users' prompts would show one of them the other's cache.
    """
    h = hashlib.sha256(parent or b"\0")
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.digest()


class BlockPool:
    """Which KV blocks are in use (by how many sequences), which are free, and the prefix cache over them.

    >>> pool = BlockPool(num_blocks=8, block_size=4)
    >>> pool.allocate(2)
    [0, 1]
    >>> pool.num_free
    6
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise GenerationError(f"a KV pool needs at least one block of at least one position "
                                  f"(num_blocks={num_blocks}, block_size={block_size})")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.refs = [0] * num_blocks
        # Free blocks in eviction order (first = reused first). Never-used blocks come before cached ones, and a
        # freed block goes to the end, so cached content survives as long as the pool allows.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}
        self.hits = 0  # blocks found in the prefix cache (counted per request token block, for /metrics)
        self.queries = 0  # full prompt blocks looked up

    @property
    def num_free(self) -> int:
        """Blocks no sequence holds (cached ones included: they are reusable)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks whose content is remembered by the prefix cache (held or free)."""
        return len(self._by_hash)

    def allocate(self, n: int) -> list[int] | None:
        """n blocks for one sequence (each with reference count 1), or None (and nothing taken) if too few are free."""
        if n > len(self._free):
            return None
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            h = self._hash_of.pop(b, None)  # its old content is overwritten: forget it
            if h is not None and self._by_hash.get(h) == b:
                del self._by_hash[h]
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks) -> None:
        """Drop one reference to each block; a block nobody holds becomes free (its cached content kept).

        Blocks are freed last-first, so that when the pool must evict, a sequence's tail goes before its
        head (the head is what later prompts share).
        """
        for b in reversed(list(blocks)):
            if self.refs[b] <= 0:
                raise GenerationError(f"KV block {b} released more often than it was taken")
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self._free[b] = None

    def match(self, tokens, count: bool = True) -> tuple[list[int], list[bytes]]:
        """The longest run of cached full blocks that `tokens` begins with: (blocks, their keys), each block
        taken (one more reference). Only blocks that end before the last token count, so that at least one
        token is always left to compute (its logits pick the next token). `count`: add the lookup to the
        hits / queries counters (the engine counts a lookup once, when the request is admitted)."""
        if not self.prefix_caching:
            return [], []
        bs, blocks, keys, parent = self.block_size, [], [], None
        full = (len(tokens) - 1) // bs
        for j in range(full):
            key = block_hash(parent, tokens[j * bs:(j + 1) * bs])
            b = self._by_hash.get(key)
            if b is None:
                break
            blocks.append(b)
            keys.append(key)
            parent = key
        for b in blocks:
            if self.refs[b] == 0:
                del self._free[b]
            self.refs[b] += 1
        if count:
            self.queries += full
            self.hits += len(blocks)
        return blocks, keys

    def remember(self, block: int, key: bytes) -> None:
        """Record that `block` now holds the full block with content key `key`."""
        if not self.prefix_caching or key in self._by_hash:
            return  # a block with this content is already known: keep that one
        self._hash_of[block] = key
        self._by_hash[key] = block

    def forget_all(self) -> None:
        """Drop the prefix cache (every free block becomes plain free space)."""
        self._hash_of.clear()
        self._by_hash.clear()


@attrs.define
class Segment:
    """One sequence's rows in a batched forward: rows row..row+n-1 are its tokens at positions start..start+n-1,
    stored through `table` (its block table); `logits` says whether its last row's logits are wanted."""

    row: int
    n: int
    start: int
    table: list
    logits: bool = True


@attrs.define
class Batch:
    """A forward step over several sequences at once, passed to the backend ops where a single sequence passes
    its first position (`start`): token positions, the segments, and the rows whose logits are returned.

    `tables` holds one RopeTable per segment when the rope table depends on the sequence length (dynamic NTK,
    longrope); otherwise None and the step's table serves every row.
    """

    segments: list
    block_size: int
    positions: np.ndarray = attrs.field(init=False)  # int64 [T]
    logit_rows: np.ndarray = attrs.field(init=False)  # int64 [number of segments with logits]
    tables: list | None = None

    def __attrs_post_init__(self):
        self.positions = np.concatenate([np.arange(s.start, s.start + s.n) for s in self.segments]).astype(np.int64) \
            if self.segments else np.zeros(0, np.int64)
        self.logit_rows = np.asarray([s.row + s.n - 1 for s in self.segments if s.logits], dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        """Rows in the step (all segments' tokens)."""
        return int(self.positions.size)

    @property
    def max_len(self) -> int:
        """The longest sequence length any segment reaches in this step."""
        return max(s.start + s.n for s in self.segments)

    def slots(self, seg: Segment) -> np.ndarray:
        """Flat cache slots (block * block_size + offset) of a segment's rows."""
        pos = np.arange(seg.start, seg.start + seg.n)
        table = np.asarray(seg.table, dtype=np.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size


@attrs.define
class PagedCache:
    """The numpy backend's block pools: per layer k and v, each [num_blocks * block_size, Hkv, Dh] (a block is
    block_size consecutive slots)."""

    k: list
    v: list
    block_size: int
    num_blocks: int

    def gather(self, layer: int, table, length: int) -> tuple[np.ndarray, np.ndarray]:
        """One sequence's keys and values [Hkv, length, Dh] of `layer`, read through its block table."""
        bs = self.block_size
        nb = -(-length // bs)
        idx = (np.asarray(table[:nb], dtype=np.int64)[:, None] * bs + np.arange(bs)[None, :]).reshape(-1)[:length]
        return self.k[layer][idx].transpose(1, 0, 2), self.v[layer][idx].transpose(1, 0, 2)
