// Dashboard: members per tier over the applied evaluation runs, the points ledger's totals and
// liability, risk decisions of the last 24 hours, and the profile → rewards outbox lag.

import { get, listAll, post } from "../api.js";
import { barChart, lineChart } from "../charts.js";
import { age, h, int, label, money, panel, seconds, table, tiles, time } from "../dom.js";

const RUNS_SHOWN = 50;
const DECISIONS = [["DECISION_ALLOW", "allow", "#59a14f"], ["DECISION_REVIEW", "review", "#edc948"],
  ["DECISION_BLOCK", "block", "#e15759"]];
const RISK_WINDOW_H = 24;

export function render(root) {
  root.append(h("h1", {}, "Dashboard"), h("div", { class: "grid" },
    panel("Members per tier", tiersOverTime, { id: "tiers", class: "panel wide" }),
    panel("Points", points, { id: "points" }),
    panel(`Risk decisions, last ${RISK_WINDOW_H} h`, riskDecisions, { id: "risk" }),
    panel("Outbox (profile → rewards)", outbox, { id: "outbox" })));
}

async function tiersOverTime() {
  const reply = await get("/v1/evaluations", { pageSize: RUNS_SHOWN, state: "EVALUATION_STATE_SUCCEEDED",
    dryRunFilter: "DRY_RUN_FILTER_APPLIED_RUNS_ONLY" });
  const runs = (reply.runs || []).slice().reverse(); // oldest first
  if (!runs.length) return h("p", { class: "muted" }, "No applied evaluation run yet: run one (loyalty evaluations run).");
  const tierIds = [];
  for (const run of runs) for (const count of run.tierCounts || []) if (!tierIds.includes(count.tierId)) tierIds.push(count.tierId);
  const series = tierIds.map((tierId) => ({
    name: tierId,
    points: runs.map((run) => ({ x: new Date(run.asOf),
      y: Number((run.tierCounts || []).find((c) => c.tierId === tierId)?.count || 0) })),
  }));
  const latest = runs[runs.length - 1];
  return [
    lineChart(series, "Members per tier over evaluation runs"),
    h("p", { class: "muted" }, `Latest run ${latest.runId} (policy ${latest.policy.policyId} v${latest.policy.version}), `
      + `as of ${time(latest.asOf)}: ${int(latest.membersScored)} members, ${int(latest.upgrades)} up, `
      + `${int(latest.downgrades)} down.`),
    table(["tier", "members", "share"], (latest.tierCounts || []).map((c) =>
      [c.tierId, int(c.count), `${(c.share * 100).toFixed(1)}%`]), { class: "compact", id: "latest-tiers" }),
  ];
}

async function points() {
  const { report } = await post("/v1/rewards/ledger:reconcile", { maxDiscrepancies: 1 });
  const totals = report.totals || {};
  const liability = report.liability || {};
  return [
    tiles([
      ["Issued", int(totals.issuedPoints)],
      ["Redeemed", int(totals.redeemedPoints)],
      ["Expired", int(totals.expiredPoints)],
      ["Outstanding liability", int(liability.outstandingPoints),
        (liability.outstandingValue || []).map(money).join(" + ") || null],
      ["Pending / held", `${int(totals.pendingPoints)} / ${int(totals.heldPoints)}`],
      ["Voided", int(totals.voidedPoints)],
    ]),
    h("p", { class: report.balanced ? "ok" : "error" },
      report.balanced ? `Ledger balanced: ${int(report.membersChecked)} members, ${int(report.entriesChecked)} entries.`
        : `${int(report.discrepancyCount)} discrepancies: run \`loyalty reconcile\` for the list.`),
  ];
}

async function riskDecisions() {
  const startTime = new Date(Date.now() - RISK_WINDOW_H * 3600 * 1000).toISOString();
  const counted = await Promise.all(DECISIONS.map(async ([decision, name, fill]) => {
    const { items, truncated } = await listAll("/v1/risk/assessments", { decisions: decision, startTime }, "assessments");
    return { label: name, value: items.length, text: truncated ? `${items.length}+` : String(items.length), color: fill };
  }));
  return [barChart(counted, "Risk decisions by outcome"),
    h("p", { class: "muted" }, `${counted.map((c) => `${c.label} ${c.text}`).join(", ")}.`)];
}

async function outbox() {
  const status = await get("/v1/events/outboxStatus");
  const lag = seconds(status.oldestPendingAge);
  return [
    tiles([
      ["Oldest pending (lag)", lag ? age(lag) : "none"],
      ["Pending", int(status.pendingCount)],
      ["Retrying", int(status.retryingCount)],
      ["Delivered last hour", int(status.deliveredLastHour)],
    ]),
    h("p", { class: "muted" }, `Last delivery ${time(status.lastDeliveredAt)}.`),
    status.lastError ? h("p", { class: "error" }, `Last error: ${status.lastError}`) : null,
    (status.byKind || []).length > 1 ? table(["kind", "pending", "retrying", "delivered"], status.byKind.map((k) =>
      [label(k.kind, "OUTBOX_MESSAGE_KIND_"), int(k.pendingCount), int(k.retryingCount), int(k.deliveredCount)]),
    { class: "compact" }) : null,
  ];
}
