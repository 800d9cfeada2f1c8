"""docs/operating.md's "Installing on a host" is what the system tier runs: the blocks parse, and
every variable they use is one the settings block sets and the tier fills in."""

from __future__ import annotations

import re

import pytest

from netns_lab import bootlab, hostimage


def test_readme_has_every_install_step():
    steps = bootlab.install_steps()
    assert list(steps) == list(bootlab.STEPS)
    assert "pip wheel" in steps[bootlab.BUILD_STEP]
    assert "install --no-index --find-links wheelhouse openhnv" in steps[bootlab.EVERY_HOST]
    assert "systemctl enable --now hnv-controller" in steps[bootlab.MANAGEMENT_NODE]
    assert "systemctl enable --now hnv-agent" in steps[bootlab.AGENT_HOST]


def test_every_variable_the_steps_use_is_a_setting():
    steps = bootlab.install_steps()
    names = set(bootlab.settings_names(steps[bootlab.SETTINGS]))
    assert names == {"MEDIA", "CONTROLLER_URL", "LISTEN", "HOSTS", "HOST", "ADDRESS", "TOKEN"}
    for role in (bootlab.BUILD_STEP, bootlab.EVERY_HOST, bootlab.MANAGEMENT_NODE, bootlab.AGENT_HOST):
        used = set(re.findall(r"\$\{?([A-Z_]+)", steps[role])) - {"HNV_CONTROLLER", "HNV_TOKEN_FILE"}
        assert used <= names, (role, used - names)


def test_the_tier_fills_in_only_documented_settings():
    settings = bootlab.install_steps()[bootlab.SETTINGS]
    script = bootlab.with_settings("echo $HOST", settings, {"HOST": "CON-HyperV6", "MEDIA": "/m"})
    assert script.splitlines()[1:] == ["MEDIA=/m", "HOST=CON-HyperV6", "echo $HOST"]
    with pytest.raises(bootlab.BootLabError, match="NOT_A_SETTING"):
        bootlab.with_settings("true", settings, {"NOT_A_SETTING": "x"})


def test_a_block_without_a_role_is_refused(tmp_path):
    doc = tmp_path / "operating.md"
    doc.write_text(f"{bootlab.INSTALL_SECTION}\n\n```sh\nrm -rf /\n```\n")
    with pytest.raises(bootlab.BootLabError, match="a block starts with 'rm -rf /'"):
        bootlab.install_steps(doc)


def test_the_section_ends_at_the_next_level_two_heading(tmp_path):
    steps = bootlab.install_steps()
    doc = tmp_path / "operating.md"
    blocks = "".join(f"```sh\n# {role}\n{steps[role]}```\n\n" for role in bootlab.STEPS)
    doc.write_text(f"# Guide\n\n{bootlab.INSTALL_SECTION}\n\n{blocks}## Next\n\n```sh\n# on every host\nexit 1\n```\n")
    assert bootlab.install_steps(doc) == steps


def test_the_image_cache_key_follows_the_recipe(tmp_path, monkeypatch):
    sources = tmp_path / "debian.sources"
    sources.write_text("Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n")
    before = hostimage.recipe_digest(hostimage.recipe(sources))
    assert hostimage.recipe_digest(hostimage.recipe(sources)) == before
    monkeypatch.setitem(hostimage.FILES, "/etc/hostname", (0o644, "changed\n"))
    assert hostimage.recipe_digest(hostimage.recipe(sources)) != before
    monkeypatch.setattr(hostimage, "PACKAGES", (*hostimage.PACKAGES, "less"))
    sources.write_text(sources.read_text() + "Components: main\n")
    assert len({before, hostimage.recipe_digest(hostimage.recipe(sources))}) == 2


def test_the_vagrant_flavour_is_the_lab_image_plus_what_vagrant_logs_in_with(tmp_path, monkeypatch):
    sources = tmp_path / "debian.sources"
    sources.write_text("Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n")
    key = tmp_path / "vagrant.pub"
    key.write_text("ssh-ed25519 AAAA vagrant insecure public key\n")
    monkeypatch.setattr(hostimage, "vagrant_public_key", key.read_text)
    lab, box = hostimage.recipe(sources), hostimage.recipe(sources, flavour="vagrant")
    assert hostimage.recipe_digest(lab) != hostimage.recipe_digest(box)
    assert set(box["packages"]) - set(lab["packages"]) == {"openssh-server", "sudo"}
    assert box["files"]["/home/vagrant/.ssh/authorized_keys"] == [oct(0o600), key.read_text()]
    assert box["files"]["/etc/sudoers.d/vagrant"][0] == oct(0o440)
    assert "ssh.service" in box["enable"] and "hnv-lab-runner.service" not in box["enable"]
    # The box's own parts never change the lab image's cache key.
    monkeypatch.setitem(hostimage.VAGRANT_FILES, "/etc/ssh/sshd_config.d/10-openhnv-vagrant.conf", (0o644, "x\n"))
    assert hostimage.recipe_digest(hostimage.recipe(sources)) == hostimage.recipe_digest(lab)
    assert hostimage.recipe_digest(hostimage.recipe(sources, flavour="vagrant")) != hostimage.recipe_digest(box)
    with pytest.raises(ValueError, match="flavour: 'vmware'"):
        hostimage.recipe(sources, flavour="vmware")
