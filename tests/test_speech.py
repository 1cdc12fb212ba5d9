"""The embedded voice (hibari-tts): real synthesis, sentence splitting, cancel and input checks."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from generators import audio_post
from generators.base import Cancelled, GeneratorError, Request
from generators.speech import (
    DEFAULT_VOICE,
    SAMPLE_RATE,
    SpeechGenerator,
    available_voices,
    has_speakable,
    split_text,
)

pytest.importorskip("hibari")


@pytest.fixture(scope="module")
def speech() -> SpeechGenerator:
    generator = SpeechGenerator()
    generator.load()
    return generator


def run(generator: SpeechGenerator, text: str, **params: object) -> tuple[Request, object]:
    request = Request(job_id=1, prompt=text, params=generator.check(text, params), seed=0)
    return request, generator.generate([request])[0]


# -- voices and checks (no model needed) ----------------------------------------------------


def test_only_voices_on_disk_are_offered(tmp_path, monkeypatch) -> None:
    # An empty cache: only the voice bundled in the wheel is there, and nothing is downloaded.
    monkeypatch.setenv("HIBARI_HOME", str(tmp_path))
    voices = available_voices()
    assert list(voices) == [DEFAULT_VOICE]
    assert voices[DEFAULT_VOICE].bundled and voices[DEFAULT_VOICE].path.is_file()
    # A voice file dropped into voices_dir is picked up by its registry file name.
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "bf_emma.int8.onnx").write_bytes(b"x")
    assert set(available_voices(tmp_path / "extra")) == {"heart", "emma"}


def test_unknown_voice_names_the_available_ones(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HIBARI_HOME", str(tmp_path))
    generator = SpeechGenerator()
    with pytest.raises(GeneratorError, match=r"available voices: heart\.$"):
        generator.check("Hello.", {"voice": "fenrir"})  # in hibari's registry, not on disk
    with pytest.raises(GeneratorError, match="Unknown voice 'nobody'"):
        generator.check("Hello.", {"voice": "nobody"})


@pytest.mark.parametrize(
    ("text", "params", "message"),
    [
        ("", {}, "empty"),
        ("   \n ", {}, "empty"),
        ("x" * 1001, {}, "1,001 characters long; the limit is 1,000"),
        ("😀😀 🎉!!! ...", {}, "no letters or digits"),
        ("日本語のテキスト", {}, "no letters or digits"),
        ("Hello.", {"speed": 3}, "between 0.5 and 2.0"),
        ("Hello.", {"speed": "fast"}, "must be a number"),
        ("Hello.", {"speed": float("nan")}, "between"),
        ("Hello.", {"format": "mp3"}, "Unknown format 'mp3'"),
        ("Hello.", {"pitch": 2}, "Unknown option"),
    ],
)
def test_bad_input_is_a_one_line_error(text: str, params: dict, message: str) -> None:
    with pytest.raises(GeneratorError, match=message) as info:
        SpeechGenerator().check(text, params)
    assert "\n" not in str(info.value)


def test_check_normalises_params_and_respects_max_chars() -> None:
    generator = SpeechGenerator(max_chars=20)
    assert generator.check(" Hi. ", {"voice": "HEART", "speed": "1.5", "format": "WAV"}) == {
        "voice": "heart",
        "speed": 1.5,
        "format": "wav",
    }
    assert generator.check("Hi.", {}) == {"voice": "heart", "speed": 1.0, "format": "ogg"}
    with pytest.raises(GeneratorError, match="limit is 20"):
        generator.check("This is more than twenty.", {})
    assert not generator.loaded  # check() never loads the model


def test_speakable() -> None:
    assert has_speakable("Café") and has_speakable("42") and has_speakable("éé")
    assert not has_speakable("?!… — 😀 ♪ 你好")


def test_split_text_at_sentences_and_paragraphs() -> None:
    pieces = split_text("Dr. Smith went home. Did he?\nYes! He did.\n\n😀 🎉")
    assert [p.text for p in pieces] == ["Dr. Smith went home.", "Did he?", "Yes!", "He did."]
    assert [p.new_paragraph for p in pieces] == [False, False, True, False]


def test_split_text_cuts_long_sentences() -> None:
    long = ", ".join(f"clause number {i} goes here" for i in range(40)) + "."
    pieces = split_text(long, max_chars=120)
    assert len(pieces) > 5
    assert all(len(p.text) <= 120 for p in pieces)
    assert " ".join(p.text for p in pieces).split() == long.split()
    words = split_text("word " * 200, max_chars=100)
    assert all(len(p.text) <= 100 for p in words)


# -- synthesis -------------------------------------------------------------------------------


@pytest.mark.slow
def test_ogg_decodes_at_48k_and_is_speech(speech: SpeechGenerator) -> None:
    _, result = run(speech, "Hello there. This is the embedded voice speaking.")
    (output,) = result.outputs
    assert output.mime == "audio/ogg" and output.filename.endswith(".ogg")
    audio, rate = audio_post.decode(output.data)
    assert rate == 48_000 == result.metadata["sample_rate"]
    assert 1.5 < len(audio) / rate < 6.0
    assert np.sqrt(np.mean(audio**2)) > 0.02  # not silence
    assert audio_post.loudness_lufs(audio, rate) == pytest.approx(-16.0, abs=1.5)
    assert result.metadata["voice"] == "heart" and result.metadata["pieces"] == 2


@pytest.mark.slow
def test_length_grows_with_text(speech: SpeechGenerator) -> None:
    short = run(speech, "Hello.")[1].metadata["duration_s"]
    medium = run(speech, "Hello. How are you doing today, my friend?")[1].metadata["duration_s"]
    long = run(speech, "Hello. How are you doing today, my friend? " * 4)[1].metadata["duration_s"]
    assert short < medium < long
    assert long > 3 * medium * 0.8


@pytest.mark.slow
def test_speed_changes_length(speech: SpeechGenerator) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    slow = run(speech, text, speed=0.7)[1].metadata["duration_s"]
    fast = run(speech, text, speed=1.6)[1].metadata["duration_s"]
    assert fast < slow * 0.7


@pytest.mark.slow
def test_wav_output_is_24k_pcm16(speech: SpeechGenerator) -> None:
    _, result = run(speech, "Lossless, please.", format="wav")
    (output,) = result.outputs
    assert output.mime == "audio/wav" and output.data[:4] == b"RIFF"
    audio, rate = audio_post.decode(output.data)
    assert rate == SAMPLE_RATE and len(audio) > SAMPLE_RATE // 2


@pytest.mark.slow
def test_same_seed_same_audio(speech: SpeechGenerator) -> None:
    a = speech.synthesize("Same seed, same sound.", seed=7)
    b = speech.synthesize("Same seed, same sound.", seed=7)
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_progress_per_piece(speech: SpeechGenerator) -> None:
    events: list[tuple[float, str]] = []
    text = "One. Two. Three. Four."
    request = Request(
        job_id=2,
        prompt=text,
        params=speech.check(text, {}),
        on_progress=lambda fraction, note: events.append((fraction, note)),
    )
    speech.generate([request])
    assert [f for f, _ in events] == [0.25, 0.5, 0.75, 1.0]
    assert events[-1][1] == "piece 4/4"


@pytest.mark.slow
def test_cancel_between_pieces(speech: SpeechGenerator) -> None:
    cancel = threading.Event()
    events: list[float] = []

    def progress(fraction: float, note: str) -> None:
        events.append(fraction)
        if len(events) == 2:
            cancel.set()  # as if the user pressed cancel while piece 2 was being made

    text = "One. Two. Three. Four. Five."
    request = Request(
        job_id=3,
        prompt=text,
        params=speech.check(text, {}),
        cancel_event=cancel,
        on_progress=progress,
    )
    with pytest.raises(Cancelled):
        speech.generate([request])
    assert events == [0.2, 0.4]  # stopped before piece 3


@pytest.mark.slow
def test_symbols_only_pieces_are_skipped(speech: SpeechGenerator) -> None:
    _, result = run(speech, "Hello! 😀😀😀 !!! ... Goodbye.")
    assert result.metadata["duration_s"] > 0.5


def test_unload_frees_and_reload_works() -> None:
    generator = SpeechGenerator()
    assert generator.memory_bytes() == 0
    generator.load()
    assert generator.loaded and generator.memory_bytes() > 0
    generator.unload()
    assert not generator.loaded
    assert len(generator.synthesize("Back again.")) > SAMPLE_RATE // 4


def test_seed_param_is_validated_and_kept() -> None:
    generator = SpeechGenerator()
    assert generator.check("Hi.", {"seed": 42})["seed"] == 42
    assert generator.check("Hi.", {"seed": "7"})["seed"] == 7
    assert "seed" not in generator.check("Hi.", {"seed": None})
    for bad in (-1, 1.5, "abc", True):
        with pytest.raises(GeneratorError, match=r"[Ss]eed"):
            generator.check("Hi.", {"seed": bad})


@pytest.mark.slow
def test_seed_from_params_reproduces(speech: SpeechGenerator) -> None:
    # The queue passes params["seed"] as Request.seed; a direct caller may only set params.
    text = "Seeded speech."
    params = speech.check(text, {"seed": 3, "format": "wav"})
    first = speech.generate([Request(job_id=1, prompt=text, params=params)])[0]
    second = speech.generate([Request(job_id=2, prompt=text, params=params, seed=3)])[0]
    assert first.outputs[0].data == second.outputs[0].data
