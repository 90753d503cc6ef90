"""Plain data of a permutation spec: groups, the tensor axes each group permutes, and where to read features."""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple


class SpecError(ValueError):
    """Base class of the errors raised while discovering or applying a permutation spec."""


class UntraceableModelError(SpecError):
    """torch.fx could not trace the model (data-dependent control flow, unsupported Python, ...)."""


class UnsupportedOperationError(SpecError):
    """An operation the discovery does not understand touches an axis that would otherwise be permuted."""


class InvarianceError(AssertionError):
    """A permutation changed the model's function beyond the tolerance."""


class AxisRef(NamedTuple):
    """One state_dict tensor axis permuted by a group.

    Along axis ``dim`` of tensor ``name``, unit ``u`` of the group occupies the contiguous index range
    ``[offset + u * block, offset + (u + 1) * block)``; indices outside ``[offset, offset + size * block)`` belong
    to other groups or stay fixed. ``block > 1`` arises where a C x H x W map is flattened into a Linear (each
    channel owns ``H * W`` consecutive inputs); ``offset > 0`` where tensors are concatenated.
    A plain axis is ``AxisRef(name, dim)`` (block 1, offset 0).
    """

    name: str
    dim: int
    block: int = 1
    offset: int = 0


TAP_KINDS = ("output", "input", "node", "attn_qk", "attn_v")


@dataclasses.dataclass(frozen=True)
class Tap:
    """Where a group's features are read during a forward pass.

    kind ``"output"``: the output of module ``module`` (a forward hook); ``"input"``: its positional argument
    ``index`` (a forward pre-hook); ``"node"``: the value of fx graph node ``node`` (needs a traced copy of the
    model; used only where no module boundary carries the tensor). ``call`` picks which call of the module within
    one forward pass (a module may be reused, e.g. torchvision's ``relu``). ``"attn_qk"`` / ``"attn_v"``: the
    query and key projections (concatenated along the token axis) / the value projection of attention block
    ``module``: recomputed from the inputs of an nn.MultiheadAttention, read from the ``qkv`` Linear's output of a
    qkv-Linear attention block. ``channel_axis`` is the axis of the
    features that holds the group's units: 1 for (N, C, H, W) maps, -1 for (N, C) or (N, L, C). ``unit_channels``:
    channels per unit on that axis -- more than 1 where units move as whole blocks of channels (groups of a
    grouped convolution or GroupNorm): unit u is channels ``[u * unit_channels, (u + 1) * unit_channels)``.
    """

    module: str
    kind: str = "output"
    index: int = 0
    call: int = 0
    channel_axis: int = 1
    node: str = ""
    unit_channels: int = 1

    def __post_init__(self):
        if self.kind not in TAP_KINDS:
            raise ValueError(f"Tap.kind must be one of {TAP_KINDS}, got {self.kind!r}")
        if self.unit_channels < 1:
            raise ValueError(f"Tap.unit_channels must be positive, got {self.unit_channels}")

    def describe(self) -> str:
        module = self.module or "<root>"
        where = {"output": f"{module} output", "input": f"{module} input[{self.index}]",
                 "node": f"node {self.node}", "attn_qk": f"{self.module} q,k projections",
                 "attn_v": f"{self.module} v projection"}[self.kind]
        if self.kind != "node" and self.call:
            where += f" (call {self.call})"
        blocks = f" in blocks of {self.unit_channels}" if self.unit_channels > 1 else ""
        return f"{where}, axis {self.channel_axis}{blocks}"


@dataclasses.dataclass
class PermutationSpec:
    """Permutation symmetry of a model, as plain data.

    groups: group name -> number of units. Names come from module paths: ``"conv3"`` is the output channels of
        module ``conv3`` (and everything tied to them: its BN, the next layer's inputs); ``"layer1.stream"`` is a
        residual stream, named after the module(s) whose forward performs its residual additions (``"stream"``
        when that is the root module).
    axes: group name -> the state_dict tensor axes it permutes (:class:`AxisRef`; BatchNorm running statistics
        included, ``num_batches_tracked`` never).
    taps: group name -> :class:`Tap`, where to read its features for statistics.
    exclude: module paths that discovery treated as opaque (kept so node taps can re-trace the same graph).
    heads: attention module path -> ``{"num_heads": H, "groups": [qk group, vo group]}``. Those groups' units come
        in H heads of ``size // H`` consecutive units; a valid permutation moves heads whole (``perm[h*d:(h+1)*d]``
        all come from one old head) and all groups of an entry move heads the same way; within a head each group
        may permute its units freely. Groups of an attention ``<path>`` are named ``<path>.qk`` (query/key
        projection rows) and ``<path>.vo`` (value rows and output-projection columns).
    aliases: alias name -> canonical name, for state_dict names that refer to one tensor (a tied Parameter or
        buffer, e.g. ``{"head.weight": "embed.weight"}``). ``axes`` names each tensor once, by its canonical name
        (its first name in state_dict order); :func:`permute_state_dict` gives every alias the canonical name's
        permuted tensor, so the tie is kept.
    """

    groups: dict[str, int]
    axes: dict[str, list[AxisRef]]
    taps: dict[str, Tap] = dataclasses.field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    heads: dict[str, dict] = dataclasses.field(default_factory=dict)
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.axes = {g: [AxisRef(*a) for a in refs] for g, refs in self.axes.items()}
        self.exclude = tuple(self.exclude)
        self.aliases = {str(a): str(c) for a, c in self.aliases.items()}
        _check_aliases(self.aliases, self.axes)
        if set(self.axes) != set(self.groups):
            raise ValueError(f"axes and groups name different groups: {sorted(set(self.axes) ^ set(self.groups))}")
        unknown_taps = set(self.taps) - set(self.groups)
        if unknown_taps:
            raise ValueError(f"taps name unknown groups: {sorted(unknown_taps)}")
        self.heads = {path: {"num_heads": int(h["num_heads"]), "groups": list(h["groups"])}
                      for path, h in self.heads.items()}
        for path, entry in self.heads.items():
            for group in entry["groups"]:
                if group not in self.groups:
                    raise ValueError(f"heads of {path!r} name unknown group {group!r}")
                if self.groups[group] % entry["num_heads"]:
                    raise ValueError(f"group {group!r} ({self.groups[group]} units) does not split into "
                                     f"{entry['num_heads']} heads")

    def __len__(self) -> int:
        return len(self.groups)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (lists and plain values only); inverse of :meth:`from_dict`."""
        return {
            "groups": dict(self.groups),
            "axes": {g: [list(a) for a in refs] for g, refs in self.axes.items()},
            "taps": {g: dataclasses.asdict(t) for g, t in self.taps.items()},
            "exclude": list(self.exclude),
            "heads": {p: {"num_heads": h["num_heads"], "groups": list(h["groups"])} for p, h in self.heads.items()},
            "aliases": dict(self.aliases),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PermutationSpec":
        return cls(groups={g: int(n) for g, n in data["groups"].items()},
                   axes={g: [AxisRef(*a) for a in refs] for g, refs in data["axes"].items()},
                   taps={g: Tap(**t) for g, t in data.get("taps", {}).items()},
                   exclude=tuple(data.get("exclude", ())), heads=data.get("heads", {}),
                   aliases=data.get("aliases", {}))

    def subset(self, groups) -> "PermutationSpec":
        """The spec restricted to some groups (the others then stay unpermuted; still function-preserving)."""
        groups = list(groups)
        unknown = [g for g in groups if g not in self.groups]
        if unknown:
            raise ValueError(f"unknown groups {unknown}; known: {list(self.groups)}")
        kept = set(groups)
        for path, entry in self.heads.items():
            inside = [g for g in entry["groups"] if g in kept]
            if inside and len(inside) != len(entry["groups"]):
                raise ValueError(f"groups {entry['groups']} share the head order of attention {path!r}: keep all "
                                 "of them or none")
        heads = {p: h for p, h in self.heads.items() if h["groups"][0] in kept}
        return PermutationSpec({g: self.groups[g] for g in groups}, {g: list(self.axes[g]) for g in groups},
                               {g: self.taps[g] for g in groups if g in self.taps}, self.exclude, heads,
                               self.aliases)

    def __str__(self) -> str:
        n_tensors = len({a.name for refs in self.axes.values() for a in refs})
        lines = [f"PermutationSpec: {len(self.groups)} groups over {n_tensors} tensors"]
        if self.aliases:  # axes name a tied tensor by its canonical name only
            lines.append("tied (alias = canonical): " + ", ".join(f"{a} = {c}" for a, c in self.aliases.items()))
        if not self.groups:
            return "\n".join(lines)
        name_w = max(len("group"), *(len(g) for g in self.groups))
        lines.append(f"{'group':<{name_w}}  {'units':>6}  {'tap':<40}  axes")
        head_of = {g: (p, h["num_heads"]) for p, h in self.heads.items() for g in h["groups"]}
        for g, size in self.groups.items():
            tap = self.taps[g].describe() if g in self.taps else "-"
            refs = ", ".join(_format_ref(a) for a in self.axes[g])
            if g in head_of:
                refs = f"[{head_of[g][1]} heads of {head_of[g][0]}] " + refs
            lines.append(f"{g:<{name_w}}  {size:>6}  {tap:<40}  {refs}")
        return "\n".join(lines)


def _check_aliases(aliases: dict[str, str], axes: dict[str, list[AxisRef]]) -> None:
    """Aliases point straight at a canonical name, and the axes name tensors only by their canonical names."""
    for alias, canonical in aliases.items():
        if alias == canonical or canonical in aliases:
            raise ValueError(f"aliases must map each alias to its canonical name directly, got {alias!r} -> "
                             f"{canonical!r}" + (f" -> {aliases[canonical]!r}" if canonical in aliases else ""))
    for group, refs in axes.items():
        for ref in refs:
            if ref.name in aliases:
                raise ValueError(f"group {group!r} names {ref.name!r}, an alias of {aliases[ref.name]!r}: name each "
                                 "tied tensor once, by its canonical name")


def _format_ref(ref: AxisRef) -> str:
    text = f"{ref.name}:{ref.dim}"
    if ref.block != 1:
        text += f"x{ref.block}"
    if ref.offset:
        text += f"@{ref.offset}"
    return text
