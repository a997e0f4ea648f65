import os
import subprocess
import sys

import pytest

from conftest import ROOT, write_token_corpus
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


def test_a_config_file_that_is_no_file_of_settings_is_refused_unread(tmp_path):
    """/dev/zero never ends and a named pipe blocks: neither is read; nor more than 1 MB of a file."""
    os.mkfifo(tmp_path / "pipe.py")
    big = tmp_path / "big.py"
    big.write_text("n_layer = 3\n" + "#" * (1 << 20))
    for path, what in (("/dev/zero", "a character device"), (tmp_path / "pipe.py", "a named pipe"),
                       (tmp_path, "a folder")):
        with pytest.raises(UserError, match=f"^config file {path} is not a regular file \\({what}\\): "
                                            "name a .py file of settings$"):
            load_config([str(path)])
    with pytest.raises(UserError, match=f"^config file {big} is larger than 1 MB: a config file holds a few "
                                        r"settings \(n_layer = 6\); is it the right file\?$"):
        load_config([str(big)])
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "/dev/zero"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and result.stderr == ("error: config file /dev/zero is not a regular file (a "
                                                        "character device): name a .py file of settings\n")


def test_tiny_config_is_small():
    cfg = load_config([os.path.join(ROOT, "config/tiny.py")])
    assert cfg.n_layer * cfg.n_embd ** 2 < 6 * 256 ** 2 / 4 and cfg.max_iters <= 500


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as e:
        load_config(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--batch_size=8" in out and "--codec=None" in out and "--top_k=250" in out
    assert "config file is Python and is executed" in out and "only run config files you trust" in out


@pytest.mark.parametrize("arg, expected", [
    ("--n_codebooks=0", "setting 'n_codebooks' must be in 1..8, got 0"),
    ("--n_codebooks=-1", "setting 'n_codebooks' must be in 1..8, got -1"),
    ("--block_size=0", "setting 'block_size' must be in 2..1000000, got 0"),
    ("--block_size=10000000000", "setting 'block_size' must be in 2..1000000, got 10000000000"),
    ("--n_embd=99999999999", "setting 'n_embd' must be in 1..65536, got 99999999999"),
    ("--n_layer=100000", "setting 'n_layer' must be in 1..1024, got 100000"),
    ("--block_size=4", r"block_size \(4\) must be at least n_codebooks \(8\)"),
    ("--batch_size=0", "setting 'batch_size' must be in 1..65536, got 0"),
    ("--eval_interval=0", "setting 'eval_interval' must be >= 1, got 0"),
    ("--log_interval=0", "setting 'log_interval' must be >= 1, got 0"),
    ("--eval_iters=0", r"setting 'eval_iters' must be in 1..10\*\*6, got 0"),
    ("--gradient_accumulation_steps=0", "setting 'gradient_accumulation_steps' must be in 1..65536, got 0"),
    ("--max_iters=-5", r"setting 'max_iters' must be in 1..10\*\*9, got -5"),
    ("--n_head=3", r"n_embd \(256\) must be a multiple of n_head \(3\): each head gets n_embd / n_head channels"),
    ("--n_kv_head=3", r"n_head \(8\) must be a multiple of n_kv_head \(3\): each key/value head serves"),
    ("--n_kv_head=-1", r"setting 'n_kv_head' must be in 0..1024, got -1"),
    ("--out_dir=", "setting 'out_dir' must be a folder name, got ''"),
    ("--sample_every=-1", r"setting 'sample_every' must be >= 0 \(0 = off\), got -1"),
    ("--dropout=2", r"setting 'dropout' must be in \[0, 1\), got 2.0"),
    ("--codebook0_weight=0", "setting 'codebook0_weight' must be > 0, got 0.0"),
    ("--learning_rate=-1", "setting 'learning_rate' must be > 0, got -1.0"),
    ("--bigram_lr=-1", r"setting 'bigram_lr' must be >= 0, got -1.0"),
    ("--bigram_min_gain=-1", r"setting 'bigram_min_gain' must be >= 0 \(0 = the table whenever bigram is True\), got -1.0"),
    ("--learning_rate=nan", "setting 'learning_rate' must be a finite number > 0, got nan"),
    ("--top_p=inf", r"setting 'top_p' must be a finite number in \[0, 1\] \(0 = off\), got inf"),
    ("--min_lr=0.1", r"min_lr \(0.1\) must not exceed learning_rate \(0.002\)"),
    ("--val_fraction=1.5", r"setting 'val_fraction' must be in \[0, 1\), got 1.5"),
    ("--init_from=", "setting 'init_from' must be 'scratch', 'resume' or the path of a checkpoint to fine-tune, got ''"),
    ("--device=gpu", "setting 'device' must be auto, cpu, mps, cuda or cuda:N, got 'gpu'"),
    ("--dtype=float8", "setting 'dtype' must be auto, float32, bfloat16 or float16, got 'float8'"),
    ("--decode_dtype=int4", "setting 'decode_dtype' must be auto, float32, bfloat16 or int8, got 'int4'"),
    ("--codec=mp3", "setting 'codec' must be None or one of encodec_24khz, spectral, untrained, auto, got 'mp3'"),
    ("--seed=-1", r"setting 'seed' must be in 0..2\*\*32-1, got -1"),
    ("--seconds=0", "setting 'seconds' must be > 0, got 0.0"),
])
def test_settings_out_of_range_are_refused_with_the_range(arg, expected):
    with pytest.raises(UserError, match=expected) as e:
        load_config([arg])
    assert "\n" not in str(e.value)


def test_a_config_file_value_is_checked_like_an_override(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("learning_rate = float('nan')\n")
    with pytest.raises(UserError, match="bad.py: setting 'learning_rate' must be a finite number > 0, got nan"):
        load_config([str(bad)])


@pytest.mark.parametrize("script, arg, expected", [
    ("train.py", "--n_head=3", "error: n_embd (256) must be a multiple of n_head (3): each head gets "
                               "n_embd / n_head channels"),
    ("sample.py", "--learning_rate=nan", "error: setting 'learning_rate' must be a finite number > 0, got nan"),
])
def test_bad_setting_on_the_command_line_is_one_line_and_exit_2(tmp_path, script, arg, expected):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), arg], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == expected
    assert os.listdir(tmp_path) == []   # nothing created before the settings are checked


def test_a_bench_user_error_is_one_line_and_exit_2(tmp_path):
    """bench.py runs through run_cli like the other commands: a checkpoint that is not there is one line."""
    write_token_corpus(tmp_path / "tokens", file_frames=[100], val_file_frames=[100])
    missing = tmp_path / "best.pt"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "decode_quality", f"--ckpt={missing}",
                             f"--data_dir={tmp_path / 'tokens'}"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no checkpoint file {missing}: give a checkpoint that train.py wrote, or train first"
