"""Compaction planning: the layer chain every kept snapshot will have after gc.

Pure (no files): it works on layer identities and weights, so it can be tested
against a per-page reference and its costs simulated.

The one fact everything rests on: for "newest layer wins", replacing any run of
*consecutive* layers by their union (per page, the newest record among them)
changes the answer for no page and no present map. So a merged layer is as good
as the layers it replaces, for this snapshot and for every later snapshot that
shares it. And hard links can only share a layer at the SAME position (the
layer number is in its file headers), so later snapshots share a *prefix* of
an earlier snapshot's chain.

The plan, oldest kept snapshot first:
  1. P = the kept snapshot whose current chain is the longest prefix of K's
     (for a linear series: the previous kept snapshot). K's new chain starts as
     P's new chain, followed by the layers K has beyond P's (its own increment,
     plus those of removed snapshots in between). Without P, K's own layers.
     If that is at most max_chain layers, it is K's new chain: nothing to do
     (so a chain that is short enough, or was compacted before, is never
     rewritten for its own sake, and a second gc rewrites nothing).
  2. Otherwise the new layers are folded: a snapshot's own layers (one per
     pre-copy round) weigh 1, 0, 0 … and the zero-weight ones join the layer
     before them (one snapshot = one increment; never into layer 0, the full
     base: that would copy it). Then tiered merging, like an LSM tree: while
     the next-to-last layer weighs at most as much as the last, they become
     one layer. Weights count increments, so along a series this acts as a
     binary counter: each increment is rewritten ~log2(n) times in all, not
     once per snapshot, and a long unfolded tail (a first gc) folds into one
     layer, each increment copied once.
  3. Cap: while the chain is longer than max_chain, merge the adjacent pair with
     the smallest total weight (the newest on ties), then step 2's merging
     again. Layer 0 is never merged unless max_chain is 1.
Simulated against eager tiering (binary counter on every snapshot) this
rewrites 10-30 % less and leaves short chains alone; see docs/SNAPSHOTS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_FANOUT = 2  # shortest chains per rewrite; see docs/SNAPSHOTS.md for the numbers


@dataclass(frozen=True)
class LayerKey:
    """An existing layer file: identity, position (layer number) and weight: how many
    snapshot increments it holds (0: the continuation of the layer before it)."""

    ident: bytes
    position: int
    weight: int = 1


@dataclass(frozen=True)
class SnapIn:
    """A kept snapshot as the planner sees it: its current chain, oldest layer first."""

    id: str
    chain: tuple[LayerKey, ...]


@dataclass(eq=False)
class Part:
    """One layer of a planned chain: the existing layers (oldest first) it is the union of.

    Parts are shared by identity between a snapshot's plan and its descendants'
    plans (the common prefix), so a part is built once and then hard-linked.
    """

    sources: tuple[LayerKey, ...]

    @property
    def weight(self) -> int:
        return sum(s.weight for s in self.sources)

    def existing_at(self, position: int) -> LayerKey | None:
        """The existing layer this part is, if it can be hard-linked at `position`."""
        if len(self.sources) == 1 and self.sources[0].position == position:
            return self.sources[0]
        return None


@dataclass
class ChainPlan:
    chains: dict[str, list[Part]] = field(default_factory=dict)
    parent: dict[str, str | None] = field(default_factory=dict)  # P of each kept snapshot
    changed: list[str] = field(default_factory=list)  # ids to rewrite, oldest first

    def ancestors(self, sid: str) -> set[str]:
        """sid and every P above it (whose new layers sid may hard-link)."""
        out: set[str] = set()
        cur: str | None = sid
        while cur is not None and cur not in out:
            out.add(cur)
            cur = self.parent.get(cur)
        return out

    def children(self) -> dict[str, list[str]]:
        kids: dict[str, list[str]] = {}
        for sid, p in self.parent.items():
            if p is not None:
                kids.setdefault(p, []).append(sid)
        return kids


def _merge(parts: list[Part]) -> Part:
    return Part(tuple(s for p in parts for s in p.sources))


def _tier(chain: list[Part], fanout: int) -> None:
    while len(chain) - 1 >= fanout:
        tail = chain[-fanout:]
        top = tail[-1].weight
        if any(p.weight > top for p in tail[:-1]):
            return
        chain[-fanout:] = [_merge(tail)]


def _cap(chain: list[Part], max_chain: int) -> None:
    lo = 0 if max_chain <= 1 else 1
    while len(chain) > max(1, max_chain):
        best = min(
            range(lo, len(chain) - 1), key=lambda i: (chain[i].weight + chain[i + 1].weight, -i)
        )
        chain[best : best + 2] = [_merge(chain[best : best + 2])]


def plan(snaps: list[SnapIn], max_chain: int = 8, fanout: int = DEFAULT_FANOUT) -> ChainPlan:
    """New chains for `snaps` (the kept snapshots, oldest first)."""
    if fanout < 2:
        raise ValueError("fanout must be >= 2")
    out = ChainPlan()
    by_chain: dict[tuple[bytes, ...], str] = {}
    for snap in snaps:
        idents = tuple(k.ident for k in snap.chain)
        parent = None
        n = 0
        for n in range(len(idents), 0, -1):
            parent = by_chain.get(idents[:n])
            if parent is not None:
                break
        if parent is not None:
            chain = list(out.chains[parent])
            units = snap.chain[n:]
        else:
            chain, units = [], snap.chain
        if len(chain) + len(units) <= max(1, max_chain):
            chain.extend(Part((key,)) for key in units)  # short enough: nothing to do
        else:
            fresh: set[Part] = set()  # parts made for this snapshot (not shared with P)
            for key in units:
                if key.weight == 0 and len(chain) > 1 and chain[-1] in fresh:
                    # the rest of one snapshot's layers (its pre-copy rounds): one increment
                    chain[-1] = Part(chain[-1].sources + (key,))
                else:
                    chain.append(Part((key,)))
                fresh.add(chain[-1])
            _tier(chain, fanout)
            _cap(chain, max_chain)
            _tier(chain, fanout)
        out.chains[snap.id] = chain
        out.parent[snap.id] = parent
        by_chain[idents] = snap.id
        same = len(chain) == len(snap.chain) and all(
            (k := p.existing_at(i)) is not None and k.ident == snap.chain[i].ident
            for i, p in enumerate(chain)
        )
        if not same:
            out.changed.append(snap.id)
    return out
