"""prepare.py and what it stands on (audio I/O, the demo corpus, the train/val split): mixed formats,
bad input, the token files against meta.json, repeatability, the per-file cache. CPU, no network,
the untrained codec, audio synthesised here."""
import functools
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from nanosuno import audio, demo
from nanosuno.audio import AudioError, find_audio_files, iter_audio_blocks, load_audio, save_wav
from nanosuno.codec import Codec
from nanosuno.common import UserError
from nanosuno.data import TOKEN_DTYPE, assign_splits, open_split, read_meta, scan

import prepare  # a script at the repository's top level (conftest.py puts it on sys.path)
from conftest import ROOT, fail_writes, hold_lock, run_torchrun, write_token_corpus


def music(seconds, rate, channels=1, index=0):
    """(samples, channels) float32 of the demo synthesiser; the channels differ a little."""
    mono = demo.synth_piece(index, seconds, rate)
    return np.stack([mono * (1 - 0.2 * c) for c in range(channels)], axis=1)


def make_corpus(folder):
    """Three good files in three formats, rates and channel counts, and one that is not audio."""
    os.makedirs(folder, exist_ok=True)
    sf.write(os.path.join(folder, "a_stereo.wav"), music(1.5, 44100, 2, 0), 44100, subtype="PCM_16")
    sf.write(os.path.join(folder, "b.flac"), music(1.5, 48000, 1, 1), 48000)
    sf.write(os.path.join(folder, "c.ogg"), music(1.5, 32000, 2, 2), 32000, format="OGG", subtype="VORBIS")
    with open(os.path.join(folder, "broken.wav"), "w") as f:
        f.write("this is a text file, not a recording\n" * 20)
    return folder


def run(capsys, input_dir, data_dir, *args):
    prepare.main([f"--input_dir={input_dir}", f"--data_dir={data_dir}", "--codec=untrained", *args])
    return capsys.readouterr().out


def read_bytes(data_dir):
    return {name: open(os.path.join(data_dir, name), "rb").read() for name in ("train.bin", "val.bin", "meta.json")}


def count_encodes(monkeypatch, interrupt_at=None):
    """Count files the codec encodes (patching Codec.encode_blocks); optionally interrupt one."""
    calls = {"started": 0, "done": 0}
    original = Codec.encode_blocks

    def encode_blocks(self, blocks):
        calls["started"] += 1
        if calls["started"] == interrupt_at:
            raise KeyboardInterrupt
        codes = original(self, blocks)
        calls["done"] += 1
        return codes
    monkeypatch.setattr(Codec, "encode_blocks", encode_blocks)
    return calls


# --- prepare ---------------------------------------------------------------------------------

def test_mixed_formats_and_a_corrupt_file(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "wavs")
    out = run(capsys, corpus, tmp_path / "tokens")
    assert "prepared 3 file(s)" in out
    assert "skipped 1: broken.wav: not a readable audio file" in out

    meta = read_meta(tmp_path / "tokens")
    assert (meta["codec"], meta["sample_rate"], meta["frame_rate"], meta["bandwidth"]) == ("untrained", 24000, 75, 6.0)
    assert (meta["n_codebooks"], meta["codebook_size"], meta["dtype"]) == (8, 1024, "uint16")
    files = meta["splits"]["train"]["files"] + meta["splits"]["val"]["files"]
    assert sorted(f["path"] for f in files) == ["a_stereo.wav", "b.flac", "c.ogg"]
    assert meta["splits"]["val"]["files"] and meta["splits"]["train"]["files"]  # 3 files: neither split empty
    for split in ("train", "val"):
        info = meta["splits"][split]
        size = os.path.getsize(tmp_path / "tokens" / f"{split}.bin")
        assert size == info["frames"] * 8 * np.dtype(TOKEN_DTYPE).itemsize
        offset = 0
        for f in info["files"]:  # contiguous, and one frame per 320 samples at 24 kHz
            assert f["offset"] == offset
            source = sf.info(os.path.join(corpus, f["path"]))
            assert f["frames"] == math.ceil(math.ceil(source.frames * 24000 / source.samplerate) / 320)
            offset += f["frames"]
        assert offset == info["frames"]
        tokens = open_split(tmp_path / "tokens", meta, split)
        assert tokens.shape == (info["frames"], 8) and tokens.dtype == np.uint16
        assert tokens.max() < 1024
        assert len(np.unique(tokens[:, 0])) > 10  # real codes, not one repeated value


def test_two_runs_are_byte_identical_and_a_rerun_uses_the_cache(tmp_path, capsys, monkeypatch):
    corpus = make_corpus(tmp_path / "wavs")
    run(capsys, corpus, tmp_path / "one")
    run(capsys, corpus, tmp_path / "two")  # its own cache: everything encoded again
    assert read_bytes(tmp_path / "one") == read_bytes(tmp_path / "two")
    calls = count_encodes(monkeypatch)
    out = run(capsys, corpus, tmp_path / "one")
    assert "1 to encode, 3 cached" in out  # broken.wav is tried again
    assert calls["done"] == 0
    assert read_bytes(tmp_path / "one") == read_bytes(tmp_path / "two")


def test_adding_a_file_encodes_only_that_file(tmp_path, capsys, monkeypatch):
    corpus = make_corpus(tmp_path / "wavs")
    os.remove(corpus / "broken.wav")
    run(capsys, corpus, tmp_path / "tokens")
    cache = tmp_path / "tokens" / "cache"
    before = {name: os.stat(cache / name).st_mtime_ns for name in os.listdir(cache)}
    sf.write(corpus / "d_new.wav", music(1.0, 24000, 1, 4), 24000)
    calls = count_encodes(monkeypatch)
    out = run(capsys, corpus, tmp_path / "tokens")
    assert "1 to encode, 3 cached" in out and calls["done"] == 1
    assert {name: os.stat(cache / name).st_mtime_ns for name in before} == before
    meta = read_meta(tmp_path / "tokens")
    assert sum(len(s["files"]) for s in meta["splits"].values()) == 4


def test_a_changed_file_is_encoded_again(tmp_path, capsys, monkeypatch):
    corpus = make_corpus(tmp_path / "wavs")
    run(capsys, corpus, tmp_path / "tokens")
    sf.write(corpus / "b.flac", music(2.0, 48000, 1, 5), 48000)  # new size and modification time
    calls = count_encodes(monkeypatch)
    run(capsys, corpus, tmp_path / "tokens")
    assert calls["done"] == 1
    files = {f["path"]: f["frames"] for s in read_meta(tmp_path / "tokens")["splits"].values() for f in s["files"]}
    assert files["b.flac"] == 150


def test_an_interrupted_run_resumes(tmp_path, capsys, monkeypatch):
    corpus = make_corpus(tmp_path / "wavs")
    run(capsys, corpus, tmp_path / "tokens")
    with pytest.raises(KeyboardInterrupt):  # a second data_dir, interrupted at its second file
        count_encodes(monkeypatch, interrupt_at=2)
        run(capsys, corpus, tmp_path / "again")
    assert not os.path.exists(tmp_path / "again" / "meta.json")
    assert len(os.listdir(tmp_path / "again" / "cache")) == 1
    calls = count_encodes(monkeypatch)
    run(capsys, corpus, tmp_path / "again")
    assert calls["done"] == 2  # only the two files not finished before
    assert read_bytes(tmp_path / "again") == read_bytes(tmp_path / "tokens")


def test_first_level_folders_become_styles(tmp_path, capsys, monkeypatch):
    """A file's style is its first folder under input_dir (none directly in it); meta.json lists the
    styles with their frames and the summary line prints them. --styles=none drops them, re-using
    every cached file: the tokens are the same, only the labels differ."""
    corpus = tmp_path / "wavs"
    for folder in ("calm", "loud/live"):
        os.makedirs(corpus / folder)
    sf.write(corpus / "calm" / "a.wav", music(0.5, 24000, index=1), 24000)
    sf.write(corpus / "loud" / "b.wav", music(0.6, 24000, index=2), 24000)
    sf.write(corpus / "loud" / "live" / "c.wav", music(0.4, 24000, index=3), 24000)
    sf.write(corpus / "d.wav", music(0.3, 24000, index=4), 24000)
    out = run(capsys, corpus, tmp_path / "tokens")
    assert "; styles: calm (38 frames), loud (75 frames)" in out   # 0.5 s, and 0.6 s + 0.4 s, at 75 frames/s
    meta = read_meta(tmp_path / "tokens")
    files = {f["path"]: f["style"] for s in meta["splits"].values() for f in s["files"]}
    assert files == {"calm/a.wav": "calm", "loud/b.wav": "loud", "loud/live/c.wav": "loud", "d.wav": None}
    assert meta["styles"] == [{"name": "calm", "frames": 38}, {"name": "loud", "frames": 75}]
    tokens = {name: data for name, data in read_bytes(tmp_path / "tokens").items() if name != "meta.json"}

    calls = count_encodes(monkeypatch)
    out = run(capsys, corpus, tmp_path / "tokens", "--styles=none")
    assert "0 to encode, 4 cached" in out and calls["started"] == 0 and "; styles: none" in out
    meta = read_meta(tmp_path / "tokens")
    assert meta["styles"] == [] and all(f["style"] is None for s in meta["splits"].values() for f in s["files"])
    assert {name: data for name, data in read_bytes(tmp_path / "tokens").items() if name != "meta.json"} == tokens
    with pytest.raises(UserError, match="setting 'styles' must be 'folders' .* or 'none', got 'genre'"):
        run(capsys, corpus, tmp_path / "tokens", "--styles=genre")


def test_a_moved_corpus_and_copied_files_hit_the_cache(tmp_path, capsys, monkeypatch):
    corpus = make_corpus(tmp_path / "wavs")
    os.remove(corpus / "broken.wav")
    run(capsys, corpus, tmp_path / "tokens")
    before = read_bytes(tmp_path / "tokens")
    moved = tmp_path / "elsewhere" / "music"
    os.makedirs(moved.parent)
    os.rename(corpus, moved)  # a new path and a new folder name for every file: still the same bytes
    calls = count_encodes(monkeypatch)
    out = run(capsys, moved, tmp_path / "tokens")
    assert "0 to encode, 3 cached" in out and calls["done"] == 0
    assert read_bytes(tmp_path / "tokens") == before
    shutil.copy(moved / "b.flac", moved / "b_copy.flac")
    os.makedirs(moved / "calm")  # a copy in a style folder: the cached codes, its own style
    shutil.copy(moved / "b.flac", moved / "calm" / "b.flac")
    shutil.copy(moved / "c.ogg", moved / "d.ogg")
    open(moved / "d.ogg", "ab").write(b"\0")  # one byte more: another file, encoded
    out = run(capsys, moved, tmp_path / "tokens")
    assert "1 to encode, 5 cached" in out and calls["done"] == 1
    files = {f["path"]: (f["frames"], f["style"]) for s in read_meta(tmp_path / "tokens")["splits"].values()
             for f in s["files"]}
    assert len(files) == 6 and files["b.flac"][1] is None and files["calm/b.flac"][1] == "calm"
    assert files["b_copy.flac"][0] == files["calm/b.flac"][0] == files["b.flac"][0]


def styled_corpus(folder):
    """make_corpus and a file in a style folder (styles are the one thing not in the cache: the
    process that writes meta.json gives them from the paths)."""
    make_corpus(folder)
    os.makedirs(folder / "calm")
    sf.write(folder / "calm" / "d.wav", music(1.0, 24000, index=3), 24000)
    return folder


def test_torchrun_prepare_gives_the_bytes_of_one_process_and_resumes_from_the_cache(tmp_path, capsys):
    corpus = styled_corpus(tmp_path / "wavs")
    run(capsys, corpus, tmp_path / "one")
    assert read_meta(tmp_path / "one")["styles"] == [{"name": "calm", "frames": 75}]
    # a run killed after one file: its cache holds that file's codes only
    os.makedirs(tmp_path / "two" / "cache")
    done = sorted(os.listdir(tmp_path / "one" / "cache"))[0]
    shutil.copy2(tmp_path / "one" / "cache" / done, tmp_path / "two" / "cache" / done)
    stamp = os.stat(tmp_path / "two" / "cache" / done).st_mtime_ns
    result = run_torchrun(["--nproc_per_node=2", "prepare.py", f"--input_dir={corpus}",
                           f"--data_dir={tmp_path / 'two'}", "--codec=untrained"], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 to encode, 1 cached, 2 processes" in result.stdout  # broken.wav is tried again
    assert "prepared 4 file(s)" in result.stdout
    assert "skipped 1: broken.wav: not a readable audio file" in result.stdout
    assert os.stat(tmp_path / "two" / "cache" / done).st_mtime_ns == stamp
    assert sorted(os.listdir(tmp_path / "two" / "cache")) == sorted(os.listdir(tmp_path / "one" / "cache"))
    assert read_bytes(tmp_path / "two") == read_bytes(tmp_path / "one")


def test_workers_is_no_setting_torchrun_spreads_the_encoding(tmp_path, capsys):
    """--workers (processes on one machine, slower than one process on 2 cores: docs/speed.md) is
    gone: it is refused in one line like any unknown setting, before anything is read or written."""
    with pytest.raises(UserError, match=r"^unknown setting 'workers'; valid settings: ") as error:
        run(capsys, make_corpus(tmp_path / "wavs"), tmp_path / "tokens", "--workers=2")
    assert "\n" not in str(error.value) and not os.path.exists(tmp_path / "tokens")


def test_bad_input_is_reported_and_skipped(tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "wavs"
    os.makedirs(corpus / "locked")
    sf.write(corpus / "good.wav", music(1.0, 24000), 24000)
    sf.write(corpus / "locked" / "hidden_by_permissions.wav", music(1.0, 24000), 24000)
    sf.write(corpus / "silent.wav", np.zeros(24000, dtype=np.float32), 24000)
    sf.write(corpus / "tiny.wav", music(0.004, 24000), 24000)  # 96 samples: less than one frame
    open(corpus / "empty.wav", "wb").close()
    with open(corpus / "text.wav", "w") as f:
        f.write("not audio\n")
    shutil.copy(corpus / "text.wav", corpus / "text_copy.wav")  # the same bytes, reported too
    whole = open(corpus / "good.wav", "rb").read()
    open(corpus / "truncated.wav", "wb").write(whole[:len(whole) // 2])
    sf.write(tmp_path / "whole.flac", music(3.0, 44100), 44100)
    whole = open(tmp_path / "whole.flac", "rb").read()
    open(corpus / "truncated.flac", "wb").write(whole[:len(whole) // 2])
    os.symlink(tmp_path / "nowhere", corpus / "gone")  # a link to a folder that is not there
    os.symlink(tmp_path / "moved.wav", corpus / "moved.wav")  # ... and to a file
    open(corpus / "notes.txt", "w").write("ignored: not an audio extension")
    open(corpus / "text.mp3", "w").write("not audio either\n" * 20)
    for name, bad in (("nan.wav", np.nan), ("inf.wav", -np.inf)):   # float WAVs with non-finite samples
        samples = music(1.0, 24000)
        samples[5000] = bad
        sf.write(corpus / name, samples, 24000, subtype="FLOAT")
    os.mkfifo(corpus / "pipe.wav")   # opening it would block until someone writes
    sf.write(corpus / "denied.wav", music(1.0, 24000), 24000)
    # root can read any folder and file, so make them unreadable the way the OS would say it
    scandir, open_ = os.scandir, os.open

    def locked_scandir(path):
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied")
        return scandir(path)
    sf.write(corpus / "no_access.wav", music(1.0, 24000), 24000)  # denied to prepare's hashing (open)

    def locked_open(path, *args, **kwargs):
        if os.path.basename(path) == "no_access.wav":
            raise PermissionError(13, "Permission denied")
        return open(path, *args, **kwargs)
    monkeypatch.setattr(prepare, "open", locked_open, raising=False)

    def denied_open(path, *args, **kwargs):
        if str(path).endswith("denied.wav"):
            raise PermissionError(13, "Permission denied")
        return open_(path, *args, **kwargs)
    monkeypatch.setattr(audio.os, "scandir", locked_scandir)
    monkeypatch.setattr(audio.os, "open", denied_open)

    signal.alarm(600)   # should pipe.wav ever be opened, fail instead of hanging forever
    out = run(capsys, corpus, tmp_path / "tokens")
    signal.alarm(0)
    assert "prepared 2 file(s)" in out
    assert "silent, kept: silent.wav" in out
    for expected in ("empty.wav: empty file (0 bytes)", "text.wav: not a readable audio file",
                     "tiny.wav: shorter than one codec frame", "truncated.wav: truncated",
                     "truncated.flac: damaged or truncated", "locked: cannot read folder: Permission denied",
                     "gone: broken link", "moved.wav: broken link", "nan.wav: contains NaN/inf samples",
                     "inf.wav: contains NaN/inf samples", "pipe.wav: not a regular file (a named pipe)",
                     "denied.wav: cannot read file (Permission denied)",
                     "text.mp3: not a readable audio file (format not recognised)",
                     "text_copy.wav: not a readable audio file",
                     "no_access.wav: cannot read file (Permission denied)"):
        assert expected in out
    assert "skipped 15" in out
    meta = read_meta(tmp_path / "tokens")
    assert sorted(f["path"] for s in meta["splits"].values() for f in s["files"]) == ["good.wav", "silent.wav"]


def test_nothing_usable_is_an_error(tmp_path, capsys):
    corpus = tmp_path / "wavs"
    corpus.mkdir()
    open(corpus / "empty.wav", "wb").close()
    open(corpus / "text.mp3", "w").write("not audio")
    with pytest.raises(UserError, match="nothing could be prepared"):
        run(capsys, corpus, tmp_path / "tokens")


def test_an_explicit_missing_or_empty_folder_is_an_error(tmp_path, capsys):
    with pytest.raises(UserError, match="does not exist"):
        run(capsys, tmp_path / "missing", tmp_path / "tokens")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no audio files"):
        run(capsys, tmp_path / "empty", tmp_path / "tokens")
    assert os.listdir(tmp_path / "empty") == []  # no demo corpus written into the user's folder


def test_the_default_folder_gets_the_demo_corpus(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the real corpus is 12 minutes (tested below); here a small one keeps the test fast
    monkeypatch.setattr(demo, "make_demo_corpus",
                        functools.partial(demo.make_demo_corpus, n_files=3, seconds=2.0))
    prepare.main(["--codec=untrained"])
    out = capsys.readouterr().out
    assert "demo corpus" in out and "prepared 3 file(s)" in out
    assert len(find_audio_files("data/wavs")) == 3
    assert read_meta("data/tokens")["splits"]["train"]["frames"] > 0


def test_cli_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "prepare.py", f"--input_dir={tmp_path / 'missing'}"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: input_dir {tmp_path / 'missing'} does not exist or is not a folder"


def test_codec_auto_falls_back_to_the_spectral_codec_when_the_weights_cannot_be_had(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache: weights on this machine must not count

    def offline(url, dst, *args, **kwargs):  # as on a machine without network
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    corpus = tmp_path / "wavs"
    corpus.mkdir()
    sf.write(corpus / "a.wav", music(15.0, 24000), 24000)   # (the spectral codec fits on >= 14 s)
    run_args = [f"--input_dir={corpus}", f"--data_dir={tmp_path / 'tokens'}"]
    prepare.main(run_args + ["--codec=auto"])
    err = capsys.readouterr().err
    loud = [line for line in err.splitlines() if "***" in line or "warning" in line]
    assert loud == ["*** pretrained Encodec unavailable (encodec_24khz-d7cc33bc.th not in "
                    f"{tmp_path / 'torch' / 'hub' / 'checkpoints'}, and downloading it failed: <urlopen error [Errno -3] "
                    "Temporary failure in name resolution>): using the spectral codec fitted on your corpus ***"]
    assert read_meta(tmp_path / "tokens")["codec"] == "spectral"
    assert os.path.isfile(tmp_path / "tokens" / "codec.pt")
    with pytest.raises(UserError, match="downloading it failed: .*name resolution.*--codec_dir") as error:
        prepare.main(run_args + ["--codec=encodec_24khz"])   # named explicitly: no fallback
    assert "\n" not in str(error.value)


def test_bad_val_fraction(tmp_path, capsys):
    with pytest.raises(UserError, match="val_fraction"):
        run(capsys, tmp_path, tmp_path / "tokens", "--val_fraction=1.5")


# --- nothing lost: failed and concurrent runs -------------------------------------------------

def two_corpora(tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    for i in range(3):
        sf.write(first / f"{i}.wav", music(1.0, 24000, index=i), 24000)
    second = tmp_path / "second"
    second.mkdir()
    sf.write(second / "other.wav", music(2.0, 24000, index=7), 24000)
    sf.write(second / "more.wav", music(1.0, 24000, index=8), 24000)
    return first, second


def test_a_failed_run_leaves_the_old_token_files_usable(tmp_path, capsys, monkeypatch):
    first, second = two_corpora(tmp_path)
    tokens = tmp_path / "tokens"
    run(capsys, first, tokens)
    before = read_bytes(tokens)
    fail_writes(monkeypatch, "val.bin")   # the disk fills up while the new set is written
    with pytest.raises(UserError, match=f"^no space left on {tokens}$"):
        run(capsys, second, tokens)
    monkeypatch.undo()
    assert read_bytes(tokens) == before
    assert not [name for name in os.listdir(tokens) if ".tmp" in name]
    meta = read_meta(tokens)
    assert open_split(tokens, meta, "train").shape == (meta["splits"]["train"]["frames"], 8)


def limit_file_size(size):
    """For subprocess's preexec_fn: files can grow to `size` bytes, then writes fail as on a full
    disk (with EFBIG): what fits is written, as on a disk that fills up during a write."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # (else the process is killed; inherited across exec)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))


def test_a_disk_that_fills_up_while_codes_are_cached_is_one_line(tmp_path):
    os.makedirs(tmp_path / "wavs")
    sf.write(tmp_path / "wavs" / "a.wav", music(2.0, 24000), 24000)
    # the codes' .npy takes 2,528 bytes; its 128-byte header fits (numpy's own writes then said
    # "2400 requested and 872 written", no errno: a traceback)
    result = subprocess.run([sys.executable, "prepare.py", f"--input_dir={tmp_path / 'wavs'}", "--codec=untrained",
                             f"--data_dir={tmp_path / 'tokens'}"], cwd=ROOT, capture_output=True, text=True,
                            preexec_fn=functools.partial(limit_file_size, 1000), timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert re.fullmatch(f"error: cannot write {tmp_path / 'tokens' / 'cache'}/[0-9a-f]{{32}}\\.npy: file too large "
                        r"for its file system \(or for `ulimit -f`\)", result.stderr.splitlines()[-1])
    assert os.listdir(tmp_path / "tokens" / "cache") == []   # no temporary left behind


def test_a_crash_between_renames_is_caught_on_load(tmp_path, capsys, monkeypatch):
    first, second = two_corpora(tmp_path)
    tokens = tmp_path / "tokens"
    run(capsys, first, tokens)
    replace = os.replace

    def crash_before_meta(src, dst):
        if str(dst).endswith("meta.json"):
            raise KeyboardInterrupt   # killed after the .bins were renamed, before meta.json was
        replace(src, dst)
    monkeypatch.setattr(os, "replace", crash_before_meta)
    with pytest.raises(KeyboardInterrupt):
        run(capsys, second, tokens)
    monkeypatch.undo()
    meta = read_meta(tokens)   # the old meta.json, the new train.bin
    with pytest.raises(UserError, match=r"train.bin \(\d+ bytes\) is not the file that meta.json describes "
                                        r"\(\d+ bytes.*run prepare.py again"):
        open_split(tokens, meta, "train")


def test_a_second_prepare_on_one_data_dir_is_refused(tmp_path, capsys):
    first, _ = two_corpora(tmp_path)
    holder = hold_lock(tmp_path / "tokens", "data_dir")   # e.g. a first prepare.py run, still going
    try:
        with pytest.raises(UserError, match=fr"data_dir {tmp_path / 'tokens'} is in use by another run "
                                            fr"\(pid {holder.pid}\)"):
            run(capsys, first, tmp_path / "tokens")
    finally:
        holder.kill()   # as a crash would: the OS drops its lock...
        holder.wait()
    assert os.listdir(tmp_path / "tokens") == [".lock"]
    os.makedirs(tmp_path / "tokens" / "cache")   # ...and what a killed run left is cleaned up by the next
    left = [tmp_path / "tokens" / "train.bin.tmp-4194000-0f", tmp_path / "tokens" / "cache" / "a.npy.tmp-4194000-0e"]
    for path in left:
        path.write_bytes(bytes(1000))
    run(capsys, first, tmp_path / "tokens")
    assert not any(os.path.exists(path) for path in left)
    assert read_meta(tmp_path / "tokens")["splits"]["train"]["frames"] > 0


# --- token files checked on load ------------------------------------------------------------------

def edit_json(path, change):
    meta = json.load(open(path))
    change(meta)
    json.dump(meta, open(path, "w"))


def edit_bytes(path, change):
    data = bytearray(open(path, "rb").read())
    open(path, "wb").write(change(data))


@pytest.mark.parametrize("damage, expected", [
    (lambda m: m.update(n_codebooks=0), "n_codebooks is 0, not an integer >= 1"),
    (lambda m: m.update(codebook_size="1024"), "codebook_size is '1024', not an integer >= 1"),
    (lambda m: m["splits"]["train"].update(frames=749), "split train: 749 frames of 16 bytes are not the 12000 bytes"),
    (lambda m: m["splits"]["train"]["files"][1].update(offset=-5), "file train_1.wav: offset -5, expected 400"),
    (lambda m: m["splits"]["train"]["files"][2].update(offset=10 ** 9), "file train_2.wav: offset 1000000000, expected 700"),
    (lambda m: m["splits"]["val"]["files"][0].update(frames=True), "split val, file 0: no path or no frames"),
    (lambda m: m["splits"]["val"].pop("fingerprint"), "its fingerprint is missing"),
    (lambda m: m["splits"].pop("val"), "split val lacks its frames or files"),
    (lambda m: m["splits"].update(test=m["splits"]["val"]), "splits ['test', 'train', 'val'] are not train, val"),
    (lambda m: m["baselines"].update(unigram=[1.0]), "baselines are not unigram, prev_frame, lower_codebook"),
    (lambda m: m["splits"]["train"]["files"][0].update(style=5), "file train_0.wav: style 5 is not a name or null"),
    (lambda m: m["splits"]["val"]["files"][0].pop("style"), "file val_0.wav: style '(none)' is not a name"),
    (lambda m: m.update(styles=[{"name": "jazz", "frames": 400}]), "are not its files' styles with their frames"),
    (lambda m: m.update(format_version=3), "has format version 3, this nanosuno reads version 4"),
    (lambda m: m.update(frame_rate=0), "frame_rate is 0, not an integer >= 1"),
    (lambda m: m.update(frame_rate=50), "codec untrained: frame_rate 50 (the codec's is 75)"),
    (lambda m: m.update(codebook_size=2000), "codec untrained: codebook_size 2000 (the codec's is 1024)"),
    (lambda m: m.update(codec="mystery"), "codec 'mystery' is not one of this nanosuno's (encodec_24khz, spectral, untrained"),
])
def test_meta_json_is_checked_on_load(token_corpus, damage, expected):
    edit_json(os.path.join(token_corpus, "meta.json"), damage)
    with pytest.raises(UserError, match=re.escape(expected) + ".*run prepare.py again") as e:
        read_meta(token_corpus)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("damage, expected", [
    (lambda b: b + b"abc", r"train.bin \(12003 bytes\) is not the file that meta.json describes \(12000 bytes\)"),
    (lambda b: b[:-16], r"train.bin \(11984 bytes\) is not the file that meta.json describes"),
    (lambda b: b[:4096] + bytes(4096) + b[8192:], r"\(12000 bytes, other contents\)"),
])
def test_token_files_are_checked_against_meta_json(token_corpus, damage, expected):
    edit_bytes(os.path.join(token_corpus, "train.bin"), damage)
    with pytest.raises(UserError, match=expected + ".*run prepare.py again"):
        open_split(token_corpus, read_meta(token_corpus), "train")


@pytest.mark.parametrize("fill", [b"\xff", b"\x00"])
def test_every_byte_of_a_token_file_is_checked(tmp_path, fill):
    """8 KiB overwritten far from the file's start and end, between any few blocks a sample of the
    file would read: codes past the codebook would crash training, zeros would be trained on."""
    write_token_corpus(tmp_path, file_frames=[40000], val_file_frames=[100])
    edit_bytes(tmp_path / "train.bin", lambda b: b[:405632] + fill * 8192 + b[413824:])
    with pytest.raises(UserError, match=r"\(640000 bytes, other contents\).*run prepare.py again"):
        open_split(tmp_path, read_meta(tmp_path), "train")


def test_codes_outside_the_codebook_are_refused_even_when_meta_json_agrees(token_corpus):
    path = os.path.join(token_corpus, "train.bin")
    edit_bytes(path, lambda b: b[:100] + b"\xff\x07" + b[102:])   # code 2047
    with open(path, "rb") as f:
        edit_json(os.path.join(token_corpus, "meta.json"), lambda m: m["splits"]["train"].update(fingerprint=scan(f)[0]))
    with pytest.raises(UserError, match=r"train.bin holds code 2047, outside the codebook of 1024 codes: run prepare.py again"):
        open_split(token_corpus, read_meta(token_corpus), "train")


# --- the train/val split ---------------------------------------------------------------------

def test_split_is_deterministic_and_stable_when_files_are_added():
    names = [f"album/track_{i:03d}.flac" for i in range(200)]
    split = assign_splits(names, 0.1)
    assert split == assign_splits(list(reversed(names)), 0.1)
    assert 5 < sum(s == "val" for s in split.values()) < 40
    more = assign_splits(names + [f"new/{i}.wav" for i in range(50)], 0.1)
    assert all(more[name] == split[name] for name in names)


def test_split_never_leaves_a_side_empty():
    for n in range(2, 6):
        names = [f"{i}.wav" for i in range(n)]
        for fraction in (0.01, 0.5, 0.99):
            assert set(assign_splits(names, fraction).values()) == {"train", "val"}
    assert assign_splits(["only.wav"], 0.1) == {"only.wav": "train"}
    assert set(assign_splits(["a.wav", "b.wav"], 0.0).values()) == {"train"}


# --- the demo corpus -------------------------------------------------------------------------

def test_demo_corpus_is_ten_minutes_of_varied_deterministic_music(tmp_path):
    paths = demo.make_demo_corpus(tmp_path)
    assert len(paths) >= 12
    assert sum(sf.info(p).duration for p in paths) >= 600
    names = [os.path.basename(p).split("_") for p in paths]
    assert len({n[2] for n in names}) >= 6 and len({n[4] for n in names}) >= 4  # keys, tempi
    first, rate = sf.read(paths[0], dtype="float32")
    assert rate == 24000
    assert np.abs(first - demo.synth_piece(0)).max() < 1e-4  # what the synthesiser makes, 16-bit
    assert np.array_equal(demo.synth_piece(5, 3.0), demo.synth_piece(5, 3.0))


# --- audio I/O -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,rate,channels,kwargs", [
    ("int16.wav", 44100, 2, {"subtype": "PCM_16"}),
    ("int24.wav", 22050, 1, {"subtype": "PCM_24"}),
    ("float.wav", 24000, 2, {"subtype": "FLOAT"}),
    ("hi.flac", 48000, 2, {}),
    ("low.ogg", 32000, 1, {"format": "OGG", "subtype": "VORBIS"}),
    ("song.mp3", 44100, 2, {"format": "MP3", "subtype": "MPEG_LAYER_III"}),
    ("studio.wav", 384000, 1, {"subtype": "FLOAT"}),   # the filter reaches 97 samples to each side
])
def test_load_audio_any_format_rate_and_channels(tmp_path, name, rate, channels, kwargs):
    path = str(tmp_path / name)
    sf.write(path, music(2.3, rate, channels), rate, **kwargs)
    stored, _ = sf.read(path, dtype="float32", always_2d=True)
    expected = torchaudio.functional.resample(torch.from_numpy(stored.mean(axis=1)), rate, 24000)
    tolerance = 1e-4 if name.endswith(".mp3") else 1e-5  # MP3s are decoded to 16 bits (see audio.py)
    waveform = load_audio(path)
    assert waveform.dtype == torch.float32 and waveform.shape == expected.shape
    assert torch.allclose(waveform, expected, atol=tolerance)
    # many small blocks, each resampled with its neighbours' samples: the same as one pass
    blocks = list(iter_audio_blocks(path, 24000, block_seconds=0.3))
    assert len(blocks) > 5 and torch.allclose(torch.cat(blocks), expected, atol=tolerance)


def test_resampling_is_exact_for_common_rates_and_small_for_any_rate():
    for rate in (8000, 11025, 16000, 22050, 32000, 44100, 48000, 88200, 96000, 176400, 192000, 384000):
        assert audio.resampling_ratio(rate, 24000) == (rate // math.gcd(rate, 24000), 24000 // math.gcd(rate, 24000))
    assert audio.resampling_ratio(96001, 24000) == (4, 1)   # as if it were 96000 Hz: 10 ppm
    for rate in (1, 7919, 24001, 44099, 71989, 96001, 767999, 2 ** 31 - 1):   # coprime or nearly so
        step, step_out = audio.resampling_ratio(rate, 24000)
        assert step_out * (step + 2 * audio._reach(step, step_out)) <= audio.MAX_KERNEL
        assert abs(step * 24000 / (step_out * rate) - 1) < 1.4e-4


RESAMPLE_IN_1_GB = """
import re, resource, sys
import numpy as np
from nanosuno.audio import load_audio
load_audio(sys.argv[1][:-4] + "_small.wav")   # torch's own allocations made before the limit
used = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), resource.RLIM_INFINITY))
np.save(sys.argv[2], load_audio(sys.argv[1]).numpy())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the process's size from /proc")
def test_a_sample_rate_coprime_to_24khz_is_resampled_in_little_memory(tmp_path):
    # 96001 Hz shares no factor with 24000: the exact resampling kernel alone would take 9 GB
    rate, t = 96001, np.arange(2 * 96001) / 96001
    sf.write(tmp_path / "odd.wav", 0.5 * np.sin(2 * np.pi * 440 * t), rate, subtype="FLOAT")
    sf.write(tmp_path / "odd_small.wav", music(0.5, 44100), 44100)
    result = subprocess.run([sys.executable, "-c", RESAMPLE_IN_1_GB, tmp_path / "odd.wav", tmp_path / "out.npy"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    waveform = np.load(tmp_path / "out.npy")
    assert abs(len(waveform) - 48000) <= 1
    # the tone, 10 ppm slower (0.02 ms over 2 s): within 0.03 of the exact one everywhere
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(waveform)) / 24000)
    assert np.abs(waveform - expected)[100:-100].max() < 0.03
    blocks = list(iter_audio_blocks(str(tmp_path / "odd.wav"), 24000, block_seconds=0.3))
    assert len(blocks) > 5 and torch.allclose(torch.cat(blocks), torch.from_numpy(waveform), atol=1e-5)


def test_audio_errors_are_user_errors_with_a_reason(tmp_path):
    with pytest.raises(AudioError, match="cannot read file") as error:
        load_audio(str(tmp_path / "missing.wav"))
    assert isinstance(error.value, UserError) and error.value.path.endswith("missing.wav")


def test_find_audio_files_is_recursive_sorted_and_case_insensitive(tmp_path):
    for name in ["b.WAV", "a/z.flac", "a/b/deep.Ogg", "c.mp3", "notes.txt", ".hidden.wav", "a/.cache/x.wav"]:
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        open(tmp_path / name, "w").close()
    found = [os.path.relpath(p, tmp_path) for p in find_audio_files(str(tmp_path))]
    assert found == ["a/b/deep.Ogg", "a/z.flac", "b.WAV", "c.mp3"]


def test_save_wav(tmp_path):
    save_wav(tmp_path / "loud.wav", torch.tensor([0.5, -2.0, 2.0]), 24000)
    data, rate = sf.read(tmp_path / "loud.wav", dtype="float32")
    assert rate == 24000 and sf.info(tmp_path / "loud.wav").subtype == "PCM_16"
    assert np.allclose(data, [0.5, -1.0, 1.0], atol=1e-4)  # clipped, not wrapped around
    stereo = torch.rand(2, 100) - 0.5
    save_wav(tmp_path / "float.wav", stereo, 48000, subtype="FLOAT")
    data, rate = sf.read(tmp_path / "float.wav", dtype="float32")
    assert rate == 48000 and np.array_equal(data, stereo.numpy().T)
    assert sorted(os.listdir(tmp_path)) == ["float.wav", "loud.wav"]  # no temporary files left


# --- what the cache trusts ----------------------------------------------------------------------

def test_a_file_changed_while_it_is_prepared_never_poisons_the_cache(tmp_path, capsys, monkeypatch):
    """b.flac is replaced by other music once it has been hashed, and put back as it was once read:
    its codes are not cached under its bytes' key (they would be another file's codes for good)."""
    corpus = make_corpus(tmp_path / "wavs")
    run(capsys, corpus, tmp_path / "clean")
    target = os.path.join(corpus, "b.flac")
    original, other = open(target, "rb").read(), tmp_path / "other.flac"
    sf.write(other, music(1.5, 48000, 1, 3), 48000)
    real_blocks = prepare.iter_audio_blocks

    def blocks_of_a_changing_file(path, sample_rate):
        if path == target:
            shutil.copyfile(other, target)              # overwritten in place after it was hashed...
            yield from real_blocks(path, sample_rate)
            with open(target, "wb") as f:               # ...and restored once it was read
                f.write(original)
        else:
            yield from real_blocks(path, sample_rate)
    monkeypatch.setattr(prepare, "iter_audio_blocks", blocks_of_a_changing_file)
    out = run(capsys, corpus, tmp_path / "tokens")
    assert "b.flac: changed while it was being prepared: left out of this run" in out
    assert "prepared 2 file(s)" in out
    monkeypatch.setattr(prepare, "iter_audio_blocks", real_blocks)
    out = run(capsys, corpus, tmp_path / "tokens")
    assert "2 to encode, 2 cached" in out   # b.flac, and broken.wav is tried again
    assert read_bytes(tmp_path / "tokens") == read_bytes(tmp_path / "clean")


@pytest.mark.parametrize("damage, reason", [
    (lambda codes, path: np.save(path, np.where(codes == codes[0, 0], 2000, codes).astype(np.uint16)),
     r"code 2000 outside the codebook \(0..1023\)"),
    (lambda codes, path: open(path, "wb").close(), "not a token array"),
    (lambda codes, path: open(path, "r+b").truncate(100), "not a token array"),
    (lambda codes, path: np.save(path, codes[:4]), r"uint16 \(4, \d+\), not uint16 \(8, frames\)"),
    (lambda codes, path: np.save(path, codes.astype(np.int64)), r"int64 \(8, \d+\), not uint16"),
    (lambda codes, path: np.save(path, np.array([{"a": 1}]), allow_pickle=True), "not a token array"),
])
def test_a_damaged_cache_entry_is_encoded_again_with_one_line(tmp_path, capsys, damage, reason):
    corpus = make_corpus(tmp_path / "wavs")
    run(capsys, corpus, tmp_path / "tokens")
    clean = read_bytes(tmp_path / "tokens")
    cache = tmp_path / "tokens" / "cache"
    victim = sorted(cache.iterdir())[0]
    damage(np.load(victim), victim)
    out = run(capsys, corpus, tmp_path / "tokens")
    assert re.search(fr"cache entry {re.escape(str(victim))} is damaged \({reason}.*\): encoding its audio again", out), out
    assert "2 to encode, 2 cached" in out   # the damaged one, and broken.wav is tried again
    assert read_bytes(tmp_path / "tokens") == clean
