// The console's shell: sign-in with an operator token (kept for this tab only), and a hash router
// that renders each page into a fresh container, so a slow answer for a page left behind lands in
// a detached element instead of the page on screen.

import { clearToken, setToken, token } from "./api.js";
import { h } from "./dom.js";
import * as dashboard from "./pages/dashboard.js";
import * as fairness from "./pages/fairness.js";
import * as member from "./pages/member.js";
import * as policyLab from "./pages/policy-lab.js";
import * as reviewQueue from "./pages/review-queue.js";

const ROUTES = [
  [/^dashboard$/, (root) => dashboard.render(root), "dashboard"],
  [/^policies$/, (root) => policyLab.render(root), "policies"],
  [/^fairness$/, (root) => fairness.render(root), "fairness"],
  [/^fairness\/([^?]+)(?:\?(.*))?$/, (root, id, query) => fairness.render(root, id, query), "fairness"],
  [/^cases$/, (root) => reviewQueue.renderQueue(root), "cases"],
  [/^cases\/(.+)$/, (root, id) => reviewQueue.renderCase(root, id), "cases"],
  [/^members$/, (root) => member.renderSearch(root), "members"],
  [/^members\/(.+)$/, (root, id) => member.renderMember(root, id), "members"],
];

function route() {
  const view = document.getElementById("view");
  const root = h("div", { class: "page" });
  view.replaceChildren(root);
  const path = window.location.hash.replace(/^#\/?/, "") || "dashboard";
  if (!token()) {
    root.append(h("h1", {}, "Sign in"), h("p", {}, "Paste an operator token above (`loyalty tokens` lists the "
      + "development ones). The console calls the gateway's HTTP API with it; it is kept for this tab only."));
    return;
  }
  for (const [pattern, render, section] of ROUTES) {
    const match = pattern.exec(path);
    if (!match) continue;
    for (const link of document.querySelectorAll("#nav a")) {
      link.toggleAttribute("aria-current", link.dataset.section === section);
    }
    const parts = match.slice(1).map((part) => (part === undefined ? "" : decodeURIComponent(part)));
    Promise.resolve(render(root, ...parts)).catch((error) => {
      root.append(h("div", { class: "error", role: "alert" }, h("p", {}, error.message || String(error))));
    });
    return;
  }
  root.append(h("h1", {}, "Not found"), h("p", {}, `No console page at #/${path}.`));
}

function showSignedIn() {
  const signedIn = Boolean(token());
  document.getElementById("signin").hidden = signedIn;
  document.getElementById("signout").hidden = !signedIn;
}

document.getElementById("signin").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("token");
  setToken(input.value.trim());
  input.value = "";
  showSignedIn();
  route();
});
document.getElementById("signout").addEventListener("click", () => {
  clearToken();
  showSignedIn();
  route();
});
window.addEventListener("hashchange", route);
showSignedIn();
route();
