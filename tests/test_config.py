"""Config: presets carry the paper's numbers, overrides are typed and checked."""
import dataclasses
import re

import pytest
import yaml

from dedn.config import (
    PRESETS,
    RunConfig,
    apply_overrides,
    build_config,
    known_keys,
    load_preset,
    parse_overrides,
    preset_path,
)
from dedn.errors import ConfigError

PAPER_LAMBDAS = {"cub": (0.8, 0.9), "sun": (0.95, 0.3), "awa2": (0.8, 0.5)}


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_every_preset_yaml_loads_with_paper_hyperparameters(name, variant):
    cfg = load_preset(name, variant)
    assert cfg.variant == variant
    assert cfg.dataset == name.upper()
    assert (cfg.loss.beta, cfg.loss.gamma) == (0.001, 0.1)
    assert (cfg.eval.lambda_rc, cfg.eval.lambda_e) == PAPER_LAMBDAS[name]
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.batch_size) == (1e-4, 0.9, 1e-4, 50)
    # every key in the YAML is a known config key (no silently ignored typo)
    doc = yaml.safe_load(preset_path(name).read_text())
    doc.pop("variants")
    for section, values in doc.items():
        if isinstance(values, dict):
            for k in values:
                assert f"{section}.{k}" in known_keys()


# docs/reference-variant.md#the-differences
def test_reference_variant_switches_to_the_authors_code():
    paper, ref = load_preset("cub", "paper"), load_preset("cub", "reference")
    assert paper.loss.distance == "mse" and ref.loss.distance == "cubic"
    assert paper.eval.calibration == 0.0 and ref.eval.calibration == 2.0
    assert ref.loss.reference_margin == 3.0
    assert load_preset("sun", "reference").model.region_rank == 256
    assert load_preset("sun", "reference").loss.reference_margin == 2.0
    assert load_preset("awa2", "reference").loss.calibration_weight == pytest.approx(0.11)
    assert load_preset("sun").data.class_balanced is False


# docs/reference-variant.md#selecting-it
def test_variant_on_command_line_selects_the_reference_block_before_other_overrides():
    cfg = build_config("cub", ["variant=reference", "loss.distance=mse", "epochs=3", "beta=0.01"])
    assert cfg.variant == "reference"
    assert cfg.loss.distance == "mse"  # explicit override wins over the variant block
    assert cfg.eval.calibration == 2.0  # but the rest of the block applies
    assert cfg.optim.epochs == 3 and cfg.loss.beta == 0.01


def test_model_shortcut_sets_model_name():
    assert build_config("cub", ["model=dedn"]).model.name == "dedn"


@pytest.mark.parametrize(
    "override, message",
    [
        ("foo=1", "foo: expected a known key"),
        ("loss.betta=1", "loss.betta: expected a known key"),
        ("lambda_e=1.5", "eval.lambda_e: expected in [0, 1], found 1.5"),
        ("epochs=0", "optim.epochs: expected >= 1, found 0"),
        ("epochs=abc", "optim.epochs: expected an integer, found 'abc'"),
        ("beta=-1", "loss.beta: expected a finite number >= 0"),
        ("variant=paperr", "variant: expected one of paper|reference"),
        ("experts=three", "model.experts: expected one of both|coarse|fine"),
        ("channel_attention=maybe", "model.channel_attention: expected true or false"),
        ("lr=0", "optim.lr: expected > 0"),
        ("lr=fast", "optim.lr: expected a number, found 'fast'"),
        ("beta=nan", "loss.beta: expected a finite number"),
        ("gamma=inf", "loss.gamma: expected a finite number"),
    ],
)
def test_bad_overrides_are_rejected_with_the_key_and_the_expectation(override, message):
    with pytest.raises(ConfigError) as e:
        build_config("cub", [override])
    assert message in str(e.value)
    assert str(e.value).startswith("overrides: ")


def test_ambiguous_leaf_name_is_rejected():
    # batch_size lives in optim and eval
    with pytest.raises(ConfigError, match="unambiguous key"):
        build_config("cub", ["batch_size=10"])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["epochs"])


def test_round_trip_through_dict_and_flat_keys():
    cfg = build_config("awa2", ["variant=reference", "loss.gamma=0.3", "model.clusters=kmeans", "model.num_clusters=5"])
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert apply_overrides(RunConfig(), cfg.flat()) == cfg
    assert cfg.flat()["loss.gamma"] == 0.3
    assert yaml.safe_load(cfg.to_yaml()) == cfg.to_dict()


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.loss.beta = 1.0  # type: ignore[misc]


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset: expected one of cub|sun|awa2"):
        load_preset("apy")


def test_config_file_layer(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("loss:\n  gamma: 0.5\noptim:\n  epochs: 2\n")
    cfg = build_config("cub", ["epochs=4"], config_file=str(f))
    assert cfg.loss.gamma == 0.5 and cfg.optim.epochs == 4
    f.write_text("loss:\n  gama: 0.5\n")
    with pytest.raises(ConfigError, match="loss.gama"):
        build_config("cub", [], config_file=str(f))


def test_config_file_that_is_missing_unreadable_or_not_yaml_is_one_message(tmp_path):
    with pytest.raises(ConfigError, match=r"--config: expected a readable YAML file, found '.*nope.yaml: No such file"):
        build_config("cub", [], config_file=str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"--config: expected a readable YAML file, found '.*: Is a directory'"):
        build_config("cub", [], config_file=str(tmp_path))
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [1, 2\n  gamma")
    with pytest.raises(ConfigError, match=r"--config: expected valid YAML, found .*bad.yaml at line 2, column 8: "
                                          r"expected ',' or ']'"):
        build_config("cub", [], config_file=str(bad))
    bad.write_bytes(b"loss:\n  gamma: \xff\xfe\n")
    with pytest.raises(ConfigError, match="--config: expected valid YAML"):
        build_config("cub", [], config_file=str(bad))


def test_exponent_floats_without_a_dot_parse():
    # YAML 1.1 reads "1e-3" as a string; float fields must still accept it
    cfg = build_config("cub", ["optim.lr=1e-3", "beta=5E-4"])
    assert (cfg.optim.lr, cfg.loss.beta) == (1e-3, 5e-4)


def test_shuffle_buffer_is_capped_by_its_memory_budget():
    data = build_config("cub").data
    assert data.shuffle_rows(2048 * 49 * 2) == 4096  # 7x7 fp16 rows: the row count binds (0.77 GiB)
    assert data.shuffle_rows(2048 * 196 * 2) == (1024 << 20) // (2048 * 196 * 2) == 1337  # 14x14: 1 GiB
    assert build_config("cub", ["data.shuffle_buffer_mib=1"]).data.shuffle_rows(10 << 20) == 1  # never empty
    with pytest.raises(ConfigError, match="data.shuffle_buffer_mib"):
        build_config("cub", ["data.shuffle_buffer_mib=0"])


def test_config_for_a_dataset_with_and_without_a_preset(tmp_path):
    from dedn.config import config_for_dataset

    cub = config_for_dataset("CUB", "/d/cub", overrides=["epochs=3"])
    assert (cub.dataset, cub.loss.beta, cub.eval.lambda_e, cub.optim.epochs, cub.data.path) == ("CUB", 1e-3, 0.9, 3, "/d/cub")
    apy = config_for_dataset("APY", "/d/apy")  # no preset: the defaults, named after the dataset
    assert (apy.dataset, apy.data.path) == ("APY", "/d/apy")
    assert config_for_dataset("CUB", "/d/x", preset="awa2").dataset == "AWA2"  # an explicit preset wins
    f = tmp_path / "best.yaml"
    f.write_text(build_config("sun", ["epochs=7"]).to_yaml())
    from_file = config_for_dataset("SUN", "/d/sun", config_file=str(f))  # a sweep's best_config.yaml
    assert (from_file.dataset, from_file.optim.epochs) == ("SUN", 7)


# issue 27 item 8: a --config YAML of the wrong shape names the file, the dotted key and what it found
@pytest.mark.parametrize("doc, message", [
    ("loss: [1, 2]\n", "loss: expected a mapping of loss keys (beta, gamma, epsilon, mal, ...), found a list [1, 2]"),
    ("optim: 3\n", "optim: expected a mapping of optim keys (lr, momentum, weight_decay, alpha, ...), found a number 3"),
    ("eval: fast\n", "eval: expected a mapping of eval keys (calibration, fit_weights, weight_grid_step, batch_size, "
                     "...), found a string 'fast'"),
    ("data: true\n", "data: expected a mapping of data keys"),
    ("model: [dedn]\n", "model: expected a model name or a mapping of model keys (name, experts, channel_attention, "
                        "clusters, ...), found a list ['dedn']"),
    ("optim:\n  lr: {value: 0.1}\n", "optim.lr: expected a finite number, found a mapping {'value': 0.1}"),
    ("optim:\n  epochs: [1, 2]\n", "optim.epochs: expected an integer, found a list [1, 2]"),
    ("loss:\n  distance: [mse]\n", "loss.distance: expected one of mse|sse|cubic, found a list ['mse']"),
    ("model:\n  channel_attention: {a: 1}\n", "model.channel_attention: expected true or false, found a mapping {'a': 1}"),
    ("variant: {a: 1}\n", "variant: expected one of paper|reference, found a mapping {'a': 1}"),
    ("dataset: [CUB]\n", "dataset: expected a string, found a list ['CUB']"),
    ("epochs: {a: 1}\n", "optim.epochs: expected an integer, found a mapping {'a': 1}"),
    ("[1, 2]\n", "<root>: expected a mapping of sections (model, loss, optim, data, train, eval), found a list [1, 2]"),
])
def test_a_config_file_of_the_wrong_shape_names_the_key_and_the_type(tmp_path, doc, message):
    f = tmp_path / "exp.yaml"
    f.write_text(doc)
    with pytest.raises(ConfigError) as e:
        build_config("cub", [], config_file=str(f))
    assert str(e.value).startswith(f"{f}: ")
    assert message in str(e.value)


def test_a_config_file_with_an_empty_section_or_a_model_name_is_fine(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("loss:\noptim:\n  epochs: 2\n")  # every key of a section commented out: nothing to change
    assert build_config("cub", [], config_file=str(f)).optim.epochs == 2
    f.write_text("model: msdn\n")  # the model's name alone, as on the command line
    assert build_config("cub", [], config_file=str(f)).model.name == "msdn"
    f.write_text("model: {name: d3gzsl}\nd3: {n_critic: 3}\n")  # a family's section alias
    assert build_config(None, [], config_file=str(f)).loss.n_critic == 3


@pytest.mark.parametrize("override, message", [
    ("loss=3", "overrides: loss: expected a key of section loss (beta, gamma, epsilon, mal, ...), e.g. loss.beta=..., "
               "found 'loss'"),
    ("optim.lr.x=1", "optim.lr.x: expected a known key"),
])
def test_a_section_given_a_value_on_the_command_line_says_so(override, message):
    with pytest.raises(ConfigError) as e:
        build_config("cub", [override])
    assert message in str(e.value)


def test_wrong_shapes_in_a_preset_or_a_checkpoint_config_name_their_source():
    with pytest.raises(ConfigError, match=r"^checkpoint: loss: expected a mapping of loss keys .*found a list \[1\]"):
        RunConfig.from_dict({"loss": [1]}, source="checkpoint")
    with pytest.raises(ConfigError, match=r"^checkpoint: optim.lr: expected a finite number, found a mapping"):
        RunConfig.from_dict({"optim": {"lr": {"a": 1}}}, source="checkpoint")


def test_the_old_name_dedn_config_still_imports_and_unpickles_as_run_config():
    import importlib
    import pickle
    import warnings

    import dedn.config as config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config._warned_dedn_config = False
        from dedn.config import DEDNConfig

        assert DEDNConfig is RunConfig
        # a pickle written when the class was dedn.config.DEDNConfig (Ray payloads, user caches) loads
        old = pickle.dumps(RunConfig(), protocol=0).replace(b"\nRunConfig\n", b"\nDEDNConfig\n")  # names end at \n
        assert b"DEDNConfig" in old
        assert pickle.loads(old) == RunConfig()
    (w,) = caught  # once per process, however often it is named
    assert issubclass(w.category, DeprecationWarning) and "use dedn.config.RunConfig" in str(w.message)
    assert "DEDNConfig" not in importlib.import_module("dedn.config").__all__


def _one_deprecation(build):
    """build()'s result and the text of the one FutureWarning it gave."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = build()
    (w,) = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert len(caught) == 1, [str(c.message) for c in caught]
    return cfg, str(w.message)


def test_the_old_eval_keys_set_the_new_ones_with_one_line_naming_the_new_key(tmp_path):
    cfg, msg = _one_deprecation(lambda: build_config("cub", ["eval.lambda_grid_step=0.25"]))
    assert cfg.eval.weight_grid_step == 0.25 and msg == "overrides: eval.lambda_grid_step is deprecated: use eval.weight_grid_step"
    cfg, msg = _one_deprecation(lambda: build_config("cub", ["model=msdn", "fit_lambdas=true"]))  # a leaf name, any family
    assert cfg.eval.fit_weights is True and msg == "overrides: fit_lambdas is deprecated: use eval.fit_weights"
    old = tmp_path / "old.yaml"
    old.write_text("eval:\n  fit_lambdas: false\n")
    cfg, msg = _one_deprecation(lambda: build_config(None, [], config_file=str(old)))
    assert cfg.eval.fit_weights is False and msg == f"{old}: eval.fit_lambdas is deprecated: use eval.fit_weights"
    # a config saved before the rename (a checkpoint's, a registered model's config.yaml) loads as it was
    saved = RunConfig().to_dict()
    saved["eval"] = {("lambda_grid_step" if k == "weight_grid_step" else k): v for k, v in saved["eval"].items()}
    saved["eval"]["lambda_grid_step"] = 0.1
    cfg, msg = _one_deprecation(lambda: RunConfig.from_dict(saved, source="checkpoint"))
    assert cfg == RunConfig().replace(**{"eval.weight_grid_step": 0.1}) and msg.startswith("checkpoint: eval.lambda_grid_step")
    assert "eval.fit_lambdas" not in known_keys() and "eval.fit_weights" in known_keys("d3gzsl")


def test_one_bound_for_the_weight_grid_step():
    from dedn.config_sections import MAX_WEIGHT_GRID_STEP
    from dedn.families.base import weight_grid_values

    assert MAX_WEIGHT_GRID_STEP == 0.5
    assert build_config("cub", ["eval.weight_grid_step=0.5"]).eval.weight_grid_step == 0.5
    assert weight_grid_values(0.5) == (0.0, 0.5, 1.0)
    for bad in (0.6, 1.0, 0.0, -0.1):  # the config and the grid refuse the same steps, with the same message
        message = f"eval.weight_grid_step: expected in (0, 0.5], found {bad}"
        with pytest.raises(ConfigError, match=re.escape(message)):
            build_config("cub", [f"eval.weight_grid_step={bad}"])
        with pytest.raises(ConfigError, match=re.escape(message)):
            weight_grid_values(bad)


def test_families_declare_their_optional_capabilities_and_derive_their_eval_block():
    from dedn.families import ModelFamily, get_family
    from dedn.families import capabilities as cap

    declared = {name: {c.__name__ for c in (cap.PreparesPhases, cap.RefitsBeforeEval, cap.RefitsForNewClasses,
                                              cap.WrapsForDDP, cap.HasAttentionMaps, cap.AliasesSections)
                       if isinstance(get_family(name), c)} for name in ("dedn", "msdn", "d3gzsl")}
    assert declared == {"dedn": {"HasAttentionMaps"}, "msdn": {"HasAttentionMaps"},
                        "d3gzsl": {"PreparesPhases", "RefitsBeforeEval", "RefitsForNewClasses", "WrapsForDDP",
                                   "AliasesSections"}}
    assert cap.section_aliases(get_family("dedn")) == {} and cap.section_aliases(get_family("d3gzsl")) == {"d3": "loss"}
    # the eval block: the common keys, the family's own (D3GZSL's classifier) and one checked float per weight
    d3 = get_family("d3gzsl")
    assert d3.weight_names == ("w_student",) and d3.eval_config().w_student == 0.0 and d3.eval_config().syn_per_class == 300

    class Half(ModelFamily, cap.PreparesPhases):  # a capability declared and not implemented
        name, weights = "half", {"w": 0.5}

        def build(self, cfg, class_side, feature_shape, meta=None): ...
        def score_parts(self, out, class_attributes=None): ...
        def coefficients(self, cfg, weights, names): ...

    with pytest.raises(TypeError, match="abstract method.*prepare"):
        Half()
    with pytest.raises(ConfigError, match=r"eval.w: expected in \[0, 1\], found 3.0"):
        Half.eval_config(w=3.0)
    with pytest.raises(ConfigError, match=r"eval.w: expected a default in \[0, 1\], found 2"):
        type("Bad", (Half,), {"weights": {"w": 2}})  # a weight's default is checked when the family is defined
