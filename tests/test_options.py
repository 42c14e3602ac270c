"""The options declared once (mpicellpose.options): the table agrees with RunConfig, the
configuration-file keys, the command line and the run's fingerprint."""
import argparse
import dataclasses

from mpicellpose.cli.common import _FLAGS, add_input_output, add_run_arguments, args_mapping
from mpicellpose.config import RunConfig, field_names, from_mapping
from mpicellpose.options import OPTIONS, OPTIONS_BY_NAME, labels_options, landing_keys
from mpicellpose.runner.phases.plan import FIXED_FORM


def test_every_configuration_option_is_a_field_or_lands_in_one_with_the_same_default():
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for o in OPTIONS:
        if not o.config:
            assert o.name not in fields, o.name
        elif o.into:
            assert o.into[0] in fields and o.name not in fields, o.name
        else:
            f = fields[o.name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert default == o.default, (o.name, default, o.default)


def test_the_command_line_gives_every_option_under_its_own_name():
    p = argparse.ArgumentParser()
    add_input_output(p, "out")
    add_run_arguments(p)
    dests = {a.dest for a in p._actions} - {"help", "input", "output"}
    assert dests == set(OPTIONS_BY_NAME)
    assert set(_FLAGS) <= set(OPTIONS_BY_NAME) and all(_FLAGS[k] == "--" + k.replace("_", "-") for k in _FLAGS)
    args = p.parse_args(["in.zarr", "--flow-box", "2", "--diameter", "12", "--model", "demo", "--log-level", "DEBUG"])
    cfg = from_mapping(args_mapping(args))
    assert cfg.flow_box == 2 and cfg.eval_kwargs == {"diameter": 12.0}
    assert cfg.model_kwargs == {"pretrained_model": "demo"}


def test_configuration_keys_are_fields_and_landing_keys():
    assert set(landing_keys()) == {"model", "diameter", "anisotropy", "batch_size", "threshold", "connectivity"}
    assert not set(landing_keys()) & set(field_names())


def test_the_fingerprint_holds_the_options_that_change_the_labels():
    """Today every one is in the fingerprint's fixed form (earlier versions' runs resume); a new one
    is added by plan._declared_options under its own name when not at its default."""
    assert FIXED_FORM <= set(labels_options())


def test_a_new_option_that_changes_the_labels_enters_the_fingerprint_when_set(monkeypatch):
    from mpicellpose.runner.phases import plan

    monkeypatch.setattr(plan, "labels_options", lambda: labels_options() + ("schedule",))  # as if it did
    s = plan.Settings((8, 8), (8, 8), (0, 0), None, "touch", 1, {}, None, None, None, ("y", "x"))
    assert plan._declared_options(RunConfig(input="x"), s) == {}  # at its default: fingerprints unchanged
    assert plan._declared_options(RunConfig(input="x", schedule="static"), s) == {"schedule": "static"}


def test_the_run_context_reads_every_declared_option_that_does_not_change_the_labels():
    from mpicellpose.runner.context import RunOptions

    opts = RunOptions.of(RunConfig(input="x", schedule="static", read_ahead="off"))
    assert opts.read_ahead == "off" and opts.schedule == "static" and opts.watchdog is None
    names = {o.name for o in OPTIONS if o.config and not o.labels and not o.into}
    assert all(hasattr(opts, n) for n in names)
