// Fairness: an evaluation run's tier outcomes per group of each dimension (channel, region, gender,
// age band, tenure band), judged by the four-fifths rule: a group whose share at or above the
// reference tier is under the threshold times the best group's is flagged, unless it is too small to
// judge. Also the protected attributes the report groups by and each feature's outlier treatment.

import { get } from "../api.js";
import { ratioBars } from "../charts.js";
import { errorBox, h, int, label, money, number, percent, table, tiles, time } from "../dom.js";

const RUNS_SHOWN = 50;
const RATIO_DEFAULT = 0.8; // the RPC's defaults, shown in the form
const MIN_GROUP_DEFAULT = 100;
const DIMENSIONS = [
  ["FAIRNESS_DIMENSION_CHANNEL", "Channel", "channel"],
  ["FAIRNESS_DIMENSION_REGION", "Region", "region"],
  ["FAIRNESS_DIMENSION_GENDER", "Gender", "gender"],
  ["FAIRNESS_DIMENSION_AGE_BAND", "Age band", "age-band"],
  ["FAIRNESS_DIMENSION_TENURE_BAND", "Tenure band", "tenure-band"],
];
const UNKNOWN_GROUPS = { CHANNEL_UNSPECIFIED: "unknown", GENDER_UNSPECIFIED: "not provided",
  AGE_BAND_UNSPECIFIED: "no birth date", "": "(unknown)" };

// The group as an operator reads it: "GENDER_FEMALE" → "female", "AGE_BAND_25_TO_34" → "25 to 34".
function groupName(group) {
  if (group in UNKNOWN_GROUPS) return UNKNOWN_GROUPS[group];
  const prefix = /^(CHANNEL_|GENDER_|AGE_BAND_)/.exec(group);
  return prefix ? label(group, prefix[1]) : group;
}

function runName(run) {
  return `${run.runId} · ${run.policy.policyId} v${run.policy.version} · as of ${time(run.asOf)}`
    + `${run.dryRun ? " · dry run" : ""}`;
}

// `query` is the text after "?" in #/fairness/RUN?ref=silver&ratio=0.8&min=100.
export async function render(root, runId = "", query = "") {
  const params = new URLSearchParams(query || "");
  root.append(h("h1", {}, "Fairness"),
    h("p", { class: "muted" }, "Tier outcomes per group under the four-fifths rule: a group whose share at or above the "
      + "reference tier is under the threshold times the best group's is flagged; groups under the minimum size are "
      + "shown but never flagged."));
  const reply = await get("/v1/evaluations", { pageSize: RUNS_SHOWN, state: "EVALUATION_STATE_SUCCEEDED" });
  const runs = reply.runs || [];
  if (runId && !runs.some((run) => run.runId === runId)) {
    // An older run, or one named in a link: look it up (NOT_FOUND and unfinished runs show their error).
    try {
      runs.unshift((await get(`/v1/evaluations/${encodeURIComponent(runId)}`)).run);
    } catch (error) {
      root.append(errorBox(error));
      return;
    }
  }
  if (!runs.length) {
    root.append(h("p", { class: "muted" }, "No succeeded evaluation run yet: run one (loyalty evaluations run)."));
    return;
  }
  const chosen = runs.find((run) => run.runId === runId) || runs[0];
  root.append(form(runs, chosen, params));
  if (!runId) {
    root.append(h("p", { class: "muted", id: "fairness" }, "Pick a run and show its report."));
    return;
  }
  const results = h("div", { id: "fairness", "aria-live": "polite" }, h("p", { class: "muted" }, "Loading…"));
  root.append(results);
  try {
    const { report } = await get(`/v1/evaluations/${encodeURIComponent(chosen.runId)}/fairnessReport`, {
      referenceTierId: params.get("ref") || "", ratioThreshold: params.get("ratio") || "",
      minGroupSize: params.get("min") || "" });
    results.replaceChildren(...show(report, chosen));
  } catch (error) {
    results.replaceChildren(errorBox(error));
  }
}

function ladderOf(run) {
  const ids = (run.thresholds || []).map((t) => t.tierId);
  return ids.length ? ids : (run.tierCounts || []).map((c) => c.tierId);
}

function form(runs, chosen, params) {
  const runSelect = h("select", { id: "fairness-run", name: "run" },
    runs.map((run) => h("option", { value: run.runId, selected: run.runId === chosen.runId }, runName(run))));
  const tierSelect = h("select", { id: "fairness-ref", name: "ref" });
  const fillTiers = () => {
    const run = runs.find((r) => r.runId === runSelect.value) || chosen;
    const ladder = ladderOf(run);
    const wanted = params.get("ref") || ladder[1] || "";
    tierSelect.replaceChildren(...ladder.slice(1).map((id) => h("option", { value: id, selected: id === wanted },
      `${id} or better`)));
  };
  fillTiers();
  runSelect.addEventListener("change", fillTiers);
  const ratio = h("input", { id: "fairness-ratio", name: "ratio", type: "number", min: 0, max: 1, step: 0.05,
    value: params.get("ratio") || RATIO_DEFAULT, required: true });
  const minGroup = h("input", { id: "fairness-min", name: "min", type: "number", min: 0, max: 1000000, step: 1,
    value: params.get("min") || MIN_GROUP_DEFAULT, required: true });
  return h("form", { class: "search fairness-form", onsubmit: (event) => {
    event.preventDefault();
    const query = new URLSearchParams({ ref: tierSelect.value, ratio: ratio.value, min: minGroup.value });
    window.location.hash = `#/fairness/${encodeURIComponent(runSelect.value)}?${query}`;
  } },
  h("div", {}, h("label", { for: "fairness-run" }, "Evaluation run"), runSelect),
  h("div", {}, h("label", { for: "fairness-ref" }, "Reference tier"), tierSelect),
  h("div", {}, h("label", { for: "fairness-ratio" }, "Ratio threshold"), ratio),
  h("div", {}, h("label", { for: "fairness-min" }, "Minimum group size"), minGroup),
  h("button", { type: "submit", class: "primary" }, "Show report"));
}

function show(report, run) {
  const threshold = Number(report.ratioThreshold || RATIO_DEFAULT);
  const minGroup = int(report.minGroupSize);
  const groups = report.groups || [];
  const flagged = Number(report.flaggedCount || 0);
  const protectedAttributes = report.protectedAttributes || [];
  return [
    h("p", {}, "Run ", h("code", {}, report.runId), run.dryRun ? " (dry run)" : " (applied)"),
    tiles([
      ["Policy", `${report.policy.policyId} v${report.policy.version}`],
      ["As of", time(report.asOf)],
      ["Reference", `${report.referenceTierId} or better`],
      ["Threshold", `${percent(threshold)} of best`, `groups under ${minGroup} members not judged`],
      ["Flagged groups", String(flagged)],
    ]),
    h("p", { id: "fairness-summary", class: flagged ? "bad" : "ok", role: "status" }, flagged
      ? `${flagged} group${flagged > 1 ? "s are" : " is"} under ${percent(threshold)} of the best group's share at or `
        + `above ${report.referenceTierId}.`
      : `No group is under ${percent(threshold)} of the best group's share at or above ${report.referenceTierId}.`),
    h("section", { class: "panel", id: "protected" }, h("h2", {}, "Protected attributes"),
      protectedAttributes.length
        ? h("ul", { class: "tags" }, protectedAttributes.map((name) => h("li", { "data-attribute": name },
          name.replaceAll("_", " "))))
        : h("p", { class: "muted" }, "None among the dimensions reported."),
      h("p", { class: "muted" }, "The report groups members by these; no policy may use them as a feature "
        + "(creating or validating one that does is refused).")),
    h("div", { class: "fairness-dimensions" }, DIMENSIONS.map(([dimension, title, slug]) => {
      const rows = groups.filter((g) => g.dimension === dimension);
      return rows.length ? dimensionPanel(title, slug, rows, report, threshold) : null;
    })),
    h("section", { class: "panel", id: "outliers" }, h("h2", {}, "Outlier treatment per feature"),
      table(["feature", "transform", "cap", "members capped"], (report.outlierTreatment || []).map((o) => {
        const winsorized = o.transform === "TRANSFORM_KIND_WINSORIZE";
        return [h("code", {}, o.featureName), label(o.transform, "TRANSFORM_KIND_"),
          winsorized ? number(o.cap, 2) : (/LOG1P|RANK_PERCENTILE/.test(o.transform || "") ? "none (compressed)" : "none"),
          winsorized ? int(o.membersCapped) : "–"];
      }), { class: "compact" })),
    h("p", { class: "muted" }, `Generated ${time(report.generatedAt)}.`),
  ];
}

function status(group, minGroup) {
  if (group.flagged) return h("span", { class: "flag bad" }, "⚑ flagged");
  if (group.insufficientData) return h("span", { class: "flag muted" }, `insufficient data (< ${minGroup})`);
  return h("span", { class: "flag ok" }, "ok");
}

function dimensionPanel(title, slug, rows, report, threshold) {
  const tierIds = (rows[0].tierShares || []).map((t) => t.tierId);
  const priced = rows.some((g) => g.averageBenefitValue);
  const minGroup = int(report.minGroupSize);
  const headers = ["group", "members", ...tierIds.map((id) => `${id} share`), "mean score",
    ...(priced ? ["avg benefit value / year"] : []), `${report.referenceTierId} or better`, "ratio to best", "status"];
  const state = (g) => (g.flagged ? "flagged" : g.insufficientData ? "insufficient" : "judged");
  const flagged = rows.filter((g) => g.flagged).length;
  return h("section", { class: "panel", id: `dim-${slug}`, "data-dimension": rows[0].dimension },
    h("h2", {}, title, flagged ? h("span", { class: "badge bad" }, `${flagged} flagged`) : null),
    ratioBars(rows.map((g) => ({ key: g.group, label: groupName(g.group), value: Number(g.ratioToBest || 0),
      state: state(g) })), threshold, `${title}: ratio to the best group`),
    h("div", { class: "scroll" }, h("table", { class: "fairness" },
      h("thead", {}, h("tr", {}, headers.map((name) => h("th", { scope: "col" }, name)))),
      h("tbody", {}, rows.map((g) => {
        const shares = new Map((g.tierShares || []).map((t) => [t.tierId, t.share]));
        return h("tr", { "data-group": g.group, class: `group-${state(g)}` },
          h("th", { scope: "row" }, groupName(g.group)),
          h("td", { class: "members" }, int(g.memberCount)),
          tierIds.map((id) => h("td", {}, percent(shares.get(id)))),
          h("td", {}, number(g.averageScore, 3)),
          priced ? h("td", {}, money(g.averageBenefitValue)) : null,
          h("td", { class: "rate" }, percent(g.referenceRate)),
          h("td", { class: "ratio" }, number(g.ratioToBest, 2)),
          h("td", { class: "status" }, status(g, minGroup)));
      })))));
}
