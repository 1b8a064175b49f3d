"""Cluster profiles: the shipped ones load, user mistakes get messages that say what to do."""
from __future__ import annotations

import pytest

from slurm import profiles
from slurm.profiles import Resources


def test_shipped_profiles_load_and_resolve():
    names = profiles.available_profiles()
    assert {"local", "example-a100", "example-h100"} <= set(names)
    assert not any(n.startswith("pipeline") for n in names)
    for name in names:
        profile = profiles.load_profile(name)
        res = profile.resources.resolved()
        # One task per GPU on GPU profiles.
        assert res.tasks_per_node == max(res.gpus_per_node, 1)
    a100 = profiles.load_profile("example-a100")
    assert a100.resources.resolved().gpus_per_node == 8 and a100.sbatch == {"exclusive": True}
    assert a100.grace_s == a100.signal_delay_s - 30


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        profiles.load_profile("nonexistent-cluster")
    message = str(err.value)
    assert "nonexistent-cluster" in message
    for name in profiles.available_profiles():
        assert name in message


def test_profile_by_path_and_bad_keys(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("partition: batch\ngpus_per_node: 4\nsetup: module load cuda\nenv: {A: 1}\n")
    profile = profiles.load_profile(str(good))
    assert profile.name == "mine" and profile.partition == "batch" and profile.setup == ("module load cuda",)
    assert profile.env == {"A": "1"} and profile.resources.resolved().tasks_per_node == 4
    bad = tmp_path / "typo.yaml"
    bad.write_text("partiton: batch\n")
    with pytest.raises(ValueError, match="partiton"):
        profiles.load_profile(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        profiles.load_profile(str(tmp_path / "missing.yaml"))


def test_resource_layers():
    base = profiles.load_profile("example-a100").resources
    # A new GPU count brings one task per GPU; other fields keep the lower layer's values.
    merged = base.merged(Resources(nodes=4, gpus_per_node=2)).resolved()
    assert (merged.nodes, merged.gpus_per_node, merged.tasks_per_node, merged.cpus_per_task) == (4, 2, 2, 12)
    cpu = profiles.load_profile("local").resources.merged(Resources(tasks_per_node=2)).resolved()
    assert (cpu.gpus_per_node, cpu.tasks_per_node) == (0, 2)
    with pytest.raises(ValueError, match="one task per GPU"):
        Resources(gpus_per_node=8, tasks_per_node=2).resolved()
    with pytest.raises(ValueError, match="nodes"):
        Resources(nodes=0).resolved()
