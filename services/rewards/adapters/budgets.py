"""Campaign budgets split into one allowance per shard (migration 0005, docs/scale.md).

A credit spends from the slice of its member's shard (`Slices.anchor`), locked in the credit's own
transaction beside the member's rows, so no credit writes another shard. A slice that is short
is topped up by `BudgetTopUps.top_up`, in a short transaction of its own before the credit's, from
the campaign's global row: first what was never handed out, then, when that is not enough, every
slice's unused allowance is taken back and handed out again. So every point of a budget stays
reachable from any shard, and the global row is written once per top-up, not once per credit.

One database is one shard: one slice per campaign, and the same code.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from libs.db import DbConnection
from libs.distribution import anchors, shard_anchor, shard_of

# How long a process stops asking for more of a campaign's budget after a top-up found none left
# (points given back by voided holds are found again after it).
EXHAUSTED_RECHECK_S = 5.0
# Each top-up hands a slice what it lacks plus 1 / (SLICE_SHARE x shards) of the budget, so a busy
# shard tops up a few times per budget, not once per credit.
SLICE_SHARE = 4


@dataclass(frozen=True)
class Slices:
    """Which slice serves a member: the anchor of the member's shard."""

    shards: int

    def anchor(self, member_id: str) -> str:
        return shard_anchor(shard_of(member_id, self.shards), self.shards)

    @property
    def anchors(self) -> list[str]:
        return anchors(self.shards)


_LOCK_GLOBAL_SQL = """
INSERT INTO campaign_budgets AS b (campaign_id) SELECT c FROM unnest($1::text[]) AS c ORDER BY c
ON CONFLICT (campaign_id) DO UPDATE SET points_awarded = b.points_awarded
RETURNING campaign_id, points_awarded, allocated, budget_points
"""

# Every slice of the campaign gives its unused allowance back (and takes the budget's new size).
_RECLAIM_SQL = """
WITH taken AS (
    SELECT member_id, allowance - awarded AS unused FROM campaign_budget_slices
     WHERE campaign_id = $1 ORDER BY member_id FOR UPDATE),
     given AS (
    UPDATE campaign_budget_slices s SET allowance = s.awarded, budget_points = $2
      FROM taken WHERE s.campaign_id = $1 AND s.member_id = taken.member_id
    RETURNING taken.unused)
SELECT coalesce(sum(unused), 0)::bigint FROM given
"""

_GRANT_SQL = """
INSERT INTO campaign_budget_slices AS s (member_id, campaign_id, allowance, budget_points)
SELECT a, $2, g, $4 FROM unnest($1::text[], $3::bigint[]) AS t(a, g) ORDER BY a
ON CONFLICT (member_id, campaign_id) DO UPDATE SET allowance = s.allowance + excluded.allowance,
                                                   budget_points = excluded.budget_points
"""

_SETTLE_GLOBAL_SQL = """
UPDATE campaign_budgets SET allocated = allocated - $2 + $3, budget_points = $4 WHERE campaign_id = $1
"""


@dataclass
class BudgetTopUps:
    """Tops slices up; remembers, per process, the campaigns found without any budget left."""

    slices: Slices
    _exhausted: dict[tuple[str, int], float] = field(default_factory=dict)

    def worth_asking(self, campaign_id: str, budget_points: int) -> bool:
        found_empty = self._exhausted.get((campaign_id, budget_points))
        return found_empty is None or time.monotonic() - found_empty >= EXHAUSTED_RECHECK_S

    async def top_up(self, conn: DbConnection, needs: Mapping[tuple[str, str], int],
                     budgets: Mapping[str, int]) -> dict[tuple[str, str], int]:
        """Hand each (slice anchor, campaign) of `needs` what it lacks, and a share more, out of
        `budgets` (campaign -> budget points of the active rules), in one transaction. Returns
        what each slice was granted."""
        wanted = {key: n for key, n in needs.items() if n > 0 and self.worth_asking(key[1], budgets[key[1]])}
        granted: dict[tuple[str, str], int] = {}
        if not wanted:
            return granted
        chunk_of = {c: max(1, budgets[c] // (SLICE_SHARE * self.slices.shards)) for _, c in wanted}
        async with conn.transaction():
            for row in await conn.fetch(_LOCK_GLOBAL_SQL, sorted(chunk_of)):
                campaign_id, budget = row["campaign_id"], budgets[row["campaign_id"]]
                asks = {anchor: n for (anchor, c), n in sorted(wanted.items()) if c == campaign_id}
                available = budget - row["points_awarded"] - row["allocated"]
                reclaimed = 0
                if row["budget_points"] != budget or available < sum(asks.values()):
                    reclaimed = await conn.fetchval(_RECLAIM_SQL, campaign_id, budget)
                    available += reclaimed
                grants: dict[str, int] = {}
                for anchor, need in asks.items():
                    grant = min(need + chunk_of[campaign_id], max(available, 0))
                    if grant > 0:
                        grants[anchor] = grant
                        available -= grant
                if grants:
                    await conn.execute(_GRANT_SQL, list(grants), campaign_id, list(grants.values()), budget)
                    self._exhausted.pop((campaign_id, budget), None)
                else:
                    self._exhausted[(campaign_id, budget)] = time.monotonic()
                await conn.execute(_SETTLE_GLOBAL_SQL, campaign_id, reclaimed, sum(grants.values()), budget)
                granted.update({(anchor, campaign_id): g for anchor, g in grants.items()})
        return granted


_USED_SQL = """
SELECT c AS campaign_id,
       coalesce((SELECT points_awarded FROM campaign_budgets b WHERE b.campaign_id = c), 0)
       + coalesce((SELECT sum(awarded) FROM campaign_budget_slices s WHERE s.campaign_id = c), 0) AS used
  FROM unnest($1::text[]) AS c
"""


async def used(conn: DbConnection, campaign_ids: list[str]) -> dict[str, int]:
    """Points each campaign has awarded programme-wide, every slice summed (a read across shards:
    for previews and reports, never on the credit path)."""
    return {r["campaign_id"]: int(r["used"]) for r in await conn.fetch(_USED_SQL, campaign_ids)}
