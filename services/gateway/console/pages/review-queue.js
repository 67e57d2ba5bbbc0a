// Review queue: open risk cases oldest first, a case in full (reasons, signals, the member's
// history) and its resolution (approve releases the held points, reject voids them).

import { get, listAll, post, requestId } from "../api.js";
import { barChart } from "../charts.js";
import { age, errorBox, h, int, label, money, number, panel, seconds, table, tiles, time } from "../dom.js";

const ANALYST_KEY = "loyalty.console.analyst";
const AGE_BUCKETS = [["< 1 h", 3600], ["1–24 h", 86400], ["1–3 d", 3 * 86400], ["> 3 d", Infinity]];
const ATTACK_TYPES = ["", "ATTACK_TYPE_VELOCITY_BURST", "ATTACK_TYPE_SMALL_ORDER_FARMING",
  "ATTACK_TYPE_DEVICE_IP_RING", "ATTACK_TYPE_REFUND_ABUSE", "ATTACK_TYPE_NEW_ACCOUNT_LARGE_ACCRUAL",
  "ATTACK_TYPE_IMPOSSIBLE_BROWSE", "ATTACK_TYPE_ORDER_ID_REUSE", "ATTACK_TYPE_OTHER"];

let flash = null; // shown once on the queue after a resolution

function caseAge(item) {
  return item.createdAt ? (Date.now() - new Date(item.createdAt).getTime()) / 1000 : seconds(item.age);
}

function reasonsText(reasons) {
  return (reasons || []).map((r) => r.description || r.ruleId).join("; ") || "–";
}

export function renderQueue(root) {
  root.append(h("h1", {}, "Review queue"));
  if (flash) {
    root.append(h("p", { class: "ok", role: "status", id: "flash" }, flash));
    flash = null;
  }
  root.append(panel("Open cases, oldest first", async () => {
    const { items, truncated } = await listAll("/v1/risk/cases", {}, "cases", 500);
    const cases = items.sort((a, b) => caseAge(b) - caseAge(a));
    if (!cases.length) return h("p", { class: "muted", id: "queue-empty" }, "No open case.");
    const buckets = AGE_BUCKETS.map(([name, limit], i) => ({
      label: name,
      value: cases.filter((c) => caseAge(c) < limit && (i === 0 || caseAge(c) >= AGE_BUCKETS[i - 1][1])).length,
    }));
    return [
      h("p", {}, `${cases.length}${truncated ? "+" : ""} open case${cases.length === 1 ? "" : "s"}.`),
      barChart(buckets, "Open cases by age"),
      table(["age", "case", "member", "points held", "amount", "reasons", "SLA", "status"], cases.map((c) => [
        age(caseAge(c)),
        h("a", { href: `#/cases/${encodeURIComponent(c.caseId)}` }, c.caseId.slice(0, 8)),
        h("a", { href: `#/members/${encodeURIComponent(c.memberId)}` }, c.memberId),
        int(c.pointsHeld), money(c.amount), reasonsText(c.reasons),
        c.slaBreached ? h("strong", { class: "bad" }, "breached") : `due ${time(c.slaDueAt)}`,
        label(c.status, "CASE_STATUS_") + (c.assigneeId ? ` (${c.assigneeId})` : ""),
      ]), { id: "queue", "data-count": cases.length }),
    ];
  }, { id: "open-cases" }));
}

export function renderCase(root, caseId) {
  root.append(h("p", {}, h("a", { href: "#/cases" }, "← Review queue")), h("h1", {}, `Case ${caseId}`));
  root.append(panel("Case", async () => {
    const detail = await get(`/v1/risk/cases/${encodeURIComponent(caseId)}`);
    return caseView(detail);
  }, { id: "case" }));
}

function caseView({ case: item, assessment = {}, memberSignals = {}, memberContext = {}, recentAssessments = [] }) {
  const open = ["CASE_STATUS_OPEN", "CASE_STATUS_ASSIGNED"].includes(item.status);
  const signals = [...(assessment.topSignals || []), ...(memberSignals.signals || [])];
  return [
    tiles([["Status", label(item.status, "CASE_STATUS_")], ["Member", h("a", { href: `#/members/${encodeURIComponent(item.memberId)}` }, item.memberId)],
      ["Points held", int(item.pointsHeld)], ["Amount", money(item.amount)], ["Risk score", number(item.score)],
      ["Age", age(caseAge(item))]]),
    h("p", { class: "muted" }, `Order ${item.orderId || "–"}, event ${item.sourceEventId}, opened ${time(item.createdAt)}, `
      + `SLA ${item.slaBreached ? "breached" : `due ${time(item.slaDueAt)}`}.`),
    item.resolution ? h("p", { class: "ok" }, `Resolved ${label(item.status, "CASE_STATUS_")} by ${item.resolution.analystId || "?"}: `
      + `${item.resolution.note || "(no note)"}`) : null,
    h("h3", {}, "Reasons"),
    table(["rule", "why", "observed", "limit", "action"], (item.reasons || []).map((r) => [
      r.ruleId || label(r.source, "REASON_SOURCE_"), r.description, number(r.observedValue), number(r.limit),
      label(r.action, "RULE_ACTION_")]), { id: "reasons" }),
    h("h3", {}, "Signals"),
    tiles([
      ...(memberSignals.velocity || []).map((v) => [`Accruals in ${age(seconds(v.window))}`, int(v.accrualCount), `${int(v.points)} points`]),
      ["Devices / IPs 24 h", `${int(memberSignals.distinctDevices24h)} / ${int(memberSignals.distinctIps24h)}`],
      ["Points vs own median", `×${number(memberSignals.pointsVsOwnMedian)}`],
      ["Points vs peers", `×${number(memberSignals.pointsVsPeerMedian)}`],
    ]),
    signals.length ? h("details", {}, h("summary", {}, `All ${signals.length} signal values`),
      table(["signal", "value"], signals.map((sig) => [sig.name, number(sig.value, 3)]), { class: "compact" })) : null,
    h("h3", {}, "Member history"),
    tiles([["Member since", time(memberContext.memberSince)], ["Assessments", int(memberContext.assessmentsTotal)],
      ["Reviewed / blocked", `${int(memberContext.assessmentsReviewed)} / ${int(memberContext.assessmentsBlocked)}`],
      ["Open / approved / rejected cases", `${int(memberContext.openCases)} / ${int(memberContext.approvedCases)} / ${int(memberContext.rejectedCases)}`],
      ["Fraud labels", int(memberContext.fraudLabels)]]),
    table(["assessed", "decision", "points", "amount", "reasons"], recentAssessments.map((a) => [
      time(a.assessedAt), label(a.decision, "DECISION_"), int(a.pointsProposed), money(a.amount), reasonsText(a.reasons)]),
    { class: "compact", id: "history" }),
    open ? resolveForm(item) : null,
  ];
}

function resolveForm(item) {
  const note = h("textarea", { id: "note", rows: 3, maxlength: 2000 });
  const analyst = h("input", { id: "analyst", value: localStorage.getItem(ANALYST_KEY) || "console" });
  const attack = h("select", { id: "attack-type" }, ATTACK_TYPES.map((value) =>
    h("option", { value }, value ? label(value, "ATTACK_TYPE_") : "(not fraud / unknown)")));
  const result = h("div", { "aria-live": "polite" });
  const approve = h("button", { type: "button", class: "primary" }, "Approve");
  const reject = h("button", { type: "button", class: "danger" }, "Reject");
  const resolve = (decision, verb) => async () => {
    approve.disabled = reject.disabled = true;
    try {
      localStorage.setItem(ANALYST_KEY, analyst.value);
      await post(`/v1/risk/cases/${encodeURIComponent(item.caseId)}:resolve`, {
        requestId: requestId("console-resolve"), decision, analystId: analyst.value, note: note.value,
        ...(decision === "CASE_DECISION_REJECT" && attack.value ? { attackType: attack.value } : {}),
      });
      flash = `Case ${item.caseId} ${verb}: rewards ${verb === "approved" ? "releases" : "voids"} ${int(item.pointsHeld)} held points.`;
      window.location.hash = "#/cases";
    } catch (error) {
      result.replaceChildren(errorBox(error));
      approve.disabled = reject.disabled = false;
    }
  };
  approve.addEventListener("click", resolve("CASE_DECISION_APPROVE", "approved"));
  reject.addEventListener("click", resolve("CASE_DECISION_REJECT", "rejected"));
  return h("form", { class: "resolve", onsubmit: (event) => event.preventDefault() },
    h("h3", {}, "Resolve"),
    h("label", { for: "analyst" }, "Analyst"), analyst,
    h("label", { for: "note" }, "Note"), note,
    h("label", { for: "attack-type" }, "Attack type (reject)"), attack,
    h("div", { class: "actions" }, approve, reject), result);
}

