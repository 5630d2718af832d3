"""AutoAttack on the first n test images (tables 4-5) after PGD on more: the full evaluation's PGD flags and masking
checks are cut to those n, and only AutoAttack runs; the result is the one a direct evaluation on n gives."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from conftest import copy_run

from afs_kit.config import get_preset
from afs_kit.core.io import load_checkpoint
from afs_kit.eval import evaluation
from afs_kit.run import pipeline
from afs_kit.run.pipeline import Run

SMOKE = get_preset("smoke")  # 60 test digits, masking checks on the first 50
PGD, WITH_AA = ("clean", "pgd10", "pgd20"), ("clean", "pgd10", "pgd20", "aa")
# the checks that compare AutoAttack with PGD, made again when AutoAttack is added
BY_AA = ("aa_square_breaks_nothing", "aa_not_above_pgd")


@pytest.fixture
def runs(tmp_path, smoke_networks, one_thread):
    return [Run(copy_run(smoke_networks, tmp_path / name), SMOKE, device="cpu", progress=False)
            for name in ("run", "twin")]


class Saturated(nn.Module):
    """Logits x 1e4: cross-entropy's gradient vanishes, so `converged` fails and its stronger PGD (with the CW loss)
    joins the record."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 1e4 * self.inner(x)


def spy(monkeypatch):
    """The attacks `evaluate` runs and how often the masking checks are made (the real functions run)."""
    attacks, checks = [], []
    real_attack, real_checks = evaluation.attack_flags, pipeline.sanity_checks

    def attack_flags(*args, **kwargs):
        attacks.append(args[3])
        return real_attack(*args, **kwargs)

    def sanity_checks(*args, **kwargs):
        checks.append(len(args[2]))
        return real_checks(*args, **kwargs)

    monkeypatch.setattr(evaluation, "attack_flags", attack_flags)
    monkeypatch.setattr(pipeline, "sanity_checks", sanity_checks)
    return attacks, checks


def flags_of(run, metrics):
    return load_checkpoint(run.dir.eval_dir(metrics["name"]) / "flags.pt")["flags"]


@pytest.mark.parametrize("masked", [False, True])
def test_autoattack_on_fewer_images_runs_only_autoattack_and_matches_a_direct_evaluation(runs, monkeypatch, masked):
    run, twin = runs
    wrap = Saturated if masked else (lambda net: net)
    model = wrap(run.extractor(0.1)[0])
    whole = run.evaluate("net", model, attacks=PGD, n_examples=60, sanity=True)
    assert (whole["sanity"]["passed"], len(whole["attacks"]) > 3) == (not masked, masked)
    attacks, checks = spy(monkeypatch)
    cut = run.evaluate("net", model, attacks=WITH_AA, n_examples=50, sanity=True)
    assert attacks == ["aa"] and checks == []  # nothing attacked twice, the checks not made again
    assert cut["cut_from"] == whole["name"] and cut["n"] == 50 and "aa" in cut["attacks"]
    held, big = flags_of(run, cut), flags_of(run, whole)
    for a in whole["attacks"]:  # PGD-10/20 and the stronger attacks a failed check added
        assert torch.equal(held[a], big[a][:50]), a
    assert {k: v for k, v in cut["sanity"]["checks"].items() if k not in BY_AA} == \
        {k: v for k, v in whole["sanity"]["checks"].items() if k not in BY_AA}
    # the same record as a direct evaluation on 50 images: clean and AutoAttack (seeded per chunk) alike, every
    # accuracy from the kept flags
    direct = twin.evaluate("net", wrap(twin.extractor(0.1)[0]), attacks=WITH_AA, n_examples=50, sanity=True)
    mine = flags_of(twin, direct)
    for a in ("clean", "aa"):
        assert torch.equal(held[a], mine[a]), a
    assert cut["examples"] == direct["examples"]
    assert cut["aa"] == direct["aa"] and cut["worst"] == pytest.approx(100 * held["worst"].float().mean().item())


def test_a_record_is_not_cut_below_the_examples_its_checks_used(runs, monkeypatch):
    run, _ = runs
    model = run.extractor(0.1)[0]
    run.evaluate("net", model, attacks=PGD, n_examples=60, sanity=True)  # checks on the first 50
    attacks, checks = spy(monkeypatch)
    fewer = run.evaluate("net", model, attacks=WITH_AA, n_examples=40, sanity=True)
    assert "cut_from" not in fewer and attacks[:3] == ["pgd10", "pgd20", "aa"] and checks == [40]


def test_pgd_alone_on_fewer_images_is_a_record_of_its_own_with_nothing_attacked(runs, monkeypatch):
    run, _ = runs
    model = run.extractor(0.1)[0]
    whole = run.evaluate("net", model, attacks=PGD, n_examples=60, sanity=True)
    attacks, checks = spy(monkeypatch)
    cut = run.evaluate("net", model, attacks=PGD, n_examples=50, sanity=True)
    assert attacks == [] and checks == [] and cut["cut_from"] == whole["name"] and cut["n"] == 50
    assert torch.equal(flags_of(run, cut)["worst"], flags_of(run, whole)["worst"][:50])
    assert run.evaluate("net", model, attacks=PGD, n_examples=50, sanity=True) == cut  # found on disk now


def test_autoattack_on_a_cut_record_killed_between_chunks_resumes_there(tmp_path, smoke_networks, one_thread,
                                                                         monkeypatch):
    preset = dataclasses.replace(SMOKE, evaluation=dataclasses.replace(SMOKE.evaluation, chunk_size=20))
    run, twin = (Run(copy_run(smoke_networks, tmp_path / name), preset, device="cpu", progress=False)
                 for name in ("run", "twin"))
    model = run.extractor(0.1)[0]
    run.evaluate("net", model, attacks=PGD, n_examples=60, sanity=True)
    real, calls = evaluation.attack_flags, []

    def killed(*args, **kwargs):  # Ctrl-C while AutoAttack works on its second chunk of three
        calls.append(args[3])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "attack_flags", killed)
    with pytest.raises(KeyboardInterrupt):
        run.evaluate("net", model, attacks=WITH_AA, n_examples=50, sanity=True)
    monkeypatch.setattr(evaluation, "attack_flags", real)
    attacks, checks = spy(monkeypatch)
    resumed = run.evaluate("net", model, attacks=WITH_AA, n_examples=50, sanity=True)
    assert attacks == ["aa", "aa"] and checks == []  # chunks 2 and 3 of AutoAttack, nothing else
    assert "cut_from" in resumed and resumed["attacks"].count("aa") == 1
    direct = twin.evaluate("net", twin.extractor(0.1)[0], attacks=WITH_AA, n_examples=50, sanity=True)
    assert torch.equal(flags_of(run, resumed)["aa"], flags_of(twin, direct)["aa"])


def test_a_pgd_request_on_a_record_that_also_holds_autoattack_gets_pgd_numbers(runs, monkeypatch):
    # tables 1-3 ask for PGD; tables 4-5 add AutoAttack to the same record when their example counts agree: a row of
    # table 1 must not then be measured by more attacks than its neighbours, whatever order the notebooks ran in
    run, _ = runs
    model = run.extractor(0.1)[0]
    pgd = run.evaluate("net", model, attacks=PGD, n_examples=60, sanity=True)
    both = run.evaluate("net", model, attacks=WITH_AA, n_examples=60, sanity=True)
    assert both["name"] == pgd["name"] and "aa" in both["attacks"] and both["worst"] <= pgd["worst"]
    attacks, checks = spy(monkeypatch)
    again = run.evaluate("net", model, attacks=PGD, n_examples=60, sanity=True)
    assert attacks == [] and checks == []
    assert again["left_out"] == ["aa"] and "aa" not in again and "tradeoff" not in again
    assert (again["worst"], again["ci95"]["worst"], again["attacks"]) == (pgd["worst"], pgd["ci95"]["worst"],
                                                                          pgd["attacks"])
    held = flags_of(run, again)
    assert torch.equal(evaluation.flags_over(held, PGD)["worst"], held["clean"] & held["pgd10"] & held["pgd20"])
    assert run.evaluate("net", model, attacks=WITH_AA, n_examples=60, sanity=True)["worst"] == both["worst"]
