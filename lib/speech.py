"""Speech: espeak-ng synthesis (offline, through the espeakng-loader wheel) and log-mel acoustics.

Used by stage 01 (the simulated stories' words; the auditory voxels' drive), stage 05 (the
acoustic probe's targets), models/pretrain_tiny.py (its corpus and unit targets) and bench/.
"""
import ctypes
import multiprocessing
import os

import numpy as np

from lib.batching import SR  # every story's audio rate, WavLM's
from lib.plumbing import StudyError

# variants whose audio is the same every time: en-us+f2, +f3 and +f5 add noise seeded from the clock
VOICES = ["en-us", "en-us+m3", "en-us+f1", "en-us+m7", "en-us+f4", "en-us+m1"]


def synthesize(job):
    """One word -> float32 audio at 16 kHz, trimmed to the voiced part.

    espeak-ng carries hidden state from one utterance to the next (the same word comes out a few
    samples different the second time), so each word is spoken by a fresh engine in a forked worker:
    that makes the same seed give the same audio.
    """
    word, voice, rate = job
    import espeakng_loader
    lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
    data_dir = os.path.dirname(espeakng_loader.get_data_path())
    rate_in = lib.espeak_Initialize(2, 0, data_dir.encode(), 0)  # 2 = AUDIO_OUTPUT_SYNCHRONOUS
    if rate_in <= 0:
        raise StudyError("espeak-ng failed to initialise; reinstall the espeakng-loader wheel")
    chunks = []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                     ctypes.c_void_p)

    def collect(wav, n, events):
        if n > 0 and wav:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0
    callback = callback_type(collect)
    lib.espeak_SetSynthCallback(callback)
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise StudyError(f"espeak-ng has no voice {voice!r}")
    lib.espeak_SetParameter(1, int(rate), 0)  # 1 = espeakRATE (words per minute)
    text = word.encode() + b"\0"
    lib.espeak_Synth(text, len(text), 0, 1, 0, 0, None, None)
    lib.espeak_Synchronize()
    x = np.concatenate(chunks).astype(np.float32) / 32768.0
    from scipy.signal import resample_poly  # here: only synthesis needs it, and it costs ~0.7 s to import
    x = resample_poly(x, SR, rate_in).astype(np.float32)
    voiced = np.nonzero(np.abs(x) > 0.01)[0]
    return x[voiced[0]:voiced[-1] + 1]


def synthesize_all(words, voices, rate):
    """clips[voice][word]: every word spoken once per voice, each by a fresh engine (see synthesize)."""
    jobs = [(w, v, rate) for v in voices for w in words]
    with multiprocessing.get_context("fork").Pool(2, maxtasksperchild=1) as pool:
        flat = pool.map(synthesize, jobs, chunksize=1)
    return [flat[i * len(words):(i + 1) * len(words)] for i in range(len(voices))]


def log_mel(audio, n_bands=8, hop=160, win=400):
    """Log-mel band energies of 16 kHz audio at 100 Hz (frames x bands, frame-centre times): what
    drives the simulated auditory voxels (stage 01) and the acoustic probe targets (stage 05)."""
    n, sr = 1 + (len(audio) - win) // hop, 16000
    frames = np.lib.stride_tricks.sliding_window_view(audio, win)[::hop][:n] * np.hanning(win)
    power, freqs = np.abs(np.fft.rfft(frames, axis=1)) ** 2, np.fft.rfftfreq(win, 1 / sr)
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    edges = 700 * (10 ** (np.linspace(mel(100), mel(7000), n_bands + 2) / 2595) - 1)
    fb = np.zeros((n_bands, len(freqs)))
    for b in range(n_bands):
        lo, mid, hi = edges[b:b + 3]
        fb[b] = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
    energy = power @ fb.T
    # a 40 dB floor, as a hearing threshold: digital silence between words would otherwise send
    # the log to -inf-ish and dominate the drive with the gap pattern alone
    return np.log(energy + 1e-4 * energy.mean(0)), (np.arange(n) * hop + win / 2) / sr
