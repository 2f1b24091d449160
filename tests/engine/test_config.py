import pytest

from vireid_fast.config import ConfigError, load_config, parse_overrides


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_and_overrides():
    config = load_config(None, ["train.epochs=3", "cluster.eps=0.5", "data.image_size=[64, 32]", "method.temp=0.1"])
    assert config.train.epochs == 3 and config.cluster.eps == 0.5 and config.data.image_size == [64, 32]
    assert config.method.name == "dcl" and config.method.temp == 0.1
    assert config.train.lr == pytest.approx(3.5e-4) and config.train.weight_decay == pytest.approx(5e-4)


@pytest.mark.parametrize("text, message", [
    ("train:\n  lrr: 0.1\n", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    ("trian:\n  lr: 0.1\n", "unknown key 'trian'"),
    ("train:\n  epochs: two\n", "train.epochs: must be an integer"),
    ("train:\n  epochs: 2.5\n", "train.epochs: must be an integer"),
    ("train:\n  lr: -1\n", "train.lr: must be > 0"),
    ("cluster:\n  eps: 1.5\n", "cluster.eps: must be <= 1.0"),
    ("model:\n  arch: vgg\n", "model.arch: must be one of agw_resnet50, small_resnet"),
    ("data:\n  image_size: [64]\n", "data.image_size: must have 2 entries"),
    ("experiment:\n  deterministic: 3\n", "experiment.deterministic: must be true or false"),
    ("method:\n  name: nope\n", "method.name: unknown method 'nope'"),
    ("method:\n  temp: 0\n", "method.temp: must be > 0"),
    ("method:\n  tempp: 0.1\n", "unknown key 'method.tempp' (did you mean 'method.temp'?)"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("method: dcl\n", "method: must be a mapping of keys to values"),
    ("train: 5\n", "train: must be a mapping of keys to values, got 5"),
    ("1: 2\n", "unknown key '1'"),
    ("train:\n  lr: .nan\n", "train.lr: must be a finite number, got nan"),
    ("model:\n  gem_p: .inf\n", "model.gem_p: must be a finite number, got inf"),
    ("data:\n  max_image_pixels: 0\n", "data.max_image_pixels: must be >= 1"),
])
def test_validation_messages_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert message in str(info.value)


def test_override_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["epochs"])
    with pytest.raises(ConfigError, match="one dot"):
        parse_overrides(["epochs=3"])
    with pytest.raises(ConfigError, match="train.iters: must be >= 1"):
        load_config(None, ["train.iters=0"])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


def test_hash_ignores_paths_and_epochs_but_not_hyperparameters():
    base = load_config(None).hash()
    assert load_config(None, ["experiment.output_dir=/x", "train.epochs=99"]).hash() == base
    assert load_config(None, ["data.skip_bad_images=true", "data.max_image_pixels=1000"]).hash() == base
    assert load_config(None, ["cluster.eps=0.5"]).hash() != base
    assert load_config(None, ["method.momentum=0.3"]).hash() != base


def test_shipped_configs_validate():
    import glob
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    paths = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert paths
    for path in paths:
        load_config(path)


@pytest.mark.parametrize("override", ["train.lr=.nan", "cluster.eps=.nan", "method.temp=.nan", "model.gem_p=.inf",
                                      "train.weight_decay=-.inf", "train.flip_p=.nan", "model.ema_beta=.nan"])
def test_float_keys_refuse_nan_and_inf(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"^{key}: must be a finite number, got -?(nan|inf)"):
        load_config(None, [override])


def test_override_does_not_hide_a_malformed_section(tmp_path):
    with pytest.raises(ConfigError, match="^train: must be a mapping of keys to values, got 5"):
        load_config(write(tmp_path, "train: 5\n"), ["train.epochs=3"])
    with pytest.raises(ConfigError, match="^method: must be a mapping"):
        load_config(write(tmp_path, "method: dcl\n"), ["method.temp=0.1"])


def test_exponent_without_a_dot_is_a_number():
    """YAML 1.1 reads 1e-3 as a string; float keys take it as the number it spells (int keys do not)."""
    config = load_config(None, ["train.lr=1e-3", "model.gem_p=3E0", "cluster.eps=+.5"])
    assert config.train.lr == 1e-3 and config.model.gem_p == 3.0 and config.cluster.eps == 0.5
    for bad in ("train.lr=1e-3x", "train.lr=nan", "train.lr=e5", "train.epochs=1e1"):
        with pytest.raises(ConfigError, match="must be (a number|an integer), got '"):
            load_config(None, [bad])


@pytest.mark.parametrize("raw, message", [
    ({"method": "dcl"}, "method: must be a mapping of keys to values (at least 'name', e.g. 'method: {name: dcl}'), "
                        "got 'dcl'"),
    ({"method": ["dcl"]}, "method: must be a mapping of keys to values"),
    ({"data": "synthetic"}, "data: must be a mapping of keys to values, got 'synthetic'"),
    ({True: {}}, "unknown key 'True'"),
])
def test_from_dict_refuses_non_mapping_sections(raw, message):
    """The path a checkpoint's config takes (``vireid-fast eval``): no bare ValueError from dict('dcl')."""
    from vireid_fast.config import from_dict

    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    assert str(info.value).startswith(message)
