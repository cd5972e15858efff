import pytest

from facetrec.config import ConfigError, load_config
from tests.conftest import ROOT


def test_defaults_and_overrides_are_typed():
    cfg = load_config(ROOT / "configs" / "amazon-beauty.yaml", ["train.epochs=3", "data.root=/x/y", "run.dir=runs/t"])
    assert cfg.train.epochs == 3 and cfg.data.root == "/x/y" and cfg.run.dir == "runs/t"
    assert cfg.data.item_tables[0].multi == ("attrs",)


def test_unknown_key_is_named_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"train\.epoch\b.*valid keys:.*epochs"):
        load_config(None, ["train.epoch=3"])


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_config(None, ["train.epochs=three"])


def test_scientific_notation_is_a_number():
    """PyYAML (YAML 1.1) reads `1e-6` as a string; a float key still takes it, a string key keeps it."""
    cfg = load_config(None, ["train.weight_decay=1e-6", "train.lr=2.5E-4", "run.dir=1e-6"])
    assert cfg.train.weight_decay == 1e-6 and cfg.train.lr == 2.5e-4 and cfg.run.dir == "1e-6"
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        load_config(None, ["train.lr=1e-"])


def test_override_without_equals_explains_the_form():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["train.epochs"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent.yaml")


def test_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {epochs: 7, lr: 0.01}\nrun: {dir: a}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {epochs: 2}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.train.epochs == 2 and cfg.train.lr == 0.01 and cfg.run.dir == "a"


def test_train_settings_another_family_reads_are_named_in_a_warning():
    from facetrec.train.run import ignored_train_settings, warn_ignored_settings

    cfg = load_config(ROOT / "configs" / "amazon-beauty" / "dien.yaml", ["train.negatives=popularity", "train.top_m=100"])
    assert ignored_train_settings(cfg, "dien") == {"negatives": "popularity", "top_m": 100}
    with pytest.warns(UserWarning) as caught:
        warn_ignored_settings(cfg, "dien")
    assert [str(w.message) for w in caught] == [
        "train.negatives='popularity' is read by retrieval models only; model 'dien' (ranking) ignores it",
        "train.top_m=100 is read by retrieval models only; model 'dien' (ranking) ignores it"]
    # a key its own family reads, or one left at its default, is not reported
    assert ignored_train_settings(load_config(ROOT / "configs" / "amazon-beauty" / "mind.yaml", ["train.negatives=popularity"]), "mind") == {}
    assert ignored_train_settings(cfg, "ple") == {"negatives": "popularity", "top_m": 100}
    ple = load_config(ROOT / "configs" / "amazon-beauty" / "ple.yaml", ["train.aux_negatives=popularity"])
    assert ignored_train_settings(ple, "ple") == {} and ignored_train_settings(ple, "mind") == {"aux_negatives": "popularity", "resample_negatives": True}
    # within the ranking family only DIEN draws auxiliary negatives
    dien = load_config(ROOT / "configs" / "amazon-beauty" / "dien.yaml", ["train.aux_negatives=popularity"])
    assert ignored_train_settings(dien, "dien") == {} and ignored_train_settings(dien, "din") == {"aux_negatives": "popularity"}
    with pytest.warns(UserWarning, match=r"train.aux_negatives='popularity' is read by dien, ple, ple-uie only; model 'base'"):
        warn_ignored_settings(dien, "base")


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_shipped_config_loads_and_its_model_section_is_valid(path):
    """A typo or a removed key in a shipped config fails here, not at the start of a user's run."""
    from facetrec.train.build import make_config

    cfg = load_config(ROOT / path, ["data.root=/x/y"])
    params = dict(cfg.model)
    name = params.pop("name", None)
    if name and name != "popularity":
        make_config(name, params, n_items=100)


def test_a_config_cannot_set_n_items_which_comes_from_the_data():
    from facetrec.train.build import make_config

    with pytest.raises(ConfigError, match=r"model.n_items is taken from the prepared data \(100 here"):
        make_config("mind", {"n_items": 5}, n_items=100)
    assert make_config("mind", {}, n_items=100).n_items == 100
