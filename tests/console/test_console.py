"""The operator console in headless Chromium against the real gateway and services: every page
clicked through with data seeded through the APIs, assertions on what an operator sees, and a
screenshot of each step; bad input (an invalid policy, an unknown member) shows a clear message."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from playwright.sync_api import expect

from tests.console.conftest import POLICY_ID, Console, Seeded

pytestmark = pytest.mark.e2e


def test_console_is_served_with_its_own_policy(seeded: Seeded) -> None:
    url = seeded.url
    page = httpx.get(f"{url}/console/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    script = httpx.get(f"{url}/console/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{url}/console/app.js", headers={"if-none-match": script.headers["etag"]}).status_code == 304
    assert httpx.get(f"{url}/console", follow_redirects=False).headers["location"] == "/console/"
    missing = httpx.get(f"{url}/console/../openapi.json.bak")
    assert missing.status_code == 404 and missing.json()["code"] == 5


def test_dashboard_shows_tiers_points_risk_and_outbox(console: Console) -> None:
    page = console.page
    console.open("dashboard")
    tiers = page.locator("#tiers")
    expect(tiers.get_by_role("img", name="Members per tier over evaluation runs")).to_be_visible()
    expect(tiers.locator("svg circle")).to_have_count(6)  # three tiers, two applied runs
    expect(page.locator("#latest-tiers")).to_contain_text("gold")
    expect(tiers).to_contain_text("6 members")

    points = page.locator("#points")
    expect(points).to_contain_text("Ledger balanced")
    issued = points.locator(".tile", has_text="Issued").locator("dd")
    assert int(issued.inner_text().replace(",", "")) > 0
    expect(points.locator(".tile", has_text="Outstanding liability")).to_contain_text("CNY")

    expect(page.locator("#risk")).to_contain_text("review 2")
    expect(page.locator("#outbox").locator(".tile", has_text="Oldest pending")).to_contain_text("none")
    expect(page.locator("#outbox").locator(".tile", has_text="Delivered last hour").locator("dd")).not_to_have_text("0")
    console.shot("01-dashboard")
    assert console.errors == []


def test_policy_lab_dry_runs_then_activates_after_confirmation(console: Console) -> None:
    page = console.page
    console.open("policies")
    expect(page.locator("#active-policy")).to_contain_text(f"{POLICY_ID} v1")
    editor = page.locator("#policy-json")
    expect(editor).to_have_value(re.compile(POLICY_ID))
    candidate = json.loads(editor.input_value())
    candidate["quantile"] = {"targetShareBps": [3400, 3300, 3300]}  # two members per tier
    editor.fill(json.dumps(candidate, indent=2, ensure_ascii=False))

    page.get_by_role("button", name="Dry-run").click()
    heat = page.get_by_role("img", name="Tier migration heatmap")
    expect(heat).to_be_visible(timeout=30_000)
    expect(page.locator("#dry-run")).to_contain_text(f"Draft {POLICY_ID} v2")
    cells = heat.locator(".heat-cell")
    expect(cells).to_have_count(9)  # 3 × 3 tiers, everybody had a tier
    total = sum(int(cell.locator("text").text_content() or "0") for cell in cells.all())
    assert total == 6
    expect(page.locator("#candidate-tiers")).to_contain_text("silver")
    distribution = page.get_by_role("img", name="Score distribution with tier thresholds")
    expect(distribution).to_be_visible()
    expect(distribution.locator(".threshold")).to_have_count(2)
    console.shot("02-policy-lab-dry-run")

    page.get_by_role("button", name=f"Activate {POLICY_ID} v2…").click()
    dialog = page.get_by_role("alertdialog", name="Confirm activation")
    expect(dialog).to_contain_text(f"in place of {POLICY_ID} v1")
    console.shot("03-policy-lab-confirm")
    with httpx.Client(base_url=console.seeded.url,
                      headers={"authorization": f"Bearer {console.seeded.token}"}) as http:
        assert http.get("/v1/policies:active").json()["policy"]["version"] == 1  # nothing before confirming
        dialog.get_by_role("button", name="Confirm activation").click()
        expect(page.get_by_role("status")).to_contain_text(
            f"{POLICY_ID} v2 is now the active policy (was {POLICY_ID} v1)")
        assert http.get("/v1/policies:active").json()["policy"]["version"] == 2
    console.shot("04-policy-lab-activated")
    assert console.errors == []


def test_policy_lab_shows_each_invalid_field(console: Console) -> None:
    page = console.page
    console.open("policies")
    editor = page.locator("#policy-json")
    expect(editor).to_have_value(re.compile(POLICY_ID))
    candidate = json.loads(editor.input_value())
    del candidate["displayName"]
    candidate["tiers"] = candidate["tiers"][:1]
    editor.fill(json.dumps(candidate, ensure_ascii=False))
    page.get_by_role("button", name="Validate").click()
    problems = page.locator("#policy-problems .violations")
    expect(problems.locator("li[data-field='display_name']")).to_contain_text("is required")
    expect(problems.locator("li[data-field='tiers']")).to_contain_text("at least 2")
    console.shot("05-policy-lab-invalid")

    editor.fill('{"policyId": "x",')
    page.get_by_role("button", name="Dry-run").click()
    expect(page.locator("#policy-problems")).to_contain_text("Not valid JSON")
    assert console.errors == []


def test_review_queue_approves_a_case_and_it_leaves_the_open_list(console: Console) -> None:
    page = console.page
    first, second = console.seeded.cases
    console.open("cases")
    queue = page.locator("#queue")
    expect(queue).to_contain_text(console.seeded.case_member)
    expect(page.get_by_role("img", name="Open cases by age")).to_be_visible()
    expect(queue.get_by_role("link", name=first[:8])).to_be_visible()
    console.shot("06-review-queue")

    queue.get_by_role("link", name=first[:8]).click()
    expect(page.locator("#reasons")).to_contain_text("velocity_1h")
    expect(page.locator("#case")).to_contain_text("Accruals in 1 h")
    expect(page.locator("#history")).to_contain_text("review")
    page.get_by_label("Note").fill("known customer, sale day")
    console.shot("07-case-detail")
    page.get_by_role("button", name="Approve").click()

    expect(page.locator("#flash")).to_contain_text(f"Case {first} approved")
    expect(page.locator("#queue")).to_contain_text(second[:8])
    expect(page.locator("#queue").get_by_role("link", name=first[:8])).to_have_count(0)
    console.shot("08-review-queue-after-approval")
    assert console.errors == []


def test_member_view_shows_ledger_and_tier_explanation(console: Console) -> None:
    page = console.page
    member = console.seeded.members[-1]  # six purchases: the top tier
    console.open("members")
    page.get_by_label("Member id").fill(member)
    page.get_by_role("button", name="Show").click()
    expect(page.get_by_role("heading", name=f"Member {member}")).to_be_visible()
    expect(page.locator("#tier")).to_contain_text("Gold")
    expect(page.locator("#contributions")).to_contain_text("orders (365 days)")
    expect(page.locator("#tier-summary")).not_to_be_empty()
    entries = page.locator("#ledger-entries tbody tr")
    expect(entries).to_have_count(6)
    expect(entries.first).to_contain_text("credit")
    expect(entries.first).to_contain_text("accrual · order o-")
    expect(page.locator("#portrait")).to_contain_text("lifetime")
    expect(page.locator("#balance").locator(".tile", has_text="Available")).not_to_contain_text("–")
    expect(page.locator("#benefits")).to_be_visible()
    expect(page.locator("#expiring")).not_to_contain_text("Loading")
    console.shot("09-member")
    assert console.errors == []


def test_member_view_says_when_a_member_does_not_exist(console: Console) -> None:
    page = console.page
    console.open("members/nobody-here")
    expect(page.locator("#not-found")).to_contain_text("No member with id “nobody-here”.")
    console.shot("10-member-not-found")
    assert console.errors == []
