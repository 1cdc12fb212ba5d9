"""Post-processing for generated audio: loudness, silence trimming, resampling and encoding.

Everything works on mono float32 numpy arrays in [-1, 1] plus a sample rate. Encoding uses
``soundfile``: its wheel bundles libsndfile (1.2+), which writes Ogg/Opus and PCM WAV with no
system libraries, so the bot needs no ffmpeg. Discord plays Ogg/Opus inline as a voice-like
attachment; WAV is offered for people who want lossless output.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import soundfile as sf
from scipy import ndimage, signal

#: Opus always runs at 48 kHz internally; encoding at 48 kHz avoids a second resampler.
OPUS_SAMPLE_RATE = 48_000
#: Sample rates libsndfile's Opus encoder accepts.
OPUS_RATES = (8_000, 12_000, 16_000, 24_000, 48_000)
#: libsndfile maps its 0..1 compression level linearly onto this bitrate range (mono).
_OPUS_MAX_BPS = 256_000
_OPUS_MIN_BPS = 6_000
DEFAULT_OPUS_BITRATE = 64_000
#: Bitrates tried, best first, when a file has to fit a size limit.
FIT_BITRATES = (64_000, 48_000, 32_000, 24_000, 16_000, 12_000, 8_000)

FORMATS = ("ogg", "wav")
MIME = {"ogg": "audio/ogg", "wav": "audio/wav"}


class AudioError(ValueError):
    """Audio that cannot be processed (empty, wrong shape, undecodable bytes)."""


def as_mono(audio: np.ndarray) -> np.ndarray:
    """A contiguous float32 mono copy-or-view; stereo input is averaged."""
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim == 2:
        # soundfile gives (frames, channels); average so stereo models still fit the mono path.
        x = x.mean(axis=1, dtype=np.float32)
    if x.ndim != 1:
        raise AudioError(f"expected mono audio, got an array of shape {x.shape}")
    return np.ascontiguousarray(x)


def duration_s(audio: np.ndarray, sample_rate: int) -> float:
    """Length in seconds."""
    return len(audio) / float(sample_rate)


def silence(seconds: float, sample_rate: int) -> np.ndarray:
    """Zeros of the given length, for pauses between pieces."""
    return np.zeros(max(0, round(seconds * sample_rate)), dtype=np.float32)


# -- loudness ------------------------------------------------------------------------------


def _biquad_k_weighting(sample_rate: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The two ITU-R BS.1770 K-weighting stages designed for any rate (shelf, then high-pass).

    The standard lists coefficients for 48 kHz only; these are the usual RBJ-style
    designs with the standard's corner frequencies, as pyloudnorm does.
    """
    stages = []
    # High shelf: +4 dB above ~1.5 kHz (head acoustics).
    gain_db, q, fc = 4.0, 1 / math.sqrt(2), 1500.0
    a = 10 ** (gain_db / 40)
    w0 = 2 * math.pi * fc / sample_rate
    alpha = math.sin(w0) / (2 * q)
    cw, sa = math.cos(w0), 2 * math.sqrt(a) * alpha
    b = [
        a * ((a + 1) + (a - 1) * cw + sa),
        -2 * a * ((a - 1) + (a + 1) * cw),
        a * ((a + 1) + (a - 1) * cw - sa),
    ]
    den = [(a + 1) - (a - 1) * cw + sa, 2 * ((a - 1) - (a + 1) * cw), (a + 1) - (a - 1) * cw - sa]
    stages.append((np.array(b) / den[0], np.array(den) / den[0]))
    # High-pass at 38 Hz (RLB weighting): rumble should not count as loudness.
    q, fc = 0.5, 38.0
    w0 = 2 * math.pi * fc / sample_rate
    alpha = math.sin(w0) / (2 * q)
    cw = math.cos(w0)
    b = [(1 + cw) / 2, -(1 + cw), (1 + cw) / 2]
    den = [1 + alpha, -2 * cw, 1 - alpha]
    stages.append((np.array(b) / den[0], np.array(den) / den[0]))
    return stages


def loudness_lufs(audio: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness in LUFS (BS.1770 style: K-weighting, 400 ms blocks, gating).

    Returns ``-inf`` for silence. Clips shorter than one block are measured as one block.
    """
    x = as_mono(audio).astype(np.float64)
    if len(x) == 0:
        return float("-inf")
    for b, a in _biquad_k_weighting(sample_rate):
        x = signal.lfilter(b, a, x)
    block = int(0.4 * sample_rate)
    step = max(1, block // 4)  # 75 % overlap, as the standard says
    if len(x) <= block:
        powers = np.array([np.mean(x * x)])
    else:
        sq = np.concatenate([[0.0], np.cumsum(x * x)])
        starts = np.arange(0, len(x) - block + 1, step)
        powers = (sq[starts + block] - sq[starts]) / block
    with np.errstate(divide="ignore"):
        levels = -0.691 + 10 * np.log10(powers)
    gated = powers[levels > -70.0]  # absolute gate: ignore near-silent blocks
    if len(gated) == 0:
        return float("-inf")
    relative = -0.691 + 10 * math.log10(gated.mean()) - 10.0
    with np.errstate(divide="ignore"):
        keep = gated[-0.691 + 10 * np.log10(gated) > relative]
    power = keep.mean() if len(keep) else gated.mean()
    return -0.691 + 10 * math.log10(power)


def limit_peaks(
    audio: np.ndarray, sample_rate: int, ceiling_db: float = -1.0, window_ms: float = 5.0
) -> np.ndarray:
    """A look-ahead peak limiter: no sample exceeds ``ceiling_db`` dBFS.

    The per-sample gain needed is spread over a few milliseconds (a minimum filter, then a
    moving average over half that span) so loud peaks are turned down smoothly instead of
    clipped. Every averaged value is at most the gain its sample needs, so the ceiling holds.
    """
    x = as_mono(audio)
    if len(x) == 0:
        return x.copy()
    ceiling = 10 ** (ceiling_db / 20)
    peak = np.abs(x)
    if peak.max() <= ceiling:
        return x.copy()
    width = max(1, int(window_ms * sample_rate / 1000))
    need = np.minimum(1.0, ceiling / np.maximum(peak, 1e-12)).astype(np.float32)
    gain = ndimage.minimum_filter1d(need, size=2 * width + 1, mode="nearest")
    gain = ndimage.uniform_filter1d(gain, size=width | 1, mode="nearest")
    out = x * gain
    # Float rounding in the averages can leave a hair above the ceiling.
    return np.clip(out, -ceiling, ceiling).astype(np.float32)


def normalize_loudness(
    audio: np.ndarray,
    sample_rate: int,
    target_lufs: float = -16.0,
    ceiling_db: float = -1.0,
    max_gain_db: float = 30.0,
) -> np.ndarray:
    """Scale to ``target_lufs`` integrated loudness, then limit peaks to ``ceiling_db``.

    -16 LUFS is the common target for spoken audio on the web. Gain is capped at
    ``max_gain_db`` so near-silent output is not blown up into noise; silence is returned as is.
    """
    x = as_mono(audio)
    level = loudness_lufs(x, sample_rate)
    if not math.isfinite(level):
        return x.copy()
    gain_db = min(target_lufs - level, max_gain_db)
    return limit_peaks(x * np.float32(10 ** (gain_db / 20)), sample_rate, ceiling_db)


# -- editing -------------------------------------------------------------------------------


def trim_silence(
    audio: np.ndarray,
    sample_rate: int,
    threshold_db: float = -45.0,
    pad_ms: float = 60.0,
    frame_ms: float = 10.0,
) -> np.ndarray:
    """Cut leading and trailing silence, keeping ``pad_ms`` so onsets are not clipped.

    A frame is silent when its RMS is ``threshold_db`` below the loudest frame (relative, so
    it works before loudness normalisation) or below -70 dBFS. All-silent input comes back
    empty.
    """
    x = as_mono(audio)
    frame = max(1, int(frame_ms * sample_rate / 1000))
    n = len(x) // frame
    if n == 0:
        return x.copy() if np.abs(x).max(initial=0.0) > 10 ** (-70 / 20) else x[:0].copy()
    frames = x[: n * frame].reshape(n, frame).astype(np.float64)
    rms = np.sqrt(np.mean(frames * frames, axis=1))
    loudest = rms.max()
    if loudest <= 0:
        return x[:0].copy()
    floor = max(loudest * 10 ** (threshold_db / 20), 10 ** (-70 / 20))
    voiced = np.flatnonzero(rms > floor)
    if len(voiced) == 0:
        return x[:0].copy()
    pad = int(pad_ms * sample_rate / 1000)
    start = max(0, voiced[0] * frame - pad)
    # The tail beyond whole frames counts as voiced if the last frame was.
    end = len(x) if voiced[-1] == n - 1 else min(len(x), (voiced[-1] + 1) * frame + pad)
    return x[start:end].copy()


def limit_length(
    audio: np.ndarray, sample_rate: int, max_seconds: float, fade_ms: float = 50.0
) -> np.ndarray:
    """Cut to at most ``max_seconds``, fading the end out so the cut does not click."""
    x = as_mono(audio)
    limit = max(0, int(max_seconds * sample_rate))
    if len(x) <= limit:
        return x.copy()
    out = x[:limit].copy()
    fade = min(len(out), int(fade_ms * sample_rate / 1000))
    if fade > 0:
        out[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    return out


def resample(audio: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling (``scipy.signal.resample_poly``) between any two integer rates."""
    x = as_mono(audio)
    if sample_rate == target_rate or len(x) == 0:
        return x.copy()
    ratio = Fraction(int(target_rate), int(sample_rate))
    y = signal.resample_poly(x, ratio.numerator, ratio.denominator)
    return y.astype(np.float32)


# -- encoding ------------------------------------------------------------------------------


def _opus_level(bitrate: int) -> float:
    """libsndfile's compression level (0 = best) for a target bitrate in bit/s."""
    level = (_OPUS_MAX_BPS - bitrate) / (_OPUS_MAX_BPS - _OPUS_MIN_BPS)
    return min(1.0, max(0.0, level))


def encode_ogg(audio: np.ndarray, sample_rate: int, bitrate: int = DEFAULT_OPUS_BITRATE) -> bytes:
    """Ogg/Opus bytes at 48 kHz (input at other rates is resampled first); VBR near ``bitrate``."""
    x = np.clip(resample(audio, sample_rate, OPUS_SAMPLE_RATE), -1.0, 1.0)
    if len(x) == 0:
        raise AudioError("no audio to encode")
    buf = io.BytesIO()
    sf.write(
        buf,
        x,
        OPUS_SAMPLE_RATE,
        format="OGG",
        subtype="OPUS",
        compression_level=_opus_level(bitrate),
    )
    return buf.getvalue()


def encode_wav(audio: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM WAV bytes at the input's own rate.

    Samples are quantised here with the 1/32768 step that ``decode`` (libsndfile) divides by,
    so decode(encode_wav(x)) returns x exactly when x is on the PCM16 grid. libsndfile's own
    float writer scales by 32767, which would shift every sample slightly.
    """
    pcm = np.clip(np.round(as_mono(audio) * 32768.0), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, int(sample_rate), format="WAV", subtype="PCM_16")
    return buf.getvalue()


def encode(
    audio: np.ndarray, sample_rate: int, fmt: str = "ogg", bitrate: int = DEFAULT_OPUS_BITRATE
) -> bytes:
    """Encode as ``fmt`` ("ogg" for Ogg/Opus or "wav" for PCM16)."""
    if fmt == "ogg":
        return encode_ogg(audio, sample_rate, bitrate)
    if fmt == "wav":
        return encode_wav(audio, sample_rate)
    raise AudioError(f"unknown audio format {fmt!r}; use one of: {', '.join(FORMATS)}")


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Decode WAV/Ogg (Opus or Vorbis)/FLAC bytes to (mono float32, sample rate)."""
    try:
        x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(f"could not decode audio: {exc}") from exc
    return as_mono(x), int(sr)


# -- fitting a size limit ------------------------------------------------------------------


@dataclass
class Fitted:
    """An encoded file that fits a byte limit, and how it was made to fit."""

    data: bytes
    fmt: str
    mime: str
    bitrate: int | None  # None for WAV
    seconds: float  # length of the audio in the file
    trimmed: bool
    note: str  # empty when nothing was given up; else one line for the user


def _format_seconds(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _trim_to(audio: np.ndarray, sample_rate: int, fraction: float) -> np.ndarray:
    return limit_length(audio, sample_rate, duration_s(audio, sample_rate) * fraction)


def fit_to_size(
    audio: np.ndarray,
    sample_rate: int,
    max_bytes: int,
    fmt: str = "ogg",
    bitrates: tuple[int, ...] = FIT_BITRATES,
) -> Fitted:
    """Encode so the file is at most ``max_bytes`` (e.g. Discord's attachment limit).

    Ogg: try the bitrates in order, best first; if even the lowest is too big, trim the
    audio (with a fade) and say so in ``note``. WAV has no bitrate to give, so it is trimmed.
    """
    x = as_mono(audio)
    if max_bytes <= 0:
        raise AudioError("the size limit must be positive")
    if fmt not in FORMATS:
        raise AudioError(f"unknown audio format {fmt!r}; use one of: {', '.join(FORMATS)}")
    total = duration_s(x, sample_rate)
    rate: int | None = None
    if fmt == "wav":
        data = encode_wav(x, sample_rate)
        if len(data) <= max_bytes:
            return Fitted(data, fmt, MIME[fmt], None, total, False, "")
        full_size = float(len(data))
    else:
        rate = bitrates[0]
        data = encode_ogg(x, sample_rate, rate)
        if len(data) <= max_bytes:
            return Fitted(data, fmt, MIME[fmt], rate, total, False, "")
        # Opus VBR size is close to proportional to the bitrate, so skip the bitrates that
        # cannot fit by that estimate instead of encoding each (an encode runs ~30x realtime).
        per_bit = len(data) / rate
        full_size = per_bit * bitrates[-1]
        for rate in bitrates[1:]:
            if per_bit * rate > max_bytes * 0.97:
                continue
            data = encode_ogg(x, sample_rate, rate)
            if len(data) <= max_bytes:
                note = f"Encoded at {rate // 1000} kbit/s to fit the {_size(max_bytes)} limit."
                return Fitted(data, fmt, MIME[fmt], rate, total, False, note)
            full_size = float(len(data))
        rate = bitrates[-1]
    # Trim: start from the proportional estimate, then shrink until it fits. Container
    # overhead makes size slightly sub-linear in length, so a few tries at most.
    fraction = min(1.0, max_bytes / full_size * 0.97)
    for _ in range(30):
        cut = _trim_to(x, sample_rate, fraction)
        if len(cut) == 0:
            break
        data = encode_ogg(cut, sample_rate, rate) if rate else encode_wav(cut, sample_rate)
        if len(data) <= max_bytes:
            kept = duration_s(cut, sample_rate)
            note = (
                f"Trimmed to {_format_seconds(kept)} of {_format_seconds(total)} "
                f"to fit the {_size(max_bytes)} limit."
            )
            return Fitted(data, fmt, MIME[fmt], rate, kept, True, note)
        fraction *= 0.9
    raise AudioError(f"audio cannot fit in {_size(max_bytes)}")


def _size(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.0f} KiB"
    return f"{n} bytes"
