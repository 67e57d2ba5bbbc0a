"""The operator console in headless Chromium against the real gateway and services: every page
clicked through with data seeded through the APIs, assertions on what an operator sees, and a
screenshot of each step; bad input (an invalid policy, an unknown member) shows a clear message."""

from __future__ import annotations

import json
import re

import grpc
import httpx
import pytest
from playwright.sync_api import expect

from loyalty.scoring.v1 import evaluation_pb2 as E
from loyalty.scoring.v1 import scoring_service_pb2 as S
from loyalty.scoring.v1.scoring_service_pb2_grpc import ScoringServiceStub
from tests.conftest import bearer
from tests.console.conftest import POLICY_ID, Console, Seeded
from tests.scoring.conftest import Stack, uid

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


FAIRNESS_SLUGS = {E.FAIRNESS_DIMENSION_CHANNEL: "channel", E.FAIRNESS_DIMENSION_REGION: "region",
                  E.FAIRNESS_DIMENSION_GENDER: "gender", E.FAIRNESS_DIMENSION_AGE_BAND: "age-band",
                  E.FAIRNESS_DIMENSION_TENURE_BAND: "tenure-band"}


def test_fairness_view_shows_the_reports_groups_and_flags(console: Console, console_stack: Stack) -> None:
    """The three members who bought least are women of CN-SH (the first two) and CN-BJ, the three
    who bought most men of CN-BJ: with groups of three judged, the women's share at or above silver
    is flagged against the men's, and CN-SH's two members are too few to judge."""
    page, seeded = console.page, console.seeded
    with httpx.Client(base_url=seeded.url, headers={"authorization": f"Bearer {seeded.token}"}, timeout=20) as http:
        for i, member in enumerate(seeded.members):
            body = {"requestId": uid("rq"), "updateMask": "gender,region",
                    "member": {"gender": "GENDER_FEMALE" if i < 3 else "GENDER_MALE",
                               "region": "CN-SH" if i < 2 else "CN-BJ"}}
            reply = http.patch(f"/v1/members/{member}", json=body)
            assert reply.status_code == 200, reply.text
        runs = http.get("/v1/evaluations", params={"pageSize": 1, "state": "EVALUATION_STATE_SUCCEEDED",
                                                   "dryRunFilter": "DRY_RUN_FILTER_APPLIED_RUNS_ONLY"}).json()["runs"]
    run_id = runs[0]["runId"]  # the newest applied run
    with grpc.insecure_channel(console_stack.address("scoring")) as channel:
        report = ScoringServiceStub(channel).GetFairnessReport(
            S.GetFairnessReportRequest(run_id=run_id, min_group_size=3), metadata=bearer(seeded.token),
            timeout=20).report
    assert report.flagged_count >= 1 and any(g.insufficient_data for g in report.groups)  # the data exercise both

    console.open("fairness")
    page.get_by_label("Evaluation run").select_option(run_id)
    expect(page.get_by_label("Reference tier")).to_have_value(report.reference_tier_id)
    page.get_by_label("Minimum group size").fill("3")
    page.get_by_role("button", name="Show report").click()
    expect(page).to_have_url(re.compile(rf"#/fairness/{run_id}\?.*min=3"))
    results = page.locator("#fairness")
    expect(results.locator(".tile", has_text="Flagged groups").locator("dd")).to_have_text(str(report.flagged_count))
    expect(results.locator(".tile", has_text="Reference")).to_contain_text(f"{report.reference_tier_id} or better")
    expect(page.locator("#fairness-summary")).to_contain_text(f"{report.flagged_count} group")
    for name in report.protected_attributes:
        expect(page.locator(f"#protected li[data-attribute='{name}']")).to_have_count(1)
    expect(page.locator("#protected li")).to_have_count(len(report.protected_attributes))

    for dimension, slug in FAIRNESS_SLUGS.items():
        groups = [g for g in report.groups if g.dimension == dimension]
        section = page.locator(f"#dim-{slug}")
        expect(section.locator("tbody tr")).to_have_count(len(groups))
        expect(section.get_by_role("img", name=re.compile("ratio to the best group"))).to_be_visible()
        priced = any(g.HasField("average_benefit_value") for g in groups)  # this policy prices no tier
        expect(section.locator("th", has_text="avg benefit value")).to_have_count(1 if priced else 0)
        for group in groups:
            row = section.locator(f"tbody tr[data-group='{group.group}']")
            expect(row.locator("td.members")).to_have_text(f"{group.member_count:,}")
            expect(row.locator("td.ratio")).to_have_text(f"{group.ratio_to_best:.2f}")
            expect(row.locator("td.rate")).to_have_text(f"{group.reference_rate * 100:.1f}%")
            status = "flagged" if group.flagged else "insufficient data (< 3)" if group.insufficient_data else "ok"
            expect(row.locator("td.status")).to_contain_text(status)
            expect(row).to_have_class("group-flagged" if group.flagged else
                                      "group-insufficient" if group.insufficient_data else "group-judged")
    expect(page.locator("#fairness tbody tr.group-flagged")).to_have_count(report.flagged_count)
    expect(page.locator("#dim-gender tbody tr[data-group='GENDER_FEMALE']")).to_have_class("group-flagged")
    expect(page.locator("#dim-region tbody tr[data-group='CN-SH']")).to_have_class("group-insufficient")

    outliers = page.locator("#outliers tbody tr")
    expect(outliers).to_have_count(len(report.outlier_treatment))
    for row, treatment in zip(outliers.all(), report.outlier_treatment, strict=True):
        expect(row).to_contain_text(treatment.feature_name)
    console.shot("11-fairness")

    # A link to the report keeps its settings; the default minimum size judges no group here.
    console.open(f"fairness/{run_id}")
    expect(page.locator("#fairness .tile", has_text="Flagged groups").locator("dd")).to_have_text("0")
    expect(page.locator("#fairness tbody tr.group-flagged")).to_have_count(0)
    assert console.errors == []
