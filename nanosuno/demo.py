"""
A demo corpus, synthesised: so that `python prepare.py` with no music of one's own still gives the
pipeline something musical to learn. 12 pieces of a minute each, every one in its own key, mode and
tempo: a melody (a random walk on the scale), sustained chords (a four-chord progression per
piece), a bass line on the chord roots, and drums (kick, snare, hi-hat). Seeded, so every machine
gets the same corpus; plain numpy, so it takes seconds.
"""
import os

import numpy as np

from nanosuno.audio import save_wav

DEMO_FILES = 12
DEMO_SECONDS = 60.0
SAMPLE_RATE = 24000
NOTE_NAMES = ["C", "Cs", "D", "Eb", "E", "F", "Fs", "G", "Ab", "A", "Bb", "B"]
MAJOR, MINOR = [0, 2, 4, 5, 7, 9, 11], [0, 2, 3, 5, 7, 8, 10]
PROGRESSIONS = [[0, 4, 5, 3], [0, 3, 4, 0], [5, 3, 0, 4], [0, 5, 3, 4]]  # scale degrees of chord roots
TEMPI = [84, 96, 108, 120, 132, 144]


def make_demo_corpus(folder, n_files=DEMO_FILES, seconds=DEMO_SECONDS, sample_rate=SAMPLE_RATE):
    """Write the demo pieces into folder as 16-bit WAV; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for index in range(n_files):
        tonic, mode, bpm = _piece_style(index)
        name = f"demo_{index:02d}_{NOTE_NAMES[tonic % 12]}_{'major' if mode is MAJOR else 'minor'}_{bpm}bpm.wav"
        paths.append(os.path.join(folder, name))
        save_wav(paths[-1], synth_piece(index, seconds, sample_rate), sample_rate)
    return paths


def _piece_style(index):
    tonic = 45 + (index * 7) % 12          # MIDI note, walking the circle of fifths: A2 .. G#3
    mode = MAJOR if index % 2 == 0 else MINOR
    return tonic, mode, TEMPI[index % len(TEMPI)]


def synth_piece(index, seconds=DEMO_SECONDS, sample_rate=SAMPLE_RATE):
    """One piece as float32 mono audio in [-1, 1]."""
    rng = np.random.default_rng(index)
    tonic, mode, bpm = _piece_style(index)
    progression = PROGRESSIONS[index % len(PROGRESSIONS)]
    beat = 60.0 / bpm
    bars = int(seconds / (4 * beat)) + 1
    audio = np.zeros(int((bars * 4 + 1) * beat * sample_rate), dtype=np.float64)  # room for the last notes

    def pitch(degree, octave=0):  # scale degree (any integer) -> frequency in Hz
        octave += degree // 7
        midi = tonic + 12 * octave + mode[degree % 7]
        return 440.0 * 2 ** ((midi - 69) / 12)

    def note(start, freq, length, gain, harmonics=(1.0, 0.5, 0.25), decay=3.0):
        n = int(length * sample_rate)
        t = np.arange(n) / sample_rate
        wave = sum(a * np.sin(2 * np.pi * freq * (h + 1) * t) for h, a in enumerate(harmonics))
        envelope = np.minimum(t / 0.01, 1.0) * np.exp(-decay * t / length)
        begin = int(start * sample_rate)
        audio[begin:begin + n] += gain * wave * envelope

    def drum(start, length, gain, freq=None):  # freq: a pitched thump (kick), None: noise (snare, hi-hat)
        n = int(length * sample_rate)
        t = np.arange(n) / sample_rate
        if freq is None:
            sound = rng.standard_normal(n)
        else:
            sound = np.sin(2 * np.pi * freq * t * (1 - t / (2 * length)))  # the pitch falls
        begin = int(start * sample_rate)
        audio[begin:begin + n] += gain * sound * np.exp(-6 * t / length)

    melody_degree = 7
    for bar in range(bars):
        start = bar * 4 * beat
        root = progression[bar % len(progression)]
        for third in (0, 2, 4):  # the chord: a soft pad over the whole bar
            note(start, pitch(root + third, 0), 4 * beat, 0.06, harmonics=(1.0, 0.3), decay=1.0)
        for b in range(4):
            note(start + b * beat, pitch(root, -1), beat, 0.16, harmonics=(1.0, 0.6, 0.3, 0.2))
            drum(start + b * beat, 0.25, 0.35 if b % 2 == 0 else 0.0, freq=60)   # kick on 1 and 3
            drum(start + b * beat, 0.18, 0.0 if b % 2 == 0 else 0.12)            # snare on 2 and 4
            drum(start + (b + 0.5) * beat, 0.05, 0.04)                            # hi-hat off-beat
        position = 0.0
        while position < 4:  # melody: eighths and quarters, a random walk that stays near the chord
            length = rng.choice([0.5, 0.5, 1.0])
            melody_degree = int(np.clip(melody_degree + rng.integers(-2, 3), 3, 12))
            if rng.random() > 0.1:  # a few rests
                note(start + position * beat, pitch(melody_degree, 1), length * beat, 0.1)
            position += length
    audio = audio[:int(seconds * sample_rate)]
    return (0.9 * audio / max(np.abs(audio).max(), 1e-9)).astype(np.float32)
