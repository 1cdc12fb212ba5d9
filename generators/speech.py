"""The embedded voice: English text-to-speech with hibari-tts (ONNX, Apache-2.0, 24 kHz).

hibari ships one voice ("heart") inside its wheel; its other voices are downloaded on first use,
which this bot must never do (it runs offline). So voices are offered only when their model file
is already on disk: the bundled one, files in hibari's cache directory (``HIBARI_HOME`` or the
user cache), or files in a ``voices_dir`` given to the generator.

Text is split into sentences (long ones at clauses, then words), each piece is synthesized on
its own so progress and cancellation work between pieces, and the pieces are joined with short
pauses, trimmed, loudness-normalised and encoded (Ogg/Opus by default, or WAV).
"""

from __future__ import annotations

import re
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from generators import audio_post
from generators.base import Cancelled, Generator, GeneratorError, Output, Request, Result

DEFAULT_VOICE = "heart"
SAMPLE_RATE = 24_000  # hibari's output rate
MIN_SPEED, MAX_SPEED = 0.5, 2.0  # the range hibari's duration model was exported for
DEFAULT_MAX_CHARS = 1_000
#: Pieces longer than this are split further: the model sees a whole piece at once, and
#: hibari itself cuts phoneme strings at 400 symbols (about 300 characters of English).
MAX_PIECE_CHARS = 280
PARAMS = ("voice", "speed", "format", "seed")

# Measured on this package (RSS deltas): ~30 MB per ONNX session with its arena, ~100 MB for
# the G2P (lexicons, tagger, OOV net). Estimates, because RSS is shared by every thread.
_VOICE_BYTES = 40 * 1024 * 1024
_G2P_BYTES = 100 * 1024 * 1024

_CLAUSE = re.compile(r"(?<=[,;:—–])\s+")
_TOKEN = re.compile(r"\S+")


@dataclass(frozen=True)
class Voice:
    """A voice whose model file is present on disk."""

    name: str
    path: Path
    language: str
    gender: str
    british: bool
    bundled: bool


@dataclass(frozen=True)
class Piece:
    """A stretch of text synthesized in one model call."""

    text: str
    new_paragraph: bool  # a longer pause goes before it


def _hibari_voices() -> tuple[dict[str, dict[str, Any]], Any]:
    """hibari's voice registry and its ``voice_path``, with a clear error if it is missing."""
    try:
        from hibari.voices import VOICES, voice_path
    except ImportError as exc:  # pragma: no cover - an install problem, not a request problem
        raise GeneratorError("the embedded voice is not installed (pip install hibari-tts==0.2.1)") from exc
    return VOICES, voice_path


def available_voices(voices_dir: str | Path | None = None) -> dict[str, Voice]:
    """Voices whose model file exists locally, by name; never downloads anything."""
    registry, voice_path = _hibari_voices()
    found: dict[str, Voice] = {}
    for name, info in registry.items():
        path: Path | None = None
        if voices_dir is not None and (Path(voices_dir) / info["file"]).is_file():
            path = Path(voices_dir) / info["file"]
        else:
            try:
                # download_missing=False: hibari would otherwise fetch the file over HTTP.
                candidate = Path(voice_path(name, download_missing=False))
            except (FileNotFoundError, ValueError):
                candidate = None
            if candidate is not None and candidate.is_file():
                path = candidate
        if path is not None:
            found[name] = Voice(
                name=name,
                path=path,
                language=info.get("language", "en"),
                gender=info.get("gender", ""),
                british=bool(info.get("british", False)),
                bundled=bool(info.get("bundled", False)),
            )
    return found


def has_speakable(text: str) -> bool:
    """True if the text has a letter or digit the English voice can read.

    Latin letters (accents included) and ASCII digits count; emoji, punctuation, symbols and
    other scripts do not, because hibari's English G2P drops them and would produce silence.
    """
    for ch in text:
        if ch.isascii():
            if ch.isalnum():
                return True
        elif ch.isalpha() and "LATIN" in unicodedata.name(ch, ""):
            return True
    return False


def _split_long(sentence: str, max_chars: int) -> list[str]:
    """Cut an over-long sentence at clause punctuation, then between words, packing greedily."""
    parts: list[str] = []
    for clause in _CLAUSE.split(sentence):
        if len(clause) <= max_chars:
            parts.append(clause)
            continue
        cur = ""
        for word in _TOKEN.findall(clause):
            if cur and len(cur) + 1 + len(word) > max_chars:
                parts.append(cur)
                cur = word
            else:
                cur = f"{cur} {word}" if cur else word
        if cur:
            parts.append(cur)
    # Re-pack the clauses so short ones are not synthesized (and paused) on their own.
    packed: list[str] = []
    for part in parts:
        if packed and len(packed[-1]) + 1 + len(part) <= max_chars:
            packed[-1] = f"{packed[-1]} {part}"
        else:
            packed.append(part)
    return packed


def split_text(text: str, max_chars: int = MAX_PIECE_CHARS) -> list[Piece]:
    """Split text into pieces at sentence boundaries (hibari's rules: "Dr. Smith" stays whole).

    Every line break starts a new paragraph; sentences longer than ``max_chars`` are split at
    clauses and then words. Pieces with nothing speakable are dropped.
    """
    from hibari.tts import Hibari  # a static method; no model is loaded

    pieces: list[Piece] = []
    for paragraph in re.split(r"\n+", text.strip()):
        first = True
        for sentence in Hibari.split_sentences(paragraph):
            for part in _split_long(sentence.strip(), max_chars):
                if has_speakable(part):
                    pieces.append(Piece(part, new_paragraph=first and bool(pieces)))
                    first = False
    return pieces


def parse_seed(raw: Any) -> int:
    """Validate a seed param: a whole number >= 0 (the queue passes it on as ``Request.seed``)."""
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise GeneratorError(f"Seed must be a whole number, not {raw!r}.")
    try:
        seed = int(raw)
    except (TypeError, ValueError):
        raise GeneratorError(f"Seed must be a whole number, not {raw!r}.") from None
    if not 0 <= seed < 2**63:
        raise GeneratorError("Seed must be between 0 and 2^63 - 1.")
    return seed


class SpeechGenerator(Generator):
    """Text to speech with the embedded hibari voices (English, 24 kHz, CPU)."""

    kind = "audio"
    max_batch_size = 1

    def __init__(
        self,
        max_chars: int = DEFAULT_MAX_CHARS,
        voices_dir: str | Path | None = None,
        threads: int = 1,
        sentence_pause_s: float = 0.25,
        paragraph_pause_s: float = 0.6,
        target_lufs: float = -16.0,
        opus_bitrate: int = audio_post.DEFAULT_OPUS_BITRATE,
    ) -> None:
        self.max_chars = max_chars
        self.voices_dir = Path(voices_dir) if voices_dir is not None else None
        self.threads = threads
        self.sentence_pause_s = sentence_pause_s
        self.paragraph_pause_s = paragraph_pause_s
        self.target_lufs = target_lufs
        self.opus_bitrate = opus_bitrate
        self._engines: dict[str, Any] = {}  # voice name -> hibari.Hibari
        self._g2ps: dict[bool, Any] = {}  # british? -> hibari G2P, shared between voices
        # One lock for loading and for G2P: hibari's G2P loads its OOV net lazily and is not
        # documented as thread-safe; it costs ~1 ms a sentence, so serialising it is cheap.
        # ONNX Runtime sessions are safe to run from several threads at once.
        self._lock = threading.Lock()

    # -- voices --------------------------------------------------------------------------------

    def voices(self) -> dict[str, Voice]:
        """The voices this generator can use right now (model files present on disk)."""
        return available_voices(self.voices_dir)

    def _voice(self, name: str) -> Voice:
        voices = self.voices()
        if name not in voices:
            offered = ", ".join(sorted(voices)) or "none"
            raise GeneratorError(f"Unknown voice {name!r}; available voices: {offered}.")
        return voices[name]

    # -- lifecycle -----------------------------------------------------------------------------

    def load(self) -> None:
        """Load the default voice and its G2P (about a second); other voices load on first use."""
        voices = self.voices()
        name = DEFAULT_VOICE if DEFAULT_VOICE in voices else next(iter(sorted(voices)), None)
        if name is None:
            raise GeneratorError("No voice model is available on disk for the embedded voice.")
        engine = self._engine(name)
        with self._lock:
            engine.phonemize("Ready.")  # loads the G2P tables now rather than mid-request

    def unload(self) -> None:
        with self._lock:
            self._engines.clear()
            self._g2ps.clear()

    def memory_bytes(self) -> int:
        """An estimate: hibari models are small, the G2P tables dominate."""
        return len(self._engines) * _VOICE_BYTES + len(self._g2ps) * _G2P_BYTES

    def _engine(self, name: str) -> Any:
        """The hibari engine for a voice, created once; never triggers a download."""
        with self._lock:
            engine = self._engines.get(name)
            if engine is not None:
                return engine
            voice = self._voice(name)
            try:
                from hibari.g2p import G2P
                from hibari.tts import Hibari

                g2p = self._g2ps.get(voice.british)
                if g2p is None:
                    g2p = self._g2ps[voice.british] = G2P(british=voice.british)
                # model= keeps hibari from resolving (and possibly downloading) the voice itself.
                engine = Hibari(voice=name, model=str(voice.path), threads=self.threads, g2p=g2p)
            except ImportError as exc:
                raise GeneratorError(
                    "the embedded voice is not installed (pip install hibari-tts==0.2.1)"
                ) from exc
            except Exception as exc:  # onnxruntime raises its own exception types
                raise GeneratorError(f"Could not load voice {name!r}: {exc}") from exc
            self._engines[name] = engine
            return engine

    # -- requests ------------------------------------------------------------------------------

    def check(self, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
        """Validate text and params without loading the model; return normalised params."""
        text = prompt.strip()
        if not text:
            raise GeneratorError("Nothing to say: the text is empty.")
        if len(text) > self.max_chars:
            raise GeneratorError(
                f"The text is {len(text):,} characters long; the limit is {self.max_chars:,}."
            )
        if not has_speakable(text):
            raise GeneratorError(
                "Nothing to say: the text has no letters or digits the English voice can read."
            )
        unknown = sorted(set(params) - set(PARAMS))
        if unknown:
            raise GeneratorError(
                f"Unknown option(s) {', '.join(unknown)}; speech takes: {', '.join(PARAMS)}."
            )

        voice = str(params.get("voice") or DEFAULT_VOICE).strip().lower()
        self._voice(voice)  # a file check, no model load

        raw_speed = params.get("speed", 1.0)
        try:
            speed = float(raw_speed)
        except (TypeError, ValueError):
            raise GeneratorError(f"Speed must be a number, not {raw_speed!r}.") from None
        if not MIN_SPEED <= speed <= MAX_SPEED:  # also rejects NaN
            raise GeneratorError(f"Speed must be between {MIN_SPEED} and {MAX_SPEED}.")

        fmt = str(params.get("format") or "ogg").strip().lower()
        if fmt not in audio_post.FORMATS:
            raise GeneratorError(f"Unknown format {fmt!r}; use one of: {', '.join(audio_post.FORMATS)}.")
        out: dict[str, Any] = {"voice": voice, "speed": speed, "format": fmt}
        if params.get("seed") is not None:
            out["seed"] = parse_seed(params["seed"])
        return out

    def generate(self, requests: list[Request]) -> list[Result]:
        """Synthesize each request piece by piece; raises Cancelled if a cancel flag is set."""
        return [self._one(request) for request in requests]

    def synthesize(
        self,
        text: str,
        voice: str = DEFAULT_VOICE,
        speed: float = 1.0,
        seed: int | None = None,
        request: Request | None = None,
    ) -> np.ndarray:
        """Text to raw 24 kHz float32 audio: pieces joined with pauses, edges trimmed.

        No loudness normalisation or encoding (see ``generators.audio_post``). With a
        ``request``, progress is reported per piece and its cancel flag is checked between
        pieces (raising ``Cancelled``).
        """
        engine = self._engine(voice)
        pieces = split_text(text)
        if not pieces:
            raise GeneratorError(
                "Nothing to say: the text has no letters or digits the English voice can read."
            )
        # One generator per request: a seed makes the noise component, and so the audio,
        # reproducible; without one every request sounds slightly different.
        rng = np.random.default_rng(seed)
        parts: list[np.ndarray] = []
        for index, piece in enumerate(pieces):
            if request is not None and request.cancelled():
                raise Cancelled(f"cancelled after {index} of {len(pieces)} pieces")
            audio = self._synthesize(engine, piece.text, speed, rng)
            if len(audio):
                if parts:
                    pause = self.paragraph_pause_s if piece.new_paragraph else self.sentence_pause_s
                    parts.append(audio_post.silence(pause, SAMPLE_RATE))
                parts.append(audio)
            if request is not None:
                request.on_progress((index + 1) / len(pieces), f"piece {index + 1}/{len(pieces)}")
        if not parts:
            raise GeneratorError("The voice produced no audio for this text.")
        return audio_post.trim_silence(np.concatenate(parts), SAMPLE_RATE)

    def _one(self, request: Request) -> Result:
        params = request.params
        voice = params.get("voice", DEFAULT_VOICE)
        speed = float(params.get("speed", 1.0))
        fmt = params.get("format", "ogg")
        started = time.perf_counter()
        seed = request.seed if request.seed is not None else params.get("seed")
        audio = self.synthesize(request.prompt, voice, speed, seed, request)
        synth_s = time.perf_counter() - started
        audio = audio_post.normalize_loudness(audio, SAMPLE_RATE, self.target_lufs)
        data = audio_post.encode(audio, SAMPLE_RATE, fmt, self.opus_bitrate)
        seconds = audio_post.duration_s(audio, SAMPLE_RATE)
        return Result(
            outputs=[Output(data=data, mime=audio_post.MIME[fmt], filename=f"speech.{fmt}")],
            metadata={
                "voice": voice,
                "speed": speed,
                "format": fmt,
                "sample_rate": audio_post.OPUS_SAMPLE_RATE if fmt == "ogg" else SAMPLE_RATE,
                "duration_s": round(seconds, 3),
                "pieces": len(split_text(request.prompt)),
                "synth_s": round(synth_s, 3),
                "realtime_factor": round(synth_s / seconds, 4) if seconds else None,
            },
        )

    def _synthesize(self, engine: Any, text: str, speed: float, rng: np.random.Generator) -> np.ndarray:
        """One piece: G2P under the lock, then the ONNX model and DSP outside it."""
        with self._lock:
            chunks = engine.phonemize(text)
        # A piece whose phonemes are only punctuation would come out as noise or silence.
        chunks = [c for c in chunks if any(ch.isalpha() for ch in c)]
        audio = [engine.from_ids(engine.ids(c), speed, rng) for c in chunks]
        audio = [a for a in audio if len(a)]
        if not audio:
            return np.zeros(0, np.float32)
        # Each piece carries its own edge silence; trim it so the pauses we insert are what
        # the listener hears.
        return audio_post.trim_silence(np.concatenate(audio), SAMPLE_RATE, pad_ms=30.0)
