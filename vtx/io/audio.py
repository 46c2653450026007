"""Audio for VGGish: PyAV resampling to 16 kHz mono and the reference log-mel front end.

The front end reproduces the TensorFlow VGGish reference (``vggish_input.py`` and
``mel_features.py`` of the AudioSet VGGish release) exactly, in numpy:

* 25 ms periodic Hann window (400 samples), 10 ms hop (160 samples), 512-point FFT magnitude;
* 64 mel bands from 125 to 7500 Hz on the HTK mel scale (``1127 ln(1 + f/700)``), DC bin zeroed;
* ``log(mel + 0.01)``;
* examples of 96 frames x 64 bands with a hop of 96 frames (0.96 s).

:class:`LogMelStream` computes it incrementally, so memory does not grow with the audio length.
"""

from __future__ import annotations

import av
import numpy as np

SAMPLE_RATE = 16000
WINDOW = 400  # 25 ms
HOP = 160  # 10 ms
FFT = 512
MEL_BANDS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_FRAMES = 96  # 0.96 s
EXAMPLE_HOP_FRAMES = 96
EXAMPLE_SECONDS = EXAMPLE_HOP_FRAMES * HOP / SAMPLE_RATE


def hertz_to_mel(hz):
    """HTK mel scale."""
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def periodic_hann(n: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi / n * np.arange(n))


def mel_matrix(n_bands: int = MEL_BANDS, n_bins: int = FFT // 2 + 1,
               sample_rate: int = SAMPLE_RATE, lo: float = MEL_MIN_HZ,
               hi: float = MEL_MAX_HZ) -> np.ndarray:
    """(n_bins, n_bands) triangular weights, as ``spectrogram_to_mel_matrix`` of the reference."""
    bins_mel = hertz_to_mel(np.linspace(0.0, sample_rate / 2.0, n_bins))
    edges = np.linspace(hertz_to_mel(lo), hertz_to_mel(hi), n_bands + 2)
    weights = np.empty((n_bins, n_bands))
    for i in range(n_bands):
        lower, center, upper = edges[i:i + 3]
        lower_slope = (bins_mel - lower) / (center - lower)
        upper_slope = (upper - bins_mel) / (upper - center)
        weights[:, i] = np.maximum(0.0, np.minimum(lower_slope, upper_slope))
    weights[0, :] = 0.0
    return weights


_MEL = mel_matrix()
_WINDOW = periodic_hann(WINDOW)


def log_mel(samples: np.ndarray) -> np.ndarray:
    """(n_frames, 64) log-mel spectrogram of 16 kHz mono samples (reference framing)."""
    samples = np.asarray(samples, dtype=np.float64)
    if len(samples) < WINDOW:
        return np.zeros((0, MEL_BANDS))
    n = 1 + (len(samples) - WINDOW) // HOP
    idx = np.arange(WINDOW)[None, :] + HOP * np.arange(n)[:, None]
    spec = np.abs(np.fft.rfft(samples[idx] * _WINDOW, FFT))
    return np.log(spec @ _MEL + LOG_OFFSET)


def waveform_to_examples(samples: np.ndarray) -> np.ndarray:
    """(n, 96, 64) examples from 16 kHz mono samples, as the reference's ``waveform_to_examples``
    (without its resampling step: resampling to 16 kHz is done by FFmpeg here)."""
    mel = log_mel(samples)
    n = 0 if len(mel) < EXAMPLE_FRAMES else 1 + (len(mel) - EXAMPLE_FRAMES) // EXAMPLE_HOP_FRAMES
    idx = np.arange(EXAMPLE_FRAMES)[None, :] + EXAMPLE_HOP_FRAMES * np.arange(n)[:, None]
    return mel[idx] if n else np.zeros((0, EXAMPLE_FRAMES, MEL_BANDS))


class LogMelStream:
    """Incremental :func:`waveform_to_examples`: push sample chunks, pop finished examples.

    Only the samples of the example being built are kept.
    """

    def __init__(self):
        self._buf = np.zeros(0, dtype=np.float64)
        self._consumed = 0  # samples dropped from the front of _buf
        self.n_examples = 0

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        self._buf = np.concatenate([self._buf, np.asarray(samples, np.float64).ravel()])
        out = []
        span = (EXAMPLE_FRAMES - 1) * HOP + WINDOW  # samples one example needs
        step = EXAMPLE_HOP_FRAMES * HOP
        while len(self._buf) >= span:
            out.append(log_mel(self._buf[:span]))
            self._buf = self._buf[step:]
            self._consumed += step
            self.n_examples += 1
        return out


class AudioResampler:
    """Downmix to mono and resample to 16 kHz with FFmpeg (via PyAV), as float samples."""

    def __init__(self):
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)

    def __call__(self, frame: av.AudioFrame | None) -> np.ndarray:
        chunks = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
