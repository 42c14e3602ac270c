"""Config files (--config, --print-config, flags override) and the dry run (mpicellpose plan)."""
import json
import os

import numpy as np
import pytest
import zarr

import cases
from mpicellpose import cli
from mpicellpose.config import from_mapping, load_file
from mpicellpose.errors import ConfigError
from mpicellpose.volumes.storage import numpy_array_to_zarr


@pytest.fixture
def vol(tmp_path):
    numpy_array_to_zarr(tmp_path / "in.zarr", cases.blobs((30, 40, 36), 51), (10, 10, 12))
    return tmp_path


def test_config_file_flags_override_and_print_roundtrip(vol, capsys):
    cfgf = vol / "run.toml"
    cfgf.write_text(f'input = "{vol}/in.zarr"\noutput = "{vol}/out.zarr"\nbackend = "threshold"\n'
                    'threshold = 100\nblocksize = [10, 20, 12]\n\n[eval_kwargs]\nflow_threshold = 0.5\n')
    assert cli.main(["segment", "--config", str(cfgf), "--blocksize", "15", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert 'blocksize = "15"' in text and 'backend = "threshold"' in text and "flow_threshold = 0.5" in text
    again = vol / "again.toml"
    again.write_text(text)
    cfg = from_mapping(load_file(again))
    assert cfg.backend_kwargs["threshold"] == 100 and cfg.eval_kwargs == {"flow_threshold": 0.5}
    assert not (vol / "out.zarr").exists()  # --print-config runs nothing
    assert cli.main(["segment", "--config", str(cfgf)]) == 0
    assert zarr.open(str(vol / "out.zarr"), mode="r").chunks == (10, 20, 12)


def test_config_errors(vol, capsys):
    bad = vol / "bad.toml"
    bad.write_text('input = "x"\noutput = "y"\nblok = 3\n')
    assert cli.main(["segment", "--config", str(bad)]) == 2  # a mistake in the configuration: a usage error
    assert "unknown configuration key(s) ['blok'] (did you mean blocksize?)" in capsys.readouterr().err
    bad.write_text("input = [\n")
    assert cli.main(["segment", "--config", str(bad)]) == 2
    assert "is not valid TOML" in capsys.readouterr().err
    assert cli.main(["segment", "--backend", "threshold", "--threshold", "1"]) == 2
    assert "configuration lacks ['input']" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="does not exist"):
        load_file(vol / "nope.toml")


def test_plan_dry_run_writes_nothing(vol, capsys):
    before = sorted(os.listdir(vol))
    rc = cli.main(["plan", str(vol / "in.zarr"), str(vol / "out.zarr"), "--backend", "threshold", "--threshold",
                   "100", "--blocksize", "10", "--ranks", "4", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert rc == 0 and sorted(os.listdir(vol)) == before
    assert r["grid"] == [3, 4, 4] and r["blocks"] == 48 and r["blocks_to_segment"] == 48
    assert r["blocks_per_rank"] == {"min": 12, "max": 12, "mean": 12.0}
    assert r["overlap_inflation"] == 1.0
    assert any("not a multiple of the input chunks" in w for w in r["warnings"])


def test_plan_warns_on_small_blocks_and_idle_ranks(vol, capsys):
    rc = cli.main(["plan", str(vol / "in.zarr"), str(vol / "out.zarr"), "--model", "demo", "--blocksize", "20",
                   "--ranks", "64"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "overlap (32, 32, 32) per side" in out
    assert "blocks are small relative to the overlap" in out and "will idle" in out


def test_plan_reports_bad_input(vol, capsys):
    assert cli.main(["plan", str(vol / "nope.zarr"), str(vol / "o.zarr"), "--backend", "threshold",
                     "--threshold", "1"]) == 1
    assert "does not exist" in capsys.readouterr().err
