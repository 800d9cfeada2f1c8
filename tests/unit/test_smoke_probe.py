"""netns_lab.features: the probe's answer has one boolean per kernel-tier feature, and
its parsing and verdicts follow the probe script's output."""

from __future__ import annotations

from netns_lab import features
from netns_lab.features import KERNEL_TIER_FEATURES, FeatureResult


def test_probe_answers_every_kernel_tier_feature_with_a_bool():
    # Real probe, without modprobe: as a non-root user it runs in a user namespace.
    result = features.probe(load_modules=False)
    assert list(result) == list(KERNEL_TIER_FEATURES)
    assert all(isinstance(v, bool) for v in result.values())
    assert {"gretap", "vlan", "bond", "vrf", "bridge_vlan_filtering", "vxlan", "veth", "netns"} <= set(result)


def test_parse_probe_output_reads_ok_and_fail_lines():
    stdout = "veth ok\nbridge ok\ngretap fail Error: Unknown device type.\n"
    results = features.parse_probe_output(stdout)
    assert results["veth"] == FeatureResult("veth", True, "")
    assert results["gretap"] == FeatureResult("gretap", False, "Error: Unknown device type.")
    assert results["netns"].present
    # Features the script never reported are missing, not assumed present.
    assert not results["vrf"].present and results["vrf"].reason == "not probed"


def test_no_namespace_means_everything_missing_with_unshare_reason():
    results = features.parse_probe_output("", "unshare: unshare failed: Operation not permitted\n")
    assert not any(r.present for r in results.values())
    assert results["gretap"].reason == "unshare: unshare failed: Operation not permitted"


def test_missing_and_exit_status_follow_the_probe(monkeypatch, capsys):
    all_present = {n: FeatureResult(n, True) for n in KERNEL_TIER_FEATURES}
    monkeypatch.setattr(features, "probe_details", lambda load_modules=True: all_present)
    assert features.missing() == []
    assert features.main([]) == 0

    lacking = dict(all_present, gretap=FeatureResult("gretap", False, "Error: Unknown device type."))
    monkeypatch.setattr(features, "probe_details", lambda load_modules=True: lacking)
    assert features.missing() == ["gretap"]
    assert features.main([]) == 1
    table = capsys.readouterr().out
    assert "gretap" in table and "NO" in table and "Unknown device type" in table


def test_probe_script_checks_each_link_type():
    script = features._probe_script()
    for fragment in ("type veth", "type bridge", "vlan_filtering 1", "type vlan id 802",
                     "type bond", "type vrf", "type vxlan", "type gretap"):
        assert fragment in script
    # NVGRE key: VSID 3535905 << 8.
    assert f"key {3535905 << 8}" in script
