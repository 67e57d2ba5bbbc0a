// Policy lab: edit a candidate policy as JSON (proto3 JSON of loyalty.scoring.v1.Policy), validate
// it, dry-run it (a DRAFT version and a dry evaluation run: nothing changes for members), read the
// migration matrix and the score distribution against the thresholds, then activate it after a
// confirmation.

import { contentId, get, listAll, post, requestId } from "../api.js";
import { heatmap, histogram } from "../charts.js";
import { errorBox, h, int, panel, table, tiles } from "../dom.js";

const OUTPUT_ONLY = ["version", "state", "createdBy", "createdAt", "activatedBy", "activatedAt", "retiredAt",
  "fitId", "featureCatalogueVersion"];
const RUN_POLL_MS = 300;
const RUN_WAIT_MS_MAX = 120_000;
const EXAMPLE = {
  policyId: "tiers-new",
  displayName: "Tiers",
  description: "order count and spend, three tiers by population share",
  features: [
    { featureName: "purchase_count_365d", transform: { kind: "TRANSFORM_KIND_LOG1P" }, weight: 0.5 },
    { featureName: "net_spend_365d", transform: { kind: "TRANSFORM_KIND_LOG1P" }, weight: 0.5 },
  ],
  tiers: [{ tierId: "regular", displayName: "Regular" }, { tierId: "silver", displayName: "Silver" },
    { tierId: "gold", displayName: "Gold" }],
  quantile: { targetShareBps: [6000, 3000, 1000] },
  schedule: { kind: "SCHEDULE_KIND_MANUAL" },
};

export function render(root) {
  const state = { active: null };
  const editor = h("textarea", { id: "policy-json", spellcheck: "false", rows: 28, "aria-describedby": "policy-problems" });
  const problems = h("div", { id: "policy-problems", "aria-live": "polite" });
  const results = h("div", { id: "dry-run", "aria-live": "polite" });
  const activeNote = h("p", { class: "muted", id: "active-policy" }, "Loading the active policy…");
  const busy = (button, work) => async () => {
    button.disabled = true;
    try {
      await work();
    } finally {
      button.disabled = false;
    }
  };
  const validateButton = h("button", { type: "button" }, "Validate");
  const dryRunButton = h("button", { type: "button", class: "primary" }, "Dry-run");
  validateButton.addEventListener("click", busy(validateButton, () => validate(editor, problems)));
  dryRunButton.addEventListener("click", busy(dryRunButton, () => dryRun(editor, problems, results, state)));

  root.append(h("h1", {}, "Policy lab"), h("div", { class: "lab" },
    h("section", { class: "panel" }, h("h2", {}, "Candidate policy"), activeNote,
      h("label", { for: "policy-json" }, "Policy (JSON: loyalty.scoring.v1.Policy, proto3 JSON names)"),
      editor, h("div", { class: "actions" }, validateButton, dryRunButton), problems),
    h("section", { class: "panel" }, h("h2", {}, "Dry run"), results)));
  results.append(h("p", { class: "muted" }, "Dry-run the candidate to see the tier migration it would cause."));

  get("/v1/policies:active").then(({ policy }) => {
    state.active = { policyId: policy.policyId, version: policy.version };
    activeNote.textContent = `Active: ${policy.policyId} v${policy.version} (${policy.displayName}). Edit it below.`;
    editor.value = JSON.stringify(editable(policy), null, 2);
  }, (error) => {
    activeNote.textContent = error.notFound ? "No policy is active yet: start from this example."
      : `Could not load the active policy: ${error.message}`;
    editor.value = JSON.stringify(EXAMPLE, null, 2);
  });
}

function editable(policy) {
  const copy = { ...policy };
  for (const name of OUTPUT_ONLY) delete copy[name];
  return copy;
}

// The editor's policy, or null after showing why it is not JSON.
function parsed(editor, problems) {
  try {
    const value = JSON.parse(editor.value);
    if (value === null || typeof value !== "object" || Array.isArray(value)) throw new SyntaxError("expected a JSON object");
    return value;
  } catch (error) {
    problems.replaceChildren(h("div", { class: "error", role: "alert" }, h("p", {}, `Not valid JSON: ${error.message}`)));
    return null;
  }
}

// Field violations under the editor, one per field, names relative to the policy.
function showProblems(problems, error) {
  const violations = error.violations || [];
  if (!violations.length) {
    problems.replaceChildren(errorBox(error));
    return;
  }
  problems.replaceChildren(h("div", { class: "error", role: "alert" },
    h("p", {}, `The policy has ${violations.length} problem${violations.length > 1 ? "s" : ""}:`),
    h("ul", { class: "violations" }, violations.map((v) => h("li", { "data-field": v.field.replace(/^policy\./, "") },
      h("code", {}, v.field.replace(/^policy\./, "")), " ", v.description)))));
}

async function validate(editor, problems) {
  const policy = parsed(editor, problems);
  if (!policy) return false;
  try {
    const reply = await post("/v1/policies:validate", { policy });
    const warnings = reply.warnings || [];
    problems.replaceChildren(h("div", { class: "ok", role: "status" },
      h("p", {}, "Valid policy."),
      warnings.length ? h("ul", {}, warnings.map((w) => h("li", {}, h("code", {}, w.field), ` ${w.code}: ${w.message}`)))
        : null));
    return true;
  } catch (error) {
    showProblems(problems, error);
    return false;
  }
}

async function dryRun(editor, problems, results, state) {
  const policy = parsed(editor, problems);
  if (!policy) return;
  problems.replaceChildren();
  results.replaceChildren(h("p", { class: "muted" }, "Creating a draft version and dry-running it…"));
  let created;
  try {
    // The same text gives the same request id: dry-running it again reuses the draft it made.
    created = (await post("/v1/policies", { requestId: contentId("console-policy", JSON.stringify(policy)), policy })).policy;
  } catch (error) {
    results.replaceChildren();
    showProblems(problems, error);
    return;
  }
  try {
    let { run } = await post("/v1/evaluations:run", { requestId: requestId("console-dry"), policyId: created.policyId,
      version: created.version, dryRun: true });
    const started = Date.now();
    while (["EVALUATION_STATE_PENDING", "EVALUATION_STATE_RUNNING"].includes(run.state)) {
      if (Date.now() - started > RUN_WAIT_MS_MAX) throw new Error(`run ${run.runId} is still ${run.state}; look again later`);
      await new Promise((resolve) => setTimeout(resolve, RUN_POLL_MS));
      ({ run } = await get(`/v1/evaluations/${encodeURIComponent(run.runId)}`));
    }
    if (run.state !== "EVALUATION_STATE_SUCCEEDED") {
      throw new Error(`dry run ${run.runId} ended ${run.state}: ${run.errorReason} ${run.errorMessage}`);
    }
    results.replaceChildren(...report(created, run, state, results));
  } catch (error) {
    results.replaceChildren(errorBox(error));
  }
}

function report(created, run, state, results) {
  const ladder = (created.tiers || []).map((t) => ({ id: t.tierId, name: t.displayName || t.tierId }));
  const cells = new Map((run.migration || []).map((c) => [`${c.fromTierId || ""}→${c.toTierId}`, Number(c.count)]));
  const hasNew = (run.migration || []).some((c) => !c.fromTierId);
  const froms = [...(hasNew ? [{ id: "", name: "(no tier)" }] : []), ...ladder];
  const usesPoints = Boolean(created.qualifyingPoints);
  const markers = (run.thresholds || []).slice(1).map((t) => ({
    label: ladder.find((tier) => tier.id === t.tierId)?.name || t.tierId,
    value: usesPoints ? Number(t.minPoints || 0) : Number(t.minScore || 0),
  }));
  return [
    h("p", {}, `Draft ${created.policyId} v${created.version}, dry run ${run.runId}.`),
    tiles([["Members", int(run.membersScored)], ["Upgrades", int(run.upgrades)], ["Downgrades", int(run.downgrades)],
      ["Unchanged", int(run.unchanged)], ["New", int(run.newMembers)], ["Held by hysteresis", int(run.heldByHysteresis)]]),
    h("h3", {}, "Tier migration (current tier → candidate tier)"),
    heatmap(froms, ladder, (from, to) => cells.get(`${from}→${to}`) || 0, "Tier migration heatmap"),
    table(["tier", "members", "share", "threshold"], (run.tierCounts || []).map((c) => {
      const threshold = (run.thresholds || []).find((t) => t.tierId === c.tierId) || {};
      return [c.tierId, int(c.count), `${(c.share * 100).toFixed(1)}%`,
        usesPoints ? `${int(threshold.minPoints)} points` : Number(threshold.minScore || 0).toFixed(3)];
    }), { class: "compact", id: "candidate-tiers" }),
    h("h3", {}, usesPoints ? "Qualifying points and thresholds" : "Score distribution and thresholds"),
    panel("", async () => {
      const { items, truncated } = await listAll(`/v1/evaluations/${encodeURIComponent(run.runId)}/scores`, {}, "scores");
      const values = items.map((m) => (usesPoints ? Number(m.qualifyingPoints || 0) : Number(m.score)));
      const d = run.scoreDistribution || {};
      return [histogram(values, markers, "Score distribution with tier thresholds"),
        h("p", { class: "muted" }, `${values.length}${truncated ? "+ (first pages)" : ""} members; `
          + `p10 ${Number(d.p10 || 0).toFixed(2)}, median ${Number(d.p50 || 0).toFixed(2)}, p90 ${Number(d.p90 || 0).toFixed(2)}.`)];
    }, { class: "panel bare" }),
    activation(created, state, results),
  ];
}

function activation(created, state, results) {
  const box = h("div", { class: "activation" });
  const name = `${created.policyId} v${created.version}`;
  const start = h("button", { type: "button", class: "primary" }, `Activate ${name}…`);
  const ask = () => {
    const confirm = h("button", { type: "button", class: "danger" }, "Confirm activation");
    const cancel = h("button", { type: "button" }, "Cancel");
    const replaced = state.active ? `${state.active.policyId} v${state.active.version}` : "no policy";
    box.replaceChildren(h("div", { class: "confirm", role: "alertdialog", "aria-label": "Confirm activation" },
      h("p", {}, `Make ${name} the active policy in place of ${replaced}? Members' tiers change at the next `
        + "applied evaluation, not now."), h("div", { class: "actions" }, confirm, cancel)));
    cancel.addEventListener("click", () => box.replaceChildren(start));
    confirm.addEventListener("click", async () => {
      confirm.disabled = true;
      try {
        const reply = await post(`/v1/policies/${encodeURIComponent(created.policyId)}:activate`, {
          requestId: requestId("console-activate"), version: created.version,
          ...(state.active ? { expectedActivePolicy: state.active } : {}),
        });
        const previous = reply.previousPolicy;
        state.active = { policyId: reply.policy.policyId, version: reply.policy.version };
        box.replaceChildren(h("p", { class: "ok", role: "status" }, `${name} is now the active policy`
          + (previous && previous.policyId ? ` (was ${previous.policyId} v${previous.version}).` : ".")));
        const note = document.getElementById("active-policy");
        if (note) note.textContent = `Active: ${name}.`;
      } catch (error) {
        box.replaceChildren(errorBox(error), start);
      }
    });
  };
  start.addEventListener("click", ask);
  box.append(start);
  return box;
}
