"""afs_kit.config.config_hash: cache keys survive new fields left at their defaults, change with a recipe version,
and every preset's keys stay byte-identical to those of the commit that introduced this scheme."""
import dataclasses
import json

import pytest

from afs_kit import config
from afs_kit.config import PRESETS, ExtractorConfig, MergerConfig, Preset, config_hash

# Computed with the code before keys survived new fields (`json.dumps` of `dataclasses.asdict`): a change here
# orphans every run made with the preset. The key of each preset, of its sections, and of the extractor
# template at each of its budgets (as `Run` trains them).
PINNED = {
    # the smoke evaluation (then 60 examples, checks on 50) and AutoAttack, then its mergers (1 epoch), were cut
    # for a faster `make test`
    'smoke': {
        'preset': '8c71e32abe02',
        'data': '9edd7bb6f526',
        'extractor': 'a9be8047493f',
        'merger': '5d794cf49ce6',
        'evaluation': 'd671f125ebd4',
        'budgets': {
            0.0: 'a9be8047493f',
            0.1: '04b035d1d6db',
            0.2: 'abe1b10fada2',
        },
    },
    # the demo's recipe was cut for a 3-minute `make demo` (issue 27): its keys changed on purpose (twice: then
    # extractors of 8 epochs, mergers of 4, masking checks on 50 examples)
    'demo': {
        'preset': '8bd227f9536b',
        'data': '9edd7bb6f526',
        'extractor': 'a00bb75dde0b',
        'merger': 'ca54aa58f0b1',
        'evaluation': 'b83bf62840af',
        'budgets': {
            0.0: 'a00bb75dde0b',
            0.05: '84e96954c382',
            0.1: '0df08d038f57',
            0.15: '2459a87afa1d',
            0.2: '216fff1f4e4a',
            0.25: '51077fe95e32',
            0.3: 'e34d5a7853ee',
        },
    },
    'fashion-mnist': {
        'preset': '14fd0153d0d5',
        'data': '64dd0c767a24',
        'extractor': 'cc9bc8cda567',
        'merger': 'c83ced87ebea',
        'evaluation': '1cf7e2b338a3',
        'budgets': {
            0.0: 'cc9bc8cda567',
            0.025: 'e0d7020b8699',
            0.05: '083f1d6a3b01',
            0.1: '908fc6151e99',
            0.15: '97129cd0abc1',
        },
    },
    'cifar10-mini': {
        'preset': 'e367a0da3795',
        'data': '8fc5736aff17',
        'extractor': '27b4cb40ac6a',
        'merger': '3849e6329bf1',
        'evaluation': 'f2a799229459',
        'budgets': {
            0.0: '27b4cb40ac6a',
            0.00784313725490196: '3ce5ce2d9f18',
            0.01568627450980392: '7e5283fd1f8f',
            0.023529411764705882: 'e2a8455de18b',
            0.03137254901960784: 'cc94ae9e81bc',
        },
    },
    'cifar10-fast': {
        'preset': '111ba835aeda',
        'data': '833f3d42e75e',
        'extractor': '2b506939fc59',
        'merger': 'fb70d54e854b',
        'evaluation': '16b583a9b4ba',
        'budgets': {
            0.0: '2b506939fc59',
            0.00784313725490196: '7f92ba36a6e4',
            0.01568627450980392: 'c4425e404d1e',
            0.023529411764705882: '02f03789e0af',
            0.03137254901960784: '8d2fbdd5a7f6',
        },
    },
    'paper-cifar10': {
        'preset': 'b72910fdb554',
        'data': '358ff8eea33b',
        'extractor': '74d30ecbb6ff',
        'merger': '1456ccf5a810',
        'evaluation': '962efb64300a',
        'budgets': {
            0.0: '74d30ecbb6ff',
            0.00392156862745098: 'ff9317e46011',
            0.00784313725490196: 'e3aa025f12af',
            0.011764705882352941: '2cf86bee6640',
            0.01568627450980392: 'b26bee06cc4d',
            0.0196078431372549: 'a141545526e2',
            0.023529411764705882: 'e7aa23072103',
            0.027450980392156862: '8864a163b786',
            0.03137254901960784: '05a97fdae542',
            0.03529411764705882: 'feffb8f86f12',
        },
    },
    'zoo-cifar10': {
        'preset': 'fb5f2959b91f',
        'data': '358ff8eea33b',
        'extractor': '74d30ecbb6ff',
        'merger': '7438ad49ffdb',
        'evaluation': '962efb64300a',
        'budgets': {
        },
    },
    'paper-cifar100': {
        'preset': 'ab8e0a95ce62',
        'data': '585ea3374468',
        'extractor': '74d30ecbb6ff',
        'merger': '1456ccf5a810',
        'evaluation': '962efb64300a',
        'budgets': {
            0.0: '74d30ecbb6ff',
            0.00392156862745098: 'ff9317e46011',
            0.00784313725490196: 'e3aa025f12af',
            0.011764705882352941: '2cf86bee6640',
            0.01568627450980392: 'b26bee06cc4d',
            0.0196078431372549: 'a141545526e2',
            0.023529411764705882: 'e7aa23072103',
            0.027450980392156862: '8864a163b786',
            0.03137254901960784: '05a97fdae542',
            0.03529411764705882: 'feffb8f86f12',
        },
    },
}

# plain parts (no dataclass) hash as they did
PLAIN = [
    (("x",), "cd65ea2c2ad9"),
    (({"a": 1}, [1, 2]), "33ee9da4824c"),
    ((), "4f53cda18c2b"),
    (({"eps": 0.1, "step_size": None, "aa_attacks": ("apgd-ce",)}, "afs", 100), "6c0607e1769d"),
]
# dataclasses with plain parts, the shapes of training.extractor_key and a merger's key, on the smoke preset
MIXED = {
    'extractor_key': 'dbb3c7096921',
    'merger_key': 'b19cbaa98cd8',
}


# ------------------------------------------------------------------------------------------ pinned keys

def test_every_preset_is_pinned():
    assert set(PINNED) == set(PRESETS)
    for name, preset in PRESETS.items():
        assert list(PINNED[name]["budgets"]) == list(preset.budgets), name


@pytest.mark.parametrize("name", sorted(PINNED))
def test_preset_keys_are_unchanged(name):
    preset, pinned = PRESETS[name], PINNED[name]
    got = {"preset": config_hash(preset), **{s: config_hash(getattr(preset, s))
                                             for s in ("data", "extractor", "merger", "evaluation")}}
    assert got == {k: v for k, v in pinned.items() if k != "budgets"}
    budgets = {eps: config_hash(dataclasses.replace(preset.extractor, eps=eps)) for eps in preset.budgets}
    assert budgets == pinned["budgets"]


@pytest.mark.parametrize("name", sorted(PINNED))
def test_key_json_is_asdict_json_while_no_later_field_is_set(name):
    preset = PRESETS[name]
    for cfg in (preset, preset.data, preset.extractor, preset.merger, preset.evaluation):
        assert config._key_json(config._key_fields(cfg)) == json.dumps(dataclasses.asdict(cfg), sort_keys=True,
                                                                        default=str)


@pytest.mark.parametrize("parts, key", PLAIN)
def test_plain_parts_hash_as_before(parts, key):
    assert config_hash(*parts) == key


def test_mixed_parts_hash_as_before():
    p = PRESETS["smoke"]
    assert config_hash(p.extractor, p.data, "fingerprint") == MIXED["extractor_key"]
    assert config_hash(p.merger, p.data, ["k1", "k2"]) == MIXED["merger_key"]


def test_keyed_fields_name_real_fields():
    for cls, names in config._KEYED_FIELDS.items():
        assert set(names) <= {f.name for f in dataclasses.fields(cls)}, cls.__name__
        assert len(set(names)) == len(names), cls.__name__
    assert set(config._RECIPE_VERSIONS) == set(config._KEYED_FIELDS)


# ------------------------------------------------------------------------------------------ a later field

@dataclasses.dataclass(frozen=True)
class LaterMerger(MergerConfig):
    """MergerConfig with a field added after keys were introduced (inherits MergerConfig's keyed fields)."""
    warmup: int = 0
    tags: tuple[str, ...] = dataclasses.field(default_factory=tuple)


def test_a_later_field_at_its_default_keeps_the_key():
    old = PRESETS["demo"].merger
    new = LaterMerger(**dataclasses.asdict(old))
    assert config_hash(new) == config_hash(old) == PINNED["demo"]["merger"]
    assert config_hash(new, PRESETS["smoke"].data, ["k1"]) == config_hash(old, PRESETS["smoke"].data, ["k1"])


def test_a_later_field_off_its_default_changes_the_key():
    old = PRESETS["demo"].merger
    base = LaterMerger(**dataclasses.asdict(old))
    keys = {config_hash(base), config_hash(dataclasses.replace(base, warmup=3)),
            config_hash(dataclasses.replace(base, tags=("a",))),
            config_hash(dataclasses.replace(base, warmup=3, tags=("a",)))}
    assert len(keys) == 4
    assert config._key_fields(dataclasses.replace(base, warmup=3))["warmup"] == 3
    assert "tags" not in config._key_fields(dataclasses.replace(base, warmup=3))


def test_a_later_field_compares_to_its_default_as_the_key_writes_it():
    base = LaterMerger(**dataclasses.asdict(MergerConfig()))
    assert config_hash(dataclasses.replace(base, warmup=0.0)) != config_hash(base)  # 0.0 is not 0 in the key
    assert config_hash(dataclasses.replace(base, tags=[])) == config_hash(base)  # () and [] are both []


def test_a_later_field_inside_a_preset_keeps_the_presets_key():
    preset = PRESETS["smoke"]
    later = dataclasses.replace(preset, merger=LaterMerger(**dataclasses.asdict(preset.merger)))
    assert config_hash(later) == PINNED["smoke"]["preset"]
    assert config_hash(dataclasses.replace(later, merger=dataclasses.replace(later.merger, warmup=2))) \
        != PINNED["smoke"]["preset"]


def test_a_later_preset_field_at_its_default_keeps_the_key():
    Later = dataclasses.make_dataclass("Later", [("note", str, dataclasses.field(default=""))], bases=(Preset,),
                                       frozen=True)
    preset = PRESETS["cifar10-mini"]
    values = {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)}
    assert config_hash(Later(**values)) == PINNED["cifar10-mini"]["preset"]
    assert config_hash(Later(**values, note="x")) != PINNED["cifar10-mini"]["preset"]


def test_a_dataclass_not_listed_keys_all_its_fields():
    @dataclasses.dataclass(frozen=True)
    class Own:
        a: int = 1
        b: tuple[int, ...] = (2, 3)

    blob = json.dumps([dataclasses.asdict(Own())], sort_keys=True, default=str)
    assert config._key_json([config._key_fields(Own())]) == blob
    assert config._key_fields(Own()) == {"a": 1, "b": [2, 3]}


def test_a_class_is_refused_as_asdict_refuses_it():
    with pytest.raises(TypeError):
        config_hash(MergerConfig)


# ------------------------------------------------------------------------------------------ recipe versions

def test_a_recipe_version_bump_changes_the_key(monkeypatch):
    preset = PRESETS["smoke"]
    monkeypatch.setitem(config._RECIPE_VERSIONS, ExtractorConfig, 2)
    assert config_hash(preset.extractor) != PINNED["smoke"]["extractor"]
    assert config._key_fields(preset.extractor)["__recipe__"] == 2
    assert config_hash(preset) != PINNED["smoke"]["preset"]  # the preset holds the extractor
    assert config_hash(preset.merger) == PINNED["smoke"]["merger"]  # other classes are untouched
    two = config_hash(preset.extractor)
    monkeypatch.setitem(config._RECIPE_VERSIONS, ExtractorConfig, 3)
    assert config_hash(preset.extractor) not in (two, PINNED["smoke"]["extractor"])


def test_a_subclass_follows_its_parents_recipe_version(monkeypatch):
    later = LaterMerger(**dataclasses.asdict(PRESETS["demo"].merger))
    monkeypatch.setitem(config._RECIPE_VERSIONS, MergerConfig, 2)
    assert config_hash(later) == config_hash(PRESETS["demo"].merger) != PINNED["demo"]["merger"]


def test_budget_names_have_one_unit_each_and_old_runs_keep_their_zero_folder(tmp_path):
    from afs_kit.run.rundir import RunDir

    assert [config.budget_name(b) for b in (0.0, 0.1, 0.25)] == ["eps-0", "eps-0.1000", "eps-0.2500"]
    assert [config.budget_name(config.k255(k)) for k in (0, 2, 8)] == ["eps-0", "eps-2-255", "eps-8-255"]
    run = RunDir(tmp_path)
    assert run.extractor_dir("eps-0") == tmp_path / "extractors" / "eps-0"
    # a run made while budget 0 was "eps-0-255": its folder and its records are still found
    (tmp_path / "extractors" / "eps-0-255").mkdir(parents=True)
    (tmp_path / "eval" / "extractor-eps-0-255--n10--abcdef").mkdir(parents=True)
    assert run.extractor_dir("eps-0") == tmp_path / "extractors" / "eps-0-255"
    assert run.eval_dir("extractor-eps-0--n10--abcdef") == tmp_path / "eval" / "extractor-eps-0-255--n10--abcdef"
    assert run.eval_dir("extractor-eps-0.1000--n10--abcdef").name == "extractor-eps-0.1000--n10--abcdef"
