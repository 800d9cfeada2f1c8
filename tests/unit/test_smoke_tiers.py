"""tests.run_tiers: pytest arguments per tier and the summary read from junit XML."""

from __future__ import annotations

from pathlib import Path

from tests import run_tiers


def test_tier_directory_is_the_target_unless_files_of_the_tier_are_named(tmp_path):
    junit = tmp_path / "junit-kernel.xml"
    args = run_tiers._pytest_args("kernel", ["-x"], junit)
    assert args[:3] == ["-m", "pytest", "tests/kernel"]
    assert f"--junitxml={junit}" in args and args[-1] == "-x"
    named = run_tiers._pytest_args("kernel", ["tests/kernel/test_gretap_smoke.py"], junit)
    assert "tests/kernel" not in named and named[-1] == "tests/kernel/test_gretap_smoke.py"


def test_only_the_unit_tier_runs_in_several_workers_and_every_tier_lists_its_slowest(tmp_path):
    unit = run_tiers._pytest_args("unit", [], tmp_path / "junit-unit.xml")
    assert unit[unit.index("-n") + 1] == "4"
    for tier in ("netns", "pg", "kernel", "multikernel"):
        args = run_tiers._pytest_args(tier, [], tmp_path / f"junit-{tier}.xml")
        assert "-n" not in args and f"--durations={run_tiers.SLOWEST}" in args


def test_junit_summary_counts_passed_failed_errors_skipped(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text('<?xml version="1.0"?><testsuites><testsuite name="kernel" '
                     'tests="7" failures="1" errors="2" skipped="1" time="3.2"/></testsuites>')
    assert run_tiers._junit_summary(junit) == ("3 passed, 1 failures, 2 errors, 1 skipped", 7)


def test_a_tier_whose_every_test_skipped_says_why(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text('<?xml version="1.0"?><testsuites><testsuite name="system" tests="2" '
                     'failures="0" errors="0" skipped="2"><testcase name="a"><skipped '
                     'message="no host image: missing mmdebstrap"/></testcase><testcase name="b">'
                     '<skipped message="no host image: missing mmdebstrap"/></testcase>'
                     '</testsuite></testsuites>')
    assert run_tiers._junit_summary(junit) == ("2 skipped: no host image: missing mmdebstrap", 2)


def test_missing_or_broken_junit_is_no_summary(tmp_path):
    assert run_tiers._junit_summary(tmp_path / "absent.xml") is None
    broken = tmp_path / "broken.xml"
    broken.write_text("<testsuites><testsuite")
    assert run_tiers._junit_summary(broken) is None


def test_unknown_tier_is_refused(capsys):
    try:
        run_tiers.main(["units"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("an unknown tier was accepted")
    assert "unknown tier units" in capsys.readouterr().err


def test_a_tier_that_collects_nothing_fails(tmp_path, monkeypatch):
    # An empty tier must not pass: point the unit tier at an empty directory.
    monkeypatch.setattr(run_tiers, "CHECKOUT", tmp_path)
    (tmp_path / "tests" / "unit").mkdir(parents=True)
    result = run_tiers.run_tier("unit", ["-p", "no:cacheprovider"], tmp_path)
    assert not result.ok and result.summary == "no tests ran"
    assert Path(tmp_path / "junit-unit.xml").exists()
