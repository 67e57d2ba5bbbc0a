// Member view: the profile record and portrait, the tier with its explanation, the balance, the
// ledger with reasons, points about to expire and the tier's benefits.

import { get } from "../api.js";
import { barChart } from "../charts.js";
import { age, errorBox, h, int, label, money, number, panel, table, tiles, time } from "../dom.js";

const LEDGER_PAGE_SIZE = 50;
const EXPLAIN_LOCALE = "en";

function searchForm(current = "") {
  const input = h("input", { id: "member-id", name: "member", value: current, required: true, autocomplete: "off",
    placeholder: "m-0001" });
  return h("form", { class: "search", role: "search", onsubmit: (event) => {
    event.preventDefault();
    const id = input.value.trim();
    if (id) window.location.hash = `#/members/${encodeURIComponent(id)}`;
  } }, h("label", { for: "member-id" }, "Member id"), input, h("button", { type: "submit" }, "Show"));
}

export function renderSearch(root) {
  root.append(h("h1", {}, "Members"), searchForm());
}

export async function renderMember(root, memberId) {
  root.append(h("h1", {}, `Member ${memberId}`), searchForm(memberId));
  const base = `/v1/members/${encodeURIComponent(memberId)}`;
  const rewards = `/v1/rewards/members/${encodeURIComponent(memberId)}`;
  let member;
  try {
    ({ member } = await get(base));
  } catch (error) {
    root.append(error.notFound
      ? h("div", { class: "error", role: "alert", id: "not-found" },
        h("p", {}, `No member with id “${memberId}”.`),
        h("p", { class: "muted" }, "Check the id (member ids are case-sensitive), or look the member up by e-mail or phone in the CLI."))
      : errorBox(error));
    return;
  }
  root.append(h("div", { class: "grid" },
    h("section", { class: "panel", id: "profile" }, h("h2", {}, "Profile"), tiles([
      ["Status", label(member.status, "MEMBER_STATUS_")], ["Channel", label(member.channel, "CHANNEL_")],
      ["Joined", time(member.joinedAt)], ["Tenure", `${member.tenureDays || 0} days`],
      ["Region", member.region || "–"], ["Name", member.displayName || "–"]])),
    panel("Tier", () => tier(memberId, rewards), { id: "tier" }),
    panel("Balance", async () => balance((await get(`${rewards}/balance`)).balance), { id: "balance" }),
    panel("Portrait", async () => portrait((await get(`${base}/portrait`)).portrait), { id: "portrait" }),
    panel("Ledger", async () => ledger(await get(`${rewards}/ledger-entries`, { pageSize: LEDGER_PAGE_SIZE })),
      { id: "ledger", class: "panel wide" }),
    panel("Expiring points", async () => expiring(await get(`${rewards}/expiring-points`)), { id: "expiring" }),
    panel("Benefits", async () => benefits(await get(`${rewards}/benefits`)), { id: "benefits" })));
}

async function tier(memberId, rewards) {
  const [current, explained] = await Promise.all([
    get(`${rewards}/tier`).then((r) => r.tier, (error) => (error.notFound ? null : Promise.reject(error))),
    get(`/v1/scores/${encodeURIComponent(memberId)}:explain`, { locale: EXPLAIN_LOCALE })
      .catch((error) => (error.httpStatus === 404 || error.httpStatus === 400 ? { missing: error } : Promise.reject(error))),
  ]);
  const parts = [tiles([
    ["Tier", current && current.tierId ? (explained.tierDisplayName || current.tierId) : "none yet"],
    ["Since", time(current && current.since)],
    ["Earn multiplier", current ? `×${(Number(current.earnMultiplierBps || 10000) / 10000).toFixed(2)}` : "–"],
  ])];
  if (explained.missing) {
    parts.push(h("p", { class: "muted" }, `No tier explanation: ${explained.missing.message}`));
    return parts;
  }
  const score = explained.score || {};
  const contributions = explained.contributions || [];
  parts.push(
    h("p", { id: "tier-summary" }, explained.summary || ""),
    h("p", { class: "muted" }, `Score ${number(score.score, 3)}, percentile ${number(score.percentile, 1)}, `
      + `policy ${score.policy ? `${score.policy.policyId} v${score.policy.version}` : "–"}`
      + `${score.heldByHysteresis ? "; kept by hysteresis" : ""}.`),
    barChart(contributions.map((c) => ({ label: c.displayName || c.featureName, value: Math.max(0, c.contribution),
      text: number(c.contribution, 3) })), "Score contributions by feature"),
    table(["feature", "value", "weight", "contribution", "population percentile"], contributions.map((c) => [
      c.displayName || c.featureName, number(c.rawValue), number(c.weight), number(c.contribution, 3),
      number(c.populationPercentile, 1)]), { class: "compact", id: "contributions" }));
  const next = explained.nextTier;
  if (next && next.tierId) {
    parts.push(h("p", {}, `Next tier ${next.displayName || next.tierId}: ${number(next.scoreGap, 3)} score short.`),
      h("ul", {}, (next.hints || []).map((hint) => h("li", {}, hint.text))));
  }
  return parts;
}

function balance(b) {
  return tiles([["Available", int(b.availablePoints)], ["Posted", int(b.postedPoints)],
    ["Pending / held", `${int(b.pendingPoints)} / ${int(b.heldPoints)}`], ["Reserved", int(b.reservedPoints)],
    ["Debt", int(b.debtPoints)], ["Qualifying", int(b.qualifyingPoints)], ["Lifetime", int(b.lifetimePoints)],
    ["Next expiry", b.nextExpiryAt ? `${int(b.nextExpiringPoints)} on ${time(b.nextExpiryAt)}` : "–"]]);
}

function portrait(p) {
  const windows = [...(p.windows || []), ...(p.lifetime ? [{ ...p.lifetime, windowDays: 0 }] : [])];
  return [
    table(["window", "purchases", "net spend", "avg order", "visits", "browse", "refunds"], windows.map((w) => [
      w.windowDays ? `${w.windowDays} d` : "lifetime", int(w.purchaseCount), money(w.netSpend), money(w.averageOrderValue),
      int(w.visitCount), age(Number(w.browseSeconds || 0)), int(w.refundCount)]), { class: "compact" }),
    h("p", { class: "muted" }, `Last purchase ${time(p.lastPurchaseAt)}; favourite categories: `
      + `${(p.favouriteCategories || []).join(", ") || "–"}.`),
  ];
}

function ledger({ entries = [], nextPageToken }) {
  if (!entries.length) return h("p", { class: "muted" }, "No ledger entry.");
  return [
    table(["when", "type", "points", "balance after", "why"], entries.map((e) => [
      time(e.createdAt), label(e.type, "LEDGER_ENTRY_TYPE_"), int(e.points), int(e.postedBalanceAfter), why(e)]),
    { id: "ledger-entries" }),
    nextPageToken ? h("p", { class: "muted" }, `Newest ${entries.length} entries; the CLI lists more.`) : null,
  ];
}

function why(entry) {
  const parts = [label(entry.source, "LEDGER_SOURCE_")];
  if (entry.reason || entry.reasonCode) parts.push(entry.reason || entry.reasonCode);
  if (entry.orderId) parts.push(`order ${entry.orderId}`);
  if (entry.caseId) parts.push(`case ${entry.caseId}`);
  if (entry.redemptionId) parts.push(`redemption ${entry.redemptionId}`);
  return parts.join(" · ");
}

function expiring({ expiringPoints = [], totalPoints }) {
  if (!expiringPoints.length) return h("p", { class: "muted" }, "Nothing expires in the reported window.");
  return [h("p", {}, `${int(totalPoints)} points expire:`),
    table(["expires", "points", "lots"], expiringPoints.map((e) => [time(e.expiresAt), int(e.points), String(e.lotCount)]),
      { class: "compact" })];
}

function benefits({ tierId, memberBenefits = [] }) {
  if (!memberBenefits.length) return h("p", { class: "muted" }, `No benefit for tier ${tierId || "(none)"}.`);
  return table(["benefit", "what", "eligible", "uses left"], memberBenefits.map((b) => [
    b.displayName || b.benefit?.benefitId, b.displayDescription || "", b.eligible ? "yes" : `no: ${b.ineligibleReason}`,
    String(b.remainingUses ?? "–")]), { class: "compact" });
}
