import os

import pytest

from conftest import ROOT
from nanosuno.common import UserError
from nanosuno.config import Config, load_config


def test_defaults_without_arguments():
    assert load_config([]) == Config()


def test_config_file_then_overrides():
    cfg = load_config([os.path.join(ROOT, "config/small.py"), "--batch_size=3", "--learning_rate=1e-3",
                       "--compile=False", "--codec_dir=/weights", "--prompt=None", "--dropout=0"])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.n_codebooks) == (6, 8, 256, 2048, 8)
    assert cfg.batch_size == 3 and cfg.learning_rate == 1e-3
    assert cfg.compile is False and cfg.codec_dir == "/weights" and cfg.prompt is None
    assert cfg.dropout == 0.0 and isinstance(cfg.dropout, float)  # an int is accepted for a float


def test_keyword_overrides_win_and_are_checked():
    assert load_config(["--seed=1"], seed=2).seed == 2
    with pytest.raises(UserError, match="seed"):
        load_config([], seed="two")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(UserError) as e:
        load_config(["--batchsize=4"])
    message = str(e.value)
    assert "unknown setting 'batchsize'" in message and "did you mean 'batch_size'" in message
    assert "learning_rate" in message and "top_p" in message  # the list of valid settings


@pytest.mark.parametrize("arg, expected", [
    ("--batch_size=2.5", "must be int"),
    ("--batch_size=True", "must be int"),       # bools are not ints here
    ("--compile=yes", "must be bool or None"),
    ("--learning_rate=fast", "must be float"),
    ("--n_layer=None", "must be int"),
    ("--max_iters", "expected --key=value"),
])
def test_bad_values_are_rejected(arg, expected):
    with pytest.raises(UserError, match=expected):
        load_config([arg])


def test_strings_need_no_quotes_and_numbers_parse():
    cfg = load_config(["--out_dir=runs/a b", "--input_dir=2024", "--top_p=0.9", "--temperature=0",
                       "--codec_dir=None"])
    assert cfg.out_dir == "runs/a b" and cfg.top_p == 0.9 and cfg.temperature == 0.0
    assert cfg.input_dir == "2024"  # a folder named like a number stays a string
    assert cfg.codec_dir is None


@pytest.mark.parametrize("source, expected", [
    ("n_layer = 'six'\n", "bad.py: setting 'n_layer' must be int"),
    ("import math\nn_layers = 4\n", "unknown setting 'n_layers'"),   # imports are ignored, typos are not
    ("n_layer = (\n", "bad.py failed: SyntaxError"),
])
def test_bad_config_file(tmp_path, source, expected):
    bad = tmp_path / "bad.py"
    bad.write_text(source)
    with pytest.raises(UserError, match=expected):
        load_config([str(bad)])


def test_config_file_must_exist_and_come_first(tmp_path):
    with pytest.raises(UserError, match="cannot read config file"):
        load_config([str(tmp_path / "missing.py")])
    good = tmp_path / "good.py"
    good.write_text("n_layer = 3\n")
    with pytest.raises(UserError, match="must come before"):
        load_config(["--n_layer=2", str(good)])


def test_tiny_config_is_small():
    cfg = load_config([os.path.join(ROOT, "config/tiny.py")])
    assert cfg.n_layer * cfg.n_embd ** 2 < 6 * 256 ** 2 / 4 and cfg.max_iters <= 500


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as e:
        load_config(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--batch_size=8" in out and "--codec=None" in out and "--top_k=250" in out
