"""The listening pages, static HTML beside the audio they play: train.py's progress page (a sample
at evaluations, newest first), sample.py's page of a run's samples and its index of runs. Each
page is written whole (atomic_write_bytes), so a browser never sees half of one."""
import html
import os
import time

from nanosuno.common import atomic_write_bytes


def write_page(path, title, heading, body):
    """A page: its title, a heading and the body's HTML below it."""
    page = (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{title}</title></head>\n'
            f'<body style="font-family:sans-serif">\n<h1>{heading}</h1>\n{body}</body></html>\n')
    atomic_write_bytes(path, page.encode())


def write_progress_page(folder, out_dir, seconds, seed, warning=""):
    """folder/index.html: every progress sample in the folder (iter_NNNNNN.wav and .png), newest first,
    below the codec's warning if it has one (codec.untrained_warning)."""
    names = sorted((f[:-4] for f in os.listdir(folder) if f.startswith("iter_") and f.endswith(".wav")), reverse=True)
    items = "".join(f'<h2>iteration {int(n[5:])}</h2>\n<audio controls preload="none" src="{n}.wav"></audio><br>\n'
                    f'<img src="{n}.png" alt="spectrogram at iteration {int(n[5:])}">\n' for n in names)
    warning = f'<p style="color:#b00"><b>{html.escape(warning)}</b></p>\n' if warning else ""
    write_page(os.path.join(folder, "index.html"), "nanosuno: training progress",
               f"training progress: {html.escape(out_dir)}",
               f"{warning}<p>{seconds:g} s from scratch at evaluations, seed {seed}, temperature 1, top_k 250</p>\n"
               f"{items}")


def write_sample_page(path, names, labels, settings, warning, loop=False, reference=None):
    """A run's page: the settings used, what the codec makes of a val excerpt (reference), then each
    sample's label, player (playing on repeat, for loops) and spectrogram."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in settings.items())
    items = "".join(f'<h2>{name}</h2>\n<p>{html.escape(label)}</p>\n'
                    f'<audio controls{" loop" if loop else ""} preload="none" src="{name}.wav"></audio>'
                    f'{" (a loop: it plays repeated)" if loop else ""}<br>\n'
                    f'<img src="{name}.png" alt="spectrogram of {name}">\n' for name, label in zip(names, labels))
    warn = f'<p style="color:#b00"><b>{html.escape(warning)}</b></p>\n' if warning else ""
    if reference:
        items = (f'<h2>your music through the codec</h2>\n<p>the start of a val file, encoded and decoded: what the '
                 f'codec can make of real music (the samples cannot sound better than this)</p>\n'
                 f'<audio controls preload="none" src="{reference}.wav"></audio><br>\n'
                 f'<img src="{reference}.png" alt="spectrogram of the val excerpt">\n') + items
    write_page(path, "nanosuno samples", "nanosuno samples", f"{warn}<table>{rows}</table>\n{items}")


def write_runs_page(sample_dir):
    """sample_dir/index.html: a link to each run's page, newest first."""
    runs = sorted((e.name for e in os.scandir(sample_dir) if e.name.isdigit() and e.is_dir()), key=int, reverse=True)
    items = "".join(f'<li><a href="{run}/index.html">run {run}</a>: '
                    f'{len([f for f in os.listdir(os.path.join(sample_dir, run)) if f.endswith(".wav")])} sample(s), '
                    f'{time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(os.path.join(sample_dir, run))))}'
                    f'</li>\n' for run in runs)
    write_page(os.path.join(sample_dir, "index.html"), "nanosuno sample runs", "nanosuno sample runs",
               f"<ul>\n{items}</ul>\n")
