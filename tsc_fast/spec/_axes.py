"""Union-find over tensor axes, with what discovery learns about each class of linked axes.

Every dimension of every traced tensor is described by a tuple of *pieces* ``(axis_id, block)``: the dimension is
the concatenation of the pieces, piece ``(a, b)`` covering ``size(a) * b`` entries in which unit ``u`` of axis
``a`` owns ``b`` consecutive entries. A plain dimension is one piece with block 1; flattening C x H x W gives
``((C, H * W),)``; concatenating channels gives several pieces. Linked axes are merged; a class of axes becomes a
permutation group unless it is fixed (model input/output, excluded modules, ...), has a single unit, or no
state_dict tensor depends on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ._types import AxisRef

Piece = tuple[int, int]
Dim = tuple[Piece, ...]


@dataclass
class AxisClass:
    """Everything known about one class of linked axes, gathered at the end of discovery."""

    root: int
    size: int
    fixed: str | None
    refs: list[AxisRef] = field(default_factory=list)
    requirements: list[tuple[object, str]] = field(default_factory=list)   # (node, why it must stay fixed)
    producers: list[str] = field(default_factory=list)                     # module paths creating these units
    residual_scopes: list[tuple[int, str]] = field(default_factory=list)   # (node order, scope) of residual adds
    first_seen: int = 1 << 62
    granularity: int = 1   # units move in whole blocks of this many axis entries (grouped conv, GroupNorm)


class AxisUnion:
    """Union-find over axes; per axis: size, fixedness (kept at the root), refs, requirements, producers."""

    def __init__(self, aliases: dict[str, str] | None = None):
        self.aliases = dict(aliases or {})   # alias name -> canonical name of a tied tensor
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: list[str | None] = []
        self.refs: dict[int, list[AxisRef]] = {}
        self.requirements: dict[int, list[tuple[object, str]]] = {}
        self.producers: dict[int, list[str]] = {}
        self.residual: dict[int, list[tuple[int, str]]] = {}
        self.seen: dict[int, int] = {}
        self.granularity: dict[int, int] = {}
        self.ref_owner: dict[tuple[str, int, int, int], int] = {}

    def new(self, size: int, fixed: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.fixed.append(fixed)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise AssertionError(f"internal: linking axes of sizes {self.size[ra]} and {self.size[rb]}")
        self.parent[rb] = ra
        self.fixed[ra] = self.fixed[ra] or self.fixed[rb]

    def fix(self, a: int, reason: str) -> None:
        root = self.find(a)
        if self.fixed[root] is None:
            self.fixed[root] = reason

    def is_fixed(self, a: int) -> bool:
        return self.fixed[self.find(a)] is not None

    def require(self, a: int, node, reason: str) -> None:
        self.requirements.setdefault(a, []).append((node, reason))

    def attach(self, a: int, ref: AxisRef) -> None:
        """Record that tensor axis ``ref`` is permuted with axis ``a``; one tensor range always has one owner.

        An alias is recorded under its tensor's canonical name: all names of a tied tensor then share the owners
        of their axes, so one permutation moves the tensor wherever it is used."""
        ref = ref._replace(name=self.aliases.get(ref.name, ref.name))
        key = (ref.name, ref.dim, ref.block, ref.offset)
        owner = self.ref_owner.get(key)
        if owner is None:
            self.ref_owner[key] = a
            self.refs.setdefault(a, []).append(ref)
        else:
            self.union(owner, a)

    def produce(self, a: int, path: str) -> None:
        self.producers.setdefault(a, []).append(path)

    def residual_add(self, a: int, order: int, scope: str) -> None:
        self.residual.setdefault(a, []).append((order, scope))

    def coarsen(self, a: int, block: int) -> None:
        """Axis ``a`` may only be permuted in whole blocks of ``block`` consecutive units, their order kept."""
        self.granularity[a] = math.lcm(self.granularity.get(a, 1), int(block))

    def coarsen_dim(self, dim: Dim, channels: int, node, reason: str) -> None:
        """The entries of ``dim`` may only move in whole blocks of ``channels`` consecutive entries: each piece's
        axis is coarsened, provided the blocks do not straddle pieces; otherwise the dim must stay fixed."""
        offset = 0
        for a, block in dim:
            span = self.size[a] * block
            if (channels % block and block % channels) or offset % channels or span % channels:
                self.require_dim(dim, node, f"{reason}: its blocks of {channels} entries straddle a concatenation "
                                            "or flattening")
                return
            offset += span
        for a, block in dim:
            if channels % block == 0:  # else each unit already spans whole blocks
                self.coarsen(a, channels // block)

    def see(self, a: int, order: int) -> None:
        self.seen.setdefault(a, order)

    # dims made of pieces -------------------------------------------------------------------------------------
    def dim_size(self, dim: Dim) -> int:
        return sum(self.size[a] * block for a, block in dim)

    def dim_is_inert(self, dim: Dim) -> bool:
        """True when no piece can carry a permutation (all fixed already, or single units)."""
        return all(self.is_fixed(a) or self.size[a] == 1 for a, _ in dim)

    def fix_dim(self, dim: Dim, reason: str) -> None:
        for a, _ in dim:
            self.fix(a, reason)

    def require_dim(self, dim: Dim, node, reason: str) -> None:
        for a, _ in dim:
            self.require(a, node, reason)

    def attach_dim(self, dim: Dim, name: str, tensor_dim: int) -> None:
        offset = 0
        for a, block in dim:
            self.attach(a, AxisRef(name, tensor_dim, block, offset))
            offset += self.size[a] * block

    def union_dims(self, d1: Dim, d2: Dim, node, reason: str) -> None:
        """Link two dims entry by entry: piece by piece when laid out alike; a fixed side fixes the other."""
        same_layout = len(d1) == len(d2) and all(
            b1 == b2 and self.size[a1] == self.size[a2] for (a1, b1), (a2, b2) in zip(d1, d2))
        if same_layout:
            for (a1, _), (a2, _) in zip(d1, d2):
                self.union(a1, a2)
        elif self.dim_is_inert(d1) or self.dim_is_inert(d2):
            self.fix_dim(d1, f"linked to a fixed axis at {reason}")
            self.fix_dim(d2, f"linked to a fixed axis at {reason}")
        else:
            self.require_dim(d1, node, "links axes laid out differently (blocks or concatenations)")
            self.require_dim(d2, node, "links axes laid out differently (blocks or concatenations)")

    def classes(self) -> dict[int, AxisClass]:
        """All classes, keyed by root, with their gathered records."""
        result: dict[int, AxisClass] = {}

        def cls(a: int) -> AxisClass:
            root = self.find(a)
            if root not in result:
                result[root] = AxisClass(root, self.size[root], self.fixed[root])
            return result[root]

        for a in range(len(self.parent)):
            cls(a)
        for a, refs in self.refs.items():
            cls(a).refs.extend(refs)
        for a, reqs in self.requirements.items():
            cls(a).requirements.extend(reqs)
        for a, paths in self.producers.items():
            cls(a).producers.extend(paths)
        for a, sites in self.residual.items():
            cls(a).residual_scopes.extend(sites)
        for a, block in self.granularity.items():
            c = cls(a)
            c.granularity = math.lcm(c.granularity, block)
        for a, order in self.seen.items():
            c = cls(a)
            c.first_seen = min(c.first_seen, order)
        return result
