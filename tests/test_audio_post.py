"""Post-processing: loudness, trimming, resampling, encoding round-trips and size fitting."""

from __future__ import annotations

import numpy as np
import pytest

from generators import audio_post as ap

SR = 24_000


def tone(seconds: float, freq: float = 440.0, amp: float = 0.3, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds: float, amp: float = 0.1, sr: int = SR, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (amp * rng.standard_normal(int(seconds * sr))).astype(np.float32)


def test_loudness_of_full_scale_sine_matches_bs1770() -> None:
    # BS.1770: a 0 dBFS 997 Hz sine at 48 kHz reads -3.01 LUFS.
    assert ap.loudness_lufs(tone(3, 997, 1.0, 48_000), 48_000) == pytest.approx(-3.01, abs=0.1)
    assert ap.loudness_lufs(np.zeros(SR, np.float32), SR) == float("-inf")


def test_normalize_hits_target_and_respects_ceiling() -> None:
    quiet = tone(2, amp=0.01)
    out = ap.normalize_loudness(quiet, SR, target_lufs=-16.0, ceiling_db=-1.0)
    assert ap.loudness_lufs(out, SR) == pytest.approx(-16.0, abs=0.2)
    # Spiky input: the gain needed for the target would clip the spikes; the limiter holds them.
    spiky = noise(2, 0.02)
    spiky[::4000] = 0.9
    out = ap.normalize_loudness(spiky, SR, target_lufs=-10.0, ceiling_db=-1.0)
    assert np.abs(out).max() <= 10 ** (-1 / 20) + 1e-6
    assert out.dtype == np.float32
    silent = np.zeros(SR, np.float32)
    assert np.array_equal(ap.normalize_loudness(silent, SR), silent)


def test_gating_ignores_silence() -> None:
    # Gated loudness of speech-with-pauses should be close to that of the speech alone.
    body = noise(5)
    padded = np.concatenate([np.zeros(2 * SR, np.float32), body, np.zeros(2 * SR, np.float32)])
    assert ap.loudness_lufs(padded, SR) == pytest.approx(ap.loudness_lufs(body, SR), abs=1.0)


def test_trim_silence_keeps_padding() -> None:
    body = tone(1)
    x = np.concatenate([np.zeros(SR, np.float32), body, np.zeros(SR, np.float32)])
    out = ap.trim_silence(x, SR, pad_ms=50)
    assert SR <= len(out) <= SR + 2 * int(0.06 * SR)
    assert len(ap.trim_silence(np.zeros(SR, np.float32), SR)) == 0
    assert len(ap.trim_silence(body, SR)) == len(body)


def test_limit_length_fades_out() -> None:
    out = ap.limit_length(tone(3), SR, 1.0)
    assert len(out) == SR
    assert abs(out[-1]) < 1e-6
    assert len(ap.limit_length(tone(0.5), SR, 1.0)) == SR // 2


def test_resample_preserves_duration_and_pitch() -> None:
    x = tone(1, 1000)
    y = ap.resample(x, SR, 48_000)
    assert len(y) == 48_000
    spectrum = np.abs(np.fft.rfft(y))
    assert np.argmax(spectrum) * 48_000 / len(y) == pytest.approx(1000, abs=2)
    assert len(ap.resample(x, SR, 22_050)) == 22_050


def test_wav_round_trip_is_exact_for_pcm16() -> None:
    grid = np.clip(np.round(noise(0.5, 0.3) * 32768), -32768, 32767)
    x = (grid / 32768).astype(np.float32)  # on the PCM16 grid, in range
    data = ap.encode_wav(x, SR)
    assert data[:4] == b"RIFF"
    assert len(data) == 44 + 2 * len(x)
    y, sr = ap.decode(data)
    assert sr == SR
    np.testing.assert_array_equal(y, x)
    # Off-grid input is within half a step.
    z = noise(0.1, 0.2)
    np.testing.assert_allclose(ap.decode(ap.encode_wav(z, SR))[0], z, atol=0.5 / 32768 + 1e-7)


def test_ogg_opus_round_trip_is_close() -> None:
    x = tone(2.0, 440, 0.3)
    data = ap.encode_ogg(x, SR)
    assert data[:4] == b"OggS" and b"OpusHead" in data[:100]
    y, sr = ap.decode(data)
    assert sr == ap.OPUS_SAMPLE_RATE
    assert len(y) / sr == pytest.approx(2.0, abs=0.03)
    # Lossy, but the tone's level and pitch survive.
    rms_in, rms_out = np.sqrt(np.mean(x**2)), np.sqrt(np.mean(y**2))
    assert rms_out == pytest.approx(rms_in, rel=0.1)
    assert np.argmax(np.abs(np.fft.rfft(y))) * sr / len(y) == pytest.approx(440, abs=2)


def test_opus_bitrate_controls_size() -> None:
    x = noise(5, 0.2)
    big = ap.encode_ogg(x, SR, bitrate=128_000)
    small = ap.encode_ogg(x, SR, bitrate=16_000)
    assert len(small) < len(big) / 3
    # libsndfile's level mapping: ~16 kbit/s for 5 s is ~10 kB.
    assert len(small) == pytest.approx(16_000 / 8 * 5, rel=0.35)


def test_encode_rejects_unknown_format_and_empty() -> None:
    with pytest.raises(ap.AudioError, match="unknown audio format"):
        ap.encode(tone(0.1), SR, "mp3")
    with pytest.raises(ap.AudioError):
        ap.encode_ogg(np.zeros(0, np.float32), SR)
    with pytest.raises(ap.AudioError, match="could not decode"):
        ap.decode(b"not audio at all")


def test_fit_to_size_lowers_bitrate_first() -> None:
    x = noise(8, 0.2)
    default = ap.encode_ogg(x, SR)
    fitted = ap.fit_to_size(x, SR, len(default) // 2)
    assert len(fitted.data) <= len(default) // 2
    assert not fitted.trimmed
    assert fitted.bitrate is not None and fitted.bitrate < ap.DEFAULT_OPUS_BITRATE
    assert "kbit/s" in fitted.note
    untouched = ap.fit_to_size(x, SR, len(default) * 2)
    assert untouched.note == "" and untouched.bitrate == ap.DEFAULT_OPUS_BITRATE


def test_fit_to_size_trims_with_a_note() -> None:
    x = noise(10, 0.2)
    fitted = ap.fit_to_size(x, SR, 6_000)
    assert len(fitted.data) <= 6_000
    assert fitted.trimmed and "Trimmed" in fitted.note
    assert fitted.bitrate == ap.FIT_BITRATES[-1]
    y, sr = ap.decode(fitted.data)
    assert 1.0 < len(y) / sr < 10
    assert len(y) / sr == pytest.approx(fitted.seconds, abs=0.05)


def test_fit_to_size_wav_trims() -> None:
    x = tone(3)
    fitted = ap.fit_to_size(x, SR, 50_000, fmt="wav")
    assert len(fitted.data) <= 50_000 and fitted.trimmed and fitted.bitrate is None
    assert ap.decode(fitted.data)[1] == SR


def test_stereo_input_is_averaged() -> None:
    stereo = np.stack([tone(0.1), tone(0.1)], axis=1)
    assert ap.as_mono(stereo).shape == (int(0.1 * SR),)
    with pytest.raises(ap.AudioError):
        ap.as_mono(np.zeros((2, 2, 2)))
